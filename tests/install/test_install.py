"""Installing this pack the way ComfyUI-Manager does never touches the host's torch/torchvision/numpy.

How ComfyUI-Manager installs a pack (ltdrdata/ComfyUI-Manager, read at commit 402e2c3):

* glob/manager_core.py, UnifiedManager.execute_install_script(): when the pack has a
  requirements.txt it reads it LINE BY LINE (manager_util.robust_readlines), strips each line,
  remaps it through pip_overrides.json, skips empty lines and lines starting with '#' and runs one
  `[sys.executable, "-m", "pip", "install", <line>]` per line (manager_util.make_pip_cmd; `-m uv pip`
  when uv is enabled). It never uses `-r`, so each line is passed to pip verbatim as a single argument
  (newer versions first cut an inline `# comment`). Then PIPFixer.fix_broken() runs, and finally, if
  install.py exists, `[sys.executable, "install.py"]`. try_install_script() runs every command through
  run_script(cmd, cwd=<pack dir>): same interpreter as ComfyUI, cwd = the pack directory.
* try_install_script() skips a requirement line whose name is on the blacklist (is_blacklisted();
  set up in prestartup_script.py / cm-cli.py): pip_blacklist = {torch, torchaudio, torchsde,
  torchvision} always, pip_downgrade_blacklist (those + transformers, safetensors, kornia) when the
  line pins `<`, `<=`, `==` or `~=` below the installed version. The filter only looks at the
  line itself, not at what pip resolves for it: a `facenet-pytorch` line would still pull in torch<2.3.
* On Windows (or with always_lazy_install) the same commands are queued and run by
  prestartup_script.py execute_lazy_install_script() at the next start: again per line, then
  `[executable, "install.py"]` with cwd = the pack directory. comfy-cli's `comfy node install` runs
  cm-cli.py, which calls the same execute_install_script().
* Not mirrored here: PIPFixer.fix_broken() (glob/manager_util.py). It rolls torch back if its
  version changed and, in some Manager versions, reinstalls `numpy<2` whenever numpy>=2 is
  installed, whatever the pack; that is the Manager's own behaviour and independent of this pack.

The test builds a throwaway "ComfyUI environment": a fresh venv (no system site-packages) whose
site-packages holds a .pth file pointing at a directory of symlinks to everything in the dev venv's
site-packages except facenet-pytorch (and pip/setuptools, which the venv brings itself). pip sees
torch/torchvision/numpy there as installed, but they live outside the venv's prefix, so pip can
never uninstall or modify them: a pack that tried to change torch would put a second torch into the
venv's own site-packages, which the version and origin checks below detect.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PACK_DIR = Path(__file__).resolve().parents[2]
HOST_PACKAGES = ("torch", "torchvision", "numpy", "pillow")
# The Manager's own lists (prestartup_script.py / cm-cli.py).
PIP_BLACKLIST = {"torch", "torchaudio", "torchsde", "torchvision"}
PIP_DOWNGRADE_BLACKLIST = PIP_BLACKLIST | {"transformers", "safetensors", "kornia"}
# Not linked into the new environment: facenet-pytorch is what the install has to add, and the venv
# has its own pip/setuptools.
EXCLUDED_ENTRIES = re.compile(
    r"^(facenet_pytorch|pip|setuptools|pkg_resources|_distutils_hack|__pycache__)([-.].*)?$|\.pth$",
    re.IGNORECASE,
)
TIMEOUT = 600  # a regression would download GBs of torch wheels into the tmp venv; fail, don't hang

PROBE = r"""
import json, sys, sysconfig
from importlib import metadata
import numpy, PIL, torch, torchvision
out = {"purelib": sysconfig.get_paths()["purelib"]}
for name, module in (("torch", torch), ("torchvision", torchvision), ("numpy", numpy), ("pillow", PIL)):
    dist = metadata.distribution(name)
    out[name] = {
        "version": dist.version,
        "module_version": module.__version__,
        "file": module.__file__,
        "dist_location": str(dist.locate_file("")),
    }
if "--facenet" in sys.argv:
    from facenet_pytorch import MTCNN, InceptionResnetV1
    import facenet_pytorch
    MTCNN(device="cpu")  # constructs PNet/RNet/ONet and loads the weights shipped in the wheel
    out["facenet_pytorch"] = {
        "version": metadata.version("facenet-pytorch"),
        "file": facenet_pytorch.__file__,
        "dist_location": str(metadata.distribution("facenet-pytorch").locate_file("")),
        "InceptionResnetV1": InceptionResnetV1.__module__,
    }
