"""Sharded preprocessing's inputs: --shard i/n or a launcher's RANK/WORLD_SIZE, checked with an
error naming the input; the assignment of people to shards is a hash of the name alone."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
from harness.host import REPO_ROOT

from pva.data.preprocess import check_shard, parse_shard, shard_from_environment, shard_of
from pva.errors import PVAError


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "preprocess_faces", REPO_ROOT / "scripts" / "preprocess_faces.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shard_values_are_checked_with_an_error_naming_the_input():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3 / 4 ") == (3, 4) and parse_shard("0/1") == (0, 1)
    for text, says in (
        ("3/2", r"^--shard: 3/2 names shard 3 of 2, and the 2 shards are numbered 0 \.\. 1 \(0/2 \.\. 1/2\)"),
        ("2/2", "2/2 names shard 2 of 2"),
        ("a/b", r"--shard: expected i/n, .*got 'a/b'"),
        ("0/0", "^--shard: 0/0 asks for 0 shards; give i/n with n >= 1"),
        ("-1/2", "--shard: expected i/n"),
        ("1/2/3", "--shard: expected i/n"),
        ("", "--shard: expected i/n"),
    ):
        with pytest.raises(PVAError, match=says):
            parse_shard(text)
    with pytest.raises(PVAError, match=r"^shard: expected \(i, n\)"):
        check_shard((1,))
    with pytest.raises(PVAError, match="^shard: 5/3 names shard 5 of 3"):
        check_shard((5, 3))


def test_a_launchers_rank_and_world_size_are_the_shard():
    assert shard_from_environment({}) is None
    assert shard_from_environment({"RANK": "3"}) is None  # no WORLD_SIZE: no launcher
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    with pytest.raises(PVAError, match=r"RANK='8' and WORLD_SIZE='8' \(set by torchrun"):
        shard_from_environment({"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(PVAError, match="WORLD_SIZE is set without RANK"):
        shard_from_environment({"WORLD_SIZE": "2"})


def test_the_script_refuses_bad_shards_before_reading_anything(script, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--data", str(tmp_path / "nowhere"), "--facenet", "x.pt", "--cache", str(tmp_path / "c")]
    for value in ("3/2", "a/b", "0/0"):
        assert script.main([*argv, "--shard", value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --shard: ") and value in err, err
        assert not (tmp_path / "c").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    assert script.main(argv) == 2
    assert "error: RANK='x' and WORLD_SIZE='2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--shard I/N" in text and "$RANK/$WORLD_SIZE when a launcher (torchrun, accelerate launch)" in text


def test_every_person_is_in_exactly_one_shard_whatever_the_machine():
    names = [f"person-{i:05d}" for i in range(3000)] + ["Anna Müller", "0042", "李"]
    for shards in (1, 2, 3, 8):
        owners = [shard_of(name, shards) for name in names]
        assert all(0 <= o < shards for o in owners)
        counts = [owners.count(i) for i in range(shards)]
        assert min(counts) > 0.8 * len(names) / shards, counts  # a hash spreads people evenly
    # the assignment is sha256 of the name (not Python's per-process hash(), not the listing order)
    for name in names[:50]:
        expected = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 4
        assert shard_of(name, 4) == expected
    assert [shard_of(n, 2) for n in ("p0", "p1", "p2", "lonely")] == [0, 1, 0, 1]
