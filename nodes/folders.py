"""Model folders: ComfyUI/models/pva, models/facenet and models/face_recognition (extra_model_paths.yaml
works too)."""

import os

import folder_paths

MODEL_FOLDERS = {
    "pva": {".safetensors"},
    "facenet": {".pt", ".pth", ".safetensors"},
    "face_recognition": {".onnx"},  # ArcFace/CosFace recognizers for Identity Similarity
}


def register_model_folders() -> None:
    for name, extensions in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            # extra_model_paths.yaml is read before custom nodes load and may have added the
            # key (with no extension filter): keep its paths, add ours and the extensions.
            paths, known = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


# What a user does when the file is missing, per model folder.
_HOW_TO_GET = {
    "facenet": "Put FaceNet's VGGFace2 weights (20180402-114759-vggface2.pt, or a .safetensors "
    "conversion) there",
    "pva": "Put a PVA model there (written by 'Save PVA Model', or shared by someone who trained one)",
    "face_recognition": "Put an ArcFace/CosFace .onnx (e.g. insightface's glintr100.onnx) there",
}


def missing_model_message(folder: str, name: str, what: str) -> str | None:
    """None when `name` is in the model folder; otherwise what is missing, where, and what to do."""
    if folder_paths.get_full_path(folder, name) is not None:
        return None
    available = folder_paths.get_filename_list(folder)
    choice = f"or pick one of {available}" if available else "the folder has no model files yet"
    return (
        f"{what}: {name!r} is not in ComfyUI/models/{folder}/ (or its extra_model_paths.yaml folders). "
        f"{_HOW_TO_GET[folder]} and press R in ComfyUI to refresh the list, {choice}."
    )
