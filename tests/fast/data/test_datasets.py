"""The two dataset layouts (folder per person, CelebAHQ-IDI export) and their errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pva.data.datasets import open_dataset, seeded_split
from pva.errors import PVAError


def _image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _folders(root: Path, people: int = 10, photos: int = 3) -> Path:
    for i in range(people):
        for j in range(photos):
            _image(root / f"person{i:02d}" / f"{j}.png")
    return root


def test_folder_layout_with_captions_and_a_seeded_split_by_person(tmp_path):
    root = _folders(tmp_path / "people")
    (root / "person00" / "1.txt").write_text("  smiling, with a beard \n")
    _image(root / "person00" / "4.webp")
    (root / "person00" / "notes.md").write_text("not a photo")
    (root / ".cache").mkdir()
    dataset = open_dataset(root)
    assert dataset.layout == "folders" and len(dataset.people) == 10
    anna = dataset.people["person00"]
    assert [p.key for p in anna.photos] == [
        "person00/0.png",
        "person00/1.png",
        "person00/2.png",
        "person00/4.webp",
    ]
    assert [p.caption for p in anna.photos] == [None, "smiling, with a beard", None, None]
    assert anna.references == anna.targets == anna.photos
    # 30 % test, 10 % val, the rest train; every person in exactly one split; same seed, same split
    assert [len(dataset.splits[s]) for s in ("test", "val", "train")] == [3, 1, 6]
    assert sorted(sum(dataset.splits.values(), ())) == sorted(dataset.people)
    assert open_dataset(root).splits == dataset.splits
    assert open_dataset(root, seed=1).splits != dataset.splits
    assert [p.name for p in dataset.split("test")] == list(dataset.splits["test"])
    assert "10 people (6 train, 1 val, 3 test), 31 photos" in dataset.describe()


def test_split_file_is_used_and_checked(tmp_path):
    root = _folders(tmp_path / "people", people=4)
    (root / "split.json").write_text(json.dumps({"train": ["person00", "person01"], "test": ["person03"]}))
    dataset = open_dataset(root)
    assert dataset.splits == {"train": ("person00", "person01"), "val": (), "test": ("person03",)}
    (root / "split.json").write_text(json.dumps({"train": ["person00"], "test": ["nobody"]}))
    with pytest.raises(PVAError, match=r"split file .*split.json: 1 test people have no folder .*'nobody'"):
        open_dataset(root)
    (root / "split.json").write_text(json.dumps({"train": ["person00"], "test": ["person00"]}))
    with pytest.raises(PVAError, match="'person00' is in both train and test"):
        open_dataset(root)
    (root / "split.json").write_text(json.dumps({"training": ["person00"]}))
    with pytest.raises(PVAError, match="expected .*train.*got keys \\['training'\\]"):
        open_dataset(root)
    (root / "split.json").write_text("{not json")
    with pytest.raises(PVAError, match="split file .* cannot be read as JSON"):
        open_dataset(root)


def test_missing_and_empty_folders_are_explained(tmp_path):
    with pytest.raises(PVAError, match="is not a folder"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "person").mkdir(parents=True)
    with pytest.raises(PVAError, match=r"no people found in .*empty.*root/<person>/<photo>"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(PVAError, match="layout: must be one of"):
        open_dataset(tmp_path, layout="lmdb")
    with pytest.raises(PVAError, match="split fractions"):
        seeded_split(["a", "b"], 0, 0.7, 0.5)


def _idi(root: Path, ids: list[int]) -> Path:
    id2image = {}
    for n, identity in enumerate(ids):
        folder = root / "IDI" / f"{identity:04d}"
        infer, refs = [100 * n + 1, 100 * n + 2], [100 * n + 3, 100 * n + 4, 100 * n + 5]
        for idx in infer:
            _image(folder / "infer_image" / f"{idx}.jpg")
            for kind in ("wholeface", "lowerface", "eyebrow", "random"):
                _image(folder / "infer_mask" / f"{idx}_{kind}.png", 255)
        for idx in refs:
            _image(folder / "ref_image" / f"{idx}.jpg")
        id2image[str(identity)] = {"infer": [f"{i}.jpg" for i in infer], "ref": [f"{i}.jpg" for i in refs]}
    annotation = {"train_ids": [], "val_ids": [], "test_ids": ids, "id2image": id2image}
    (root / "annotation").mkdir(parents=True)
    (root / "annotation" / "idi-5.json").write_text(json.dumps(annotation))
    return root


def test_celebahq_idi_export_with_its_annotation(tmp_path):
    root = _idi(tmp_path / "celebahq", [7, 42])
    dataset = open_dataset(root)
    assert dataset.layout == "celebahq-idi"
    assert dataset.splits["test"] == ("0007", "0042") and dataset.splits["train"] == ()
    person = dataset.people["0042"]
    assert [p.key for p in person.references] == [f"IDI/0042/ref_image/{i}.jpg" for i in (103, 104, 105)]
    assert [p.key for p in person.targets] == ["IDI/0042/infer_image/101.jpg", "IDI/0042/infer_image/102.jpg"]
    assert sorted(person.targets[0].masks) == ["eyebrow", "lowerface", "random", "wholeface"]
    assert person.targets[0].masks["lowerface"].name == "101_lowerface.png"
    assert not any(p.is_target for p in person.references)
    # pointing at IDI/ itself works too
    assert open_dataset(root / "IDI").splits == dataset.splits


def test_celebahq_idi_annotation_must_match_the_export(tmp_path):
    root = _idi(tmp_path / "celebahq", [7])
    (root / "IDI" / "0007" / "ref_image" / "4.jpg").unlink()
    with pytest.raises(PVAError, match=r"person 0007 lists ref image '4.jpg', which is not in"):
        open_dataset(root)
    (root / "annotation" / "idi-5.json").write_text(json.dumps({"ids": []}))
    with pytest.raises(PVAError, match="no train_ids / val_ids / test_ids"):
        open_dataset(root)


def test_folder_listing_takes_files_and_links_to_files_only(tmp_path):
    """The folders are listed once each (no stat per photo); what counts as a photo or a caption
    is what Path.is_file says: a link to a photo counts, a dangling link or a folder does not."""
    root = _folders(tmp_path / "people", people=2, photos=2)
    elsewhere = _image(tmp_path / "elsewhere" / "shot.jpg")
    (root / "person00" / "linked.jpg").symlink_to(elsewhere)
    (root / "person00" / "dangling.png").symlink_to(tmp_path / "missing.png")
    (root / "person00" / "folder.png").mkdir()
    (root / "person00" / "0.txt").mkdir()  # not a caption: a folder
    (root / "person01" / "1.txt").write_text("glasses")
    (root / "person01" / "1.TXT.png").symlink_to(elsewhere)
    (root / "linked-person").symlink_to(root / "person01", target_is_directory=True)
    dataset = open_dataset(root)
    assert sorted(dataset.people) == ["linked-person", "person00", "person01"]
    assert [p.key for p in dataset.people["person00"].photos] == [
        "person00/0.png",
        "person00/1.png",
        "person00/linked.jpg",
    ]
    assert [p.caption for p in dataset.people["person00"].photos] == [None, None, None]
    person01 = dataset.people["person01"].photos
    assert [(p.key, p.caption) for p in person01] == [
        ("person01/0.png", None),
        ("person01/1.TXT.png", None),
        ("person01/1.png", "glasses"),
    ]
    assert person01[2].path == root / "person01" / "1.png"
