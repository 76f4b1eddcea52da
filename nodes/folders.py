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
