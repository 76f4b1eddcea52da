"""Pretraining's own files under damage, without a run: the text cache is made again, damaged
checkpoint files are named with what to do, and the system's atomic exchange is found."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from harness.damage import checkpoint_files, pickle_at, truncate

from pva.errors import PVAError
from pva.pretraining.checkpoints import find_checkpoint, save_checkpoint


def _encode(caption: str):
    return torch.full((1, 77, 8), float(len(caption))), None


@pytest.mark.parametrize("damage", ["pickle", "truncated", "foreign tensors"])
def test_a_damaged_text_cache_is_made_again(tmp_path, damage, capsys):
    from safetensors.torch import save_file

    from pva.data.text_cache import TextCache

    path = tmp_path / "text.safetensors"
    TextCache.build(path, ["a photo", "another photo"], _encode)
    if damage == "pickle":
        pickle_at(path, tmp_path / "payload-ran")
    elif damage == "truncated":
        truncate(path)
    else:
        save_file({"weights": torch.zeros(3)}, str(path))
    if damage != "foreign tensors":  # (those open; the build below finds them out)
        with pytest.raises(PVAError, match=rf"^{path}: the text cache cannot be read .*delete it"):
            TextCache(path)
    cache = TextCache.build(path, ["a photo", "another photo"], _encode)
    assert f"text cache {path}:" in capsys.readouterr().out
    conds, pooled = cache.lookup(["another photo", "a photo"])
    assert conds[:, 0, 0].tolist() == [13.0, 7.0] and pooled is None
    assert not (tmp_path / "payload-ran").exists()


def test_damaged_checkpoint_files_are_named(tmp_path):
    from pva.pretraining.checkpoints import read_state

    save_checkpoint(tmp_path, 1, checkpoint_files("one"), {"step": 1})
    save_checkpoint(tmp_path, 2, checkpoint_files("two"), {"step": 2})
    folder = tmp_path / "checkpoints"
    # state.pt replaced by a pickle that would run code: refused, named, never run
    pickle_at(folder / "step-0000002" / "state.pt", tmp_path / "payload-ran")
    with pytest.raises(
        PVAError,
        match=rf"^{folder / 'step-0000002' / 'state.pt'}: cannot be read, it holds Python objects .*--resume <folder>",
    ):
        read_state(find_checkpoint(tmp_path, "latest"))
    assert not (tmp_path / "payload-ran").exists()
    # meta.json damaged
    (folder / "step-0000002" / "meta.json").write_text("{not json")
    with pytest.raises(PVAError, match=rf"^{folder / 'step-0000002' / 'meta.json'}: damaged"):
        find_checkpoint(tmp_path, "latest")
    # latest.json damaged: the newest complete checkpoint, and latest.json made again
    shutil.rmtree(folder / "step-0000002")
    (folder / "latest.json").write_text("\0\0garbage")
    assert find_checkpoint(tmp_path, "latest").name == "step-0000001"
    assert json.loads((folder / "latest.json").read_text()) == {"checkpoint": "step-0000001", "step": 1}
    # latest.json pointing at a folder that is gone, and nothing complete left
    (folder / "step-0000001" / "state.pt").unlink()
    with pytest.raises(
        PVAError, match=r"latest.json: it names step-0000001, which is not a complete.*start a new run"
    ):
        find_checkpoint(tmp_path, "latest")


def test_the_exchange_is_used_where_the_system_has_it(tmp_path):
    """On Linux the replacement swaps the two folders in one step (renameat2)."""
    from pva.pretraining.checkpoints import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if not exchange(a, b):
        pytest.skip("this system or file system cannot exchange two names atomically")
    assert ((a / "which").read_text(), (b / "which").read_text()) == ("b", "a")