print("PROBE=" + json.dumps(out))
"""


def load_install_module():
    spec = importlib.util.spec_from_file_location("comfyui_pva_install", PACK_DIR / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FACENET_PIN = load_install_module().FACENET_PYTORCH  # e.g. "facenet-pytorch==2.6.0"
FACENET_VERSION = FACENET_PIN.split("==")[1]


def manager_requirement_lines(path):
    """The strings ComfyUI-Manager passes, one per `pip install`, for a requirements.txt."""
    seen = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and line not in seen:
            seen.append(line)
    return seen


def manager_skips(line, installed):
    """ComfyUI-Manager's is_blacklisted() for one requirement line."""
    match = re.search(r"([^<>!~=]+)([<>!~=]=?)([^ ]*)", line)
    name = (match.group(1) if match else line).strip()
    if name in PIP_BLACKLIST:
        return True
    if name in PIP_DOWNGRADE_BLACKLIST and name in installed:
        if match is None:
            return True
        if match.group(2) in ("<=", "==", "<", "~="):
            return Version(installed[name]) >= Version(match.group(3))
    return False


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(cmd, cwd, env=None):
    result = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    result.output = result.stdout + result.stderr
    return result


def probe(python, facenet=False):
    result = run([python, "-c", PROBE] + (["--facenet"] if facenet else []), cwd=PACK_DIR)
    assert result.returncode == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE="))
    return json.loads(line[len("PROBE=") :])


def pip_list(python):
    result = run([python, "-m", "pip", "list", "--format=json"], cwd=PACK_DIR)
    assert result.returncode == 0, result.output
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def host_env(tmp_path_factory):
    """A venv that "has torch" (the dev venv's packages, via symlinks) but not facenet-pytorch."""
    root = tmp_path_factory.mktemp("host-env")
    env_dir = root / "venv"
    result = run([sys.executable, "-m", "venv", env_dir], cwd=root)
    assert result.returncode == 0, result.output
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert "include-system-site-packages = false" in (env_dir / "pyvenv.cfg").read_text()

    linked = root / "host-site-packages"  # outside the venv's prefix on purpose (see module doc)
    linked.mkdir()
    dev_sites = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib"))
    for site in dev_sites:
        for entry in sorted(site.iterdir()):
            target = linked / entry.name
            if not EXCLUDED_ENTRIES.search(entry.name) and not target.exists():
                target.symlink_to(entry, target_is_directory=entry.is_dir())

    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    purelib = Path(purelib.stdout.strip())
    (purelib / "zz-host-site-packages.pth").write_text(f"{linked}\n")
    return {"python": python, "purelib": purelib, "linked": linked, "root": root}


def test_requirements_txt_is_safe_line_by_line():
    """Each line goes to pip as one argument, and none of them names a host package or facenet."""
    lines = manager_requirement_lines(PACK_DIR / "requirements.txt")
    assert lines, "requirements.txt is empty"
    forbidden = {"torch", "torchvision", "torchaudio", "torchsde", "numpy", "pillow", "facenet-pytorch"}
    for line in lines:
        # Older Managers pass the whole line, inline comment and options included, to `pip install`.
        assert "#" not in line and not line.startswith("-"), f"not a bare requirement: {line!r}"
        requirement = Requirement(line)
        assert canonicalize_name(requirement.name) not in forbidden, line


def test_pyproject_dependencies_match_requirements_txt():
    import tomllib

    project = tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = sorted(str(Requirement(d)) for d in project["dependencies"])
    listed = sorted(str(Requirement(x)) for x in manager_requirement_lines(PACK_DIR / "requirements.txt"))
    assert declared == listed


