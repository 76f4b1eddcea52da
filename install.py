"""Install step that ComfyUI Manager and comfy-cli run after requirements.txt.

facenet-pytorch (MTCNN face detection + FaceNet) declares torch<2.3, torchvision<0.18,
numpy<2 and Pillow<10.3. A plain `pip install facenet-pytorch` would therefore replace the
host's torch. It works fine on current torch/numpy, so it is installed without its
dependencies; what it really needs (torch, torchvision, numpy, Pillow, requests, tqdm) is
provided by ComfyUI and requirements.txt.
"""

import subprocess
import sys
from importlib import metadata

FACENET_PYTORCH = "facenet-pytorch==2.6.0"


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    wanted = FACENET_PYTORCH.split("==")[1]
    if installed_version("facenet-pytorch") == wanted:
        return 0
    command = [sys.executable, "-m", "pip", "install", "--no-deps", FACENET_PYTORCH]
    print("[comfyui-pva] " + " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
