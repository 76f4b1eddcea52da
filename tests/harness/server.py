"""A real ComfyUI server on a free 127.0.0.1 port, with this pack in its custom_nodes."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from .host import REPO_ROOT, comfyui_path

PACK_DIR_NAME = "comfyui-pva"


class ComfyError(RuntimeError):
    """A prompt was rejected or a node failed; the message is ComfyUI's own."""

    def __init__(self, message: str, node_type: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.node_type = node_type
        self.details = details or {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: Path, pack_dir: Path | None = REPO_ROOT) -> Path:
    """A ComfyUI --base-directory: models/, input/, output/, custom_nodes/<pack link>."""
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if pack_dir is not None:
        link = base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(pack_dir, target_is_directory=True)
    return base


class ComfyServer:
    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ComfyServer":
        host = comfyui_path()
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--disable-auto-launch", *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")  # noqa: SIM115  (kept open for the server's life)
        self.process = subprocess.Popen(cmd, cwd=host, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_failures(self) -> list[str]:
        """Lines where ComfyUI reports a custom node pack that failed to import."""
        return [line for line in self.log().splitlines() if "IMPORT FAILED" in line]

    # -- HTTP -------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return json.loads(body) if body else None  # /interrupt answers with no body
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            try:
                body = json.loads(body)
            except json.JSONDecodeError:
                pass
            raise ComfyError(f"{path} answered {error.code}: {body}", details={"body": body}) from None

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    # -- prompts ----------------------------------------------------------------------------
    def queue(self, prompt: dict) -> str:
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except ComfyError as error:
            body = error.details.get("body")
            if isinstance(body, dict):
                raise ComfyError(_validation_message(body), details=body) from None
            raise
        return answer["prompt_id"]

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for it; return {node_id: outputs}.

        Raises ComfyError with the failing node's type and exception message."""
        prompt_id = self.queue(prompt)
        return self.wait(prompt_id, timeout)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    for kind, data in status.get("messages", []):
                        if kind == "execution_error":
                            raise ComfyError(
                                f"{data.get('node_type')} (node {data.get('node_id')}): "
                                f"{data.get('exception_type')}: {data.get('exception_message')}",
                                node_type=data.get("node_type"),
                                details=data,
                            )
                    raise ComfyError(f"prompt failed: {status}")
                if status.get("status_str") == "success" or status.get("completed"):
                    if any(kind == "execution_interrupted" for kind, _ in status.get("messages", [])):
                        raise ComfyError("prompt was interrupted", details=status)
                    return entry.get("outputs", {})
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def output_image(self, outputs: dict, node_id: str):  # noqa: ANN201  (np.ndarray)
        """The one picture SaveImage node `node_id` wrote in a finished prompt, [H, W, 3] uint8."""
        import numpy as np
        from PIL import Image

        images = outputs[node_id]["images"]
        assert len(images) == 1 and images[0]["type"] == "output", images
        with Image.open(self.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as saved:
            assert saved.mode == "RGB", saved.mode
            return np.asarray(saved).copy()

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    # -- websocket (what the web UI listens to) ------------------------------------------------
    def listen(self, timeout: float = 30):  # noqa: ANN201
        """A websocket connection receiving this client's messages (progress, executing, ...)."""
        import websocket

        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout
        )


def wait_for_message(connection, wanted: Callable[[dict], bool], timeout: float) -> dict:  # noqa: ANN001
    """The first JSON message on `connection` for which `wanted` is true (binary previews skipped)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        connection.settimeout(remaining)
        raw = connection.recv()
        if isinstance(raw, str) and wanted(message := json.loads(raw)):
            return message
    raise TimeoutError(f"no such message within {timeout}s")


def _validation_message(body: dict) -> str:
    parts = [str(body.get("error", {}).get("message", body.get("error")))]
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for err in node_error.get("errors", []):
            parts.append(
                f"node {node_id} ({node_error.get('class_type')}): {err.get('message')}: {err.get('details')}"
            )
    return "; ".join(parts)
