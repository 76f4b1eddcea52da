"""Reading the face cache at data-set scale: load_faces checks every person file's header and
keeps no embeddings; a person's photos and embeddings are read from their file when used, and
a file that changed or holds damaged numbers since is named with what to do."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from pva.data.preprocess import PersonFaces, load_faces, person_file, read_person_file
from pva.errors import PVAError
from pva.faces.detection import DetectedFace
from pva.files import save_safetensors


def _write_person(cache: Path, name: str, photos: int = 3, seed: int = 0, nan: bool = False) -> Path:
    """A person file as preprocessing writes it (header, embeddings, mirrored, crops)."""
    generator = torch.Generator().manual_seed(seed)
    entries = [
        {
            "key": f"{name}/{k}.png",
            "box": [10.5 + k, 12.25, 70.125, 80.0],
            "landmarks": [[20.0 + i, 30.5 + k] for i in range(5)],
            "probability": 0.998,
            "size": [128, 96 + k],
            "faces_found": 1,
        }
        for k in range(photos)
    ]
    summary = {
        "person": name,
        "fingerprint": "f" * 24,
        "facenet": "d" * 64,
        "photos": entries,
        "skipped": {"no_face": [], "unreadable": []},
    }
    embeddings = torch.nn.functional.normalize(torch.randn(photos, 512, generator=generator), dim=1)
    if nan:
        embeddings[1, 7] = float("nan")
    tensors = {
        "embeddings": embeddings,
        "mirrored": torch.nn.functional.normalize(torch.randn(photos, 512, generator=generator), dim=1),
        "crops": torch.randint(0, 256, (photos, 3, 160, 160), dtype=torch.uint8, generator=generator),
    }
    metadata = {"format": "comfyui-pva-faces", "format_version": "1", "summary": json.dumps(summary)}
    path = person_file(cache, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


def test_load_faces_reads_what_the_files_hold_when_it_is_used(tmp_path):
    for seed, name in enumerate(["anna", "ben", "carl"]):
        _write_person(tmp_path, name, photos=3 + seed, seed=seed)
    _write_person(tmp_path, "dora", photos=1)  # too few photos: left out
    faces = load_faces(tmp_path, ["anna", "ben", "carl", "dora"])
    assert sorted(faces) == ["anna", "ben", "carl"]
    for name, person in faces.items():
        summary, embeddings, mirrored = read_person_file(person_file(tmp_path, name))
        photos = summary["photos"]
        assert person.name == name and person.path == person_file(tmp_path, name)
        assert len(person) == len(photos) and person.facenet == "d" * 64
        assert person.keys == tuple(p["key"] for p in photos)
        assert person.sizes == tuple(tuple(p["size"]) for p in photos)
        assert person.faces[0] == DetectedFace(
            tuple(photos[0]["box"]), tuple(tuple(q) for q in photos[0]["landmarks"]), 0.998
        )
        assert torch.equal(person.embeddings, embeddings) and torch.equal(person.mirrored, mirrored)
        assert person.crops([0, 1]).shape == (2, 3, 160, 160)
        # a data loader's worker gets a copy that reads the same file
        copy = pickle.loads(pickle.dumps(person))
        assert copy.keys == person.keys and torch.equal(copy.embeddings, person.embeddings)
    # made with its values (not from a file), a PersonFaces holds them, as before
    anna = faces["anna"]
    held = PersonFaces("anna", anna.keys, anna.faces, anna.sizes, anna.embeddings, anna.mirrored, anna.path)
    assert len(held) == 3 and held.facenet == "" and torch.equal(held.embeddings, anna.embeddings)
    assert pickle.loads(pickle.dumps(held)).keys == anna.keys


def test_a_file_changed_or_damaged_after_loading_is_named(tmp_path):
    first = _write_person(tmp_path, "anna", seed=1)
    _write_person(tmp_path, "ben", seed=2, nan=True)
    faces = load_faces(tmp_path, ["anna", "ben"])  # headers are fine: both load
    # preprocessing made anna again (another file in her name) while a run held the cache
    replacement = tmp_path / "new.safetensors"
    _write_person(tmp_path / "other", "anna", seed=3).rename(replacement)
    os.replace(replacement, first)
    for use in (lambda anna: anna.embeddings, lambda anna: anna.faces, lambda anna: anna.crops([0])):
        with pytest.raises(
            PVAError, match=rf"^{first}: the face-cache file changed after load_faces read it"
        ):
            use(faces["anna"])
    with pytest.raises(PVAError, match=r"ben.safetensors: its embeddings are not finite numbers; delete it"):
        _ = faces["ben"].embeddings
    person_file(tmp_path, "ben").unlink()
    with pytest.raises(PVAError, match="ben.safetensors: the face-cache file cannot be read any more"):
        _ = faces["ben"].keys
