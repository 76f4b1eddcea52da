"""The cached test models (tests/harness/artefacts.py) are reproducible: the same bytes on any
machine with the same package versions, checked against the digests recorded for this platform,
so that a drift is named by the model that drifted instead of surfacing as an unrelated failed
assertion somewhere in the suite."""

from __future__ import annotations

import subprocess

import pytest
from harness import artefacts

pytestmark = pytest.mark.training  # builds every test model the first time (minutes)


def test_every_test_model_is_the_bytes_recorded_for_this_platform():
    if artefacts.world_seed(0) != 0:
        pytest.skip("digests are recorded for the default world (PVA_TEST_WORLD_SEED unset)")
    recorded = artefacts.recorded_digests()
    if not recorded:
        pytest.skip(
            f"no digests recorded for this platform ({artefacts.platform_id()}): the models are still "
            "built reproducibly; record them with python tests/harness/artefacts.py record"
        )
    artefacts.register_all()
    for name, item in artefacts.ARTEFACTS.items():
        path = artefacts.ensure(name)
        assert path.name in recorded, (
            f"{path.name} ({item.describe}): no digest recorded for it on this platform; after checking the "
            "build is reproducible, record it: python tests/harness/artefacts.py record"
        )
        # the bytes on disk now, not the digest noted when it was built
        assert artefacts.digest(path) == recorded[path.name], f"{path.name} differs from its recorded digest"


def _build(tmp_path, name: str, threads: int, pinned: bool, **changes) -> bytes:
    out = tmp_path / f"{name}-{threads}-{'pinned' if pinned else 'free'}.safetensors"
    options = ["--out", str(out), *(f"--change={k}={v}" for k, v in changes.items())]
    command, env = artefacts.builder_command(name, *options, *([] if pinned else ["--unpinned"]))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out.read_bytes()


def test_a_trained_test_model_is_the_same_bytes_whatever_the_machines_thread_count(tmp_path):
    """The builder pins what the machine would otherwise choose. Control: the same training
    (a few steps of the people-base recipe) left on the machine's thread count gives other bytes
    with 1 and 2 threads, so the comparison can see a difference where there is one."""
    short = dict(steps=4)
    assert _build(tmp_path, "people-base", 1, True, **short) == _build(
        tmp_path, "people-base", 2, True, **short
    )
    assert _build(tmp_path, "people-base", 1, False, **short) != _build(
        tmp_path, "people-base", 2, False, **short
    )


def test_a_build_that_drifts_from_its_recorded_digest_is_named(tmp_path):
    """A test model whose bytes differ from the digest recorded for the platform is refused when
    it is built, naming the model (here: the FaceNet, against a record that says otherwise)."""
    import json
    import os
    import sys

    artefacts.register_all()
    name = artefacts.ARTEFACTS["facenet-random"].file_name()
    record = {artefacts.platform_id(): {"artefacts": {name: "0" * 64}}}
    (tmp_path / "digests.json").write_text(json.dumps(record))
    from harness.host import comfyui_path, portrait_packages

    # An empty home of its own, with the host and the portraits that the real home's env.sh names.
    env = dict(
        os.environ,
        PVA_DEV_HOME=str(tmp_path / "home"),
        PVA_TEST_MODEL_DIGESTS=str(tmp_path / "digests.json"),
        COMFYUI_PATH=str(comfyui_path()),
        PVA_PORTRAITS=str(portrait_packages()),
    )
    code = "from harness import artefacts; artefacts.ensure('facenet-random')"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=artefacts.TESTS, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert f"DriftError: test model {name} (InceptionResnetV1" in done.stderr
    assert "0000000000000000... is recorded for this platform" in done.stderr
    assert not (tmp_path / "home" / "test-models" / name).exists()  # never taken into the cache