def test_manager_install_keeps_host_torch_and_adds_facenet(host_env, tmp_path):
    python, purelib = host_env["python"], host_env["purelib"]
    started = time.monotonic()

    # The environment is what it should be: host packages visible to pip, facenet-pytorch absent.
    result = run([python, "-c", "import facenet_pytorch"], cwd=PACK_DIR)
    assert result.returncode != 0 and "No module named 'facenet_pytorch'" in result.output, result.output
    installed = pip_list(python)
    assert "facenet-pytorch" not in installed
    before = probe(python)
    for name in HOST_PACKAGES:
        assert installed[name] == before[name]["version"], (name, installed[name], before[name])
        assert before[name]["file"].startswith(str(host_env["linked"])), before[name]
    entries_before = {p.name for p in purelib.iterdir()}

    # ComfyUI-Manager: one `pip install <line>` per requirements.txt line, then `python install.py`,
    # all with the environment's interpreter and the pack directory as cwd.
    logs = []
    for line in manager_requirement_lines(PACK_DIR / "requirements.txt"):
        if manager_skips(line, installed):
            continue
        result = run([python, "-m", "pip", "install", line], cwd=PACK_DIR)
        logs.append(result.output)
        assert result.returncode == 0, result.output
    result = run([python, "install.py"], cwd=PACK_DIR)
    logs.append(result.output)
    assert result.returncode == 0, result.output
    installed_by_pack = rf"^Successfully installed .*\bfacenet[-_]pytorch-{re.escape(FACENET_VERSION)}\b"
    assert re.search(installed_by_pack, result.output, re.MULTILINE | re.IGNORECASE), result.output

    # pip installed nothing but facenet-pytorch (and requirements.txt packages, if the host lacked any).
    changed = [
        dist
        for log in logs
        for installed_line in re.findall(r"^Successfully installed (.*)$", log, re.MULTILINE)
        for dist in installed_line.split()
        if re.match(r"(torch|torchvision|numpy|pillow|nvidia|triton)\b", canonicalize_name(dist))
    ]
    assert not changed, f"the Manager-style install replaced host packages: {changed}"
    new_entries = {p.name for p in purelib.iterdir()} - entries_before
    assert {"facenet_pytorch", f"facenet_pytorch-{FACENET_VERSION}.dist-info"} <= new_entries, new_entries
    shadowing = {
        e for e in new_entries if re.match(r"(torch|torchvision|numpy|PIL|pillow|nvidia|triton)\b", e)
    }
    assert not shadowing, f"the install put host packages into the env: {sorted(shadowing)}"

    # Same torch/torchvision/numpy/Pillow, imported from the same place; facenet_pytorch from the env.
    after = probe(python, facenet=True)
    for name in HOST_PACKAGES:
        assert after[name] == before[name], (name, before[name], after[name])
    facenet = after["facenet_pytorch"]
    assert facenet["version"] == FACENET_VERSION
    assert Path(facenet["file"]).is_relative_to(purelib), facenet
    assert Path(facenet["dist_location"]) == purelib, facenet
    installed_after = pip_list(python)
    for name in HOST_PACKAGES:
        assert installed_after[name] == installed[name], name
    assert installed_after["facenet-pytorch"] == FACENET_VERSION

    # install.py again (Manager "fix"/reinstall, or snapshot restore): a no-op that does not run pip.
    # A stand-in `pip` package on PYTHONPATH shadows the real one and records any `python -m pip`.
    sentinel_dir, marker = tmp_path / "pip-sentinel", tmp_path / "pip-was-called"
    (sentinel_dir / "pip").mkdir(parents=True)
    (sentinel_dir / "pip" / "__init__.py").write_text("")
    (sentinel_dir / "pip" / "__main__.py").write_text(
        f"import pathlib, sys\npathlib.Path({str(marker)!r}).write_text(repr(sys.argv))\nsys.exit(97)\n"
    )
    sentinel_env = clean_env(PYTHONPATH=str(sentinel_dir))
    check = run([python, "-m", "pip", "--version"], cwd=PACK_DIR, env=sentinel_env)
    assert check.returncode == 97 and marker.exists(), "the pip sentinel does not intercept pip"
    marker.unlink()
    second_started = time.monotonic()
    second = run([python, "install.py"], cwd=PACK_DIR, env=sentinel_env)
    second_seconds = time.monotonic() - second_started
    assert second.returncode == 0, second.output
    assert not marker.exists(), f"second install.py run called pip: {marker.read_text()}"
    assert second.output.strip() == "", second.output
    assert second_seconds < 10, second_seconds
    assert probe(python)["torch"] == before["torch"]

    print(
        "\n[test_install] env torch {t} / torchvision {tv} / numpy {np} / Pillow {pil} unchanged, "
        "facenet-pytorch {fn} from {loc}; second install.py run {s:.2f}s; total {total:.1f}s".format(
            t=after["torch"]["version"],
            tv=after["torchvision"]["version"],
            np=after["numpy"]["version"],
            pil=after["pillow"]["version"],
            fn=facenet["version"],
            loc=facenet["dist_location"],
            s=second_seconds,
            total=time.monotonic() - started,
        )
    )


@pytest.mark.parametrize("host_package", ["torch", "numpy"])
def test_plain_facenet_install_would_change_host_package(host_env, host_package):
    """Negative control: without --no-deps, pip cannot install facenet-pytorch and keep the host's package.

    Resolving with the host's version pinned as a constraint fails fast and downloads only small
    wheels. (An unpinned `pip install --dry-run --report` resolves to torch 2.2.2, torchvision 0.17.2,
    numpy 1.26.4 and Pillow 10.2.0, but pip downloads the full torch and nvidia wheels, GBs, to read
    their metadata, so it is not used here.)
    """
    python = host_env["python"]
    version = metadata.version(host_package)  # the dev venv's, which host_env links in
    constraint = host_env["root"] / f"keep-{host_package}.txt"
    constraint.write_text(f"{host_package}=={version}\n")
    result = run([python, "-m", "pip", "install", "--dry-run", "-c", constraint, FACENET_PIN], cwd=PACK_DIR)
    assert result.returncode != 0, result.output
    assert "ResolutionImpossible" in result.output, result.output
    conflict = rf"facenet-pytorch {re.escape(FACENET_VERSION)} depends on {host_package}\s*<"
    assert re.search(conflict, result.output, re.IGNORECASE), result.output
