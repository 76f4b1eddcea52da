"""Text conditioning of every caption, computed once before training.

No text encoder runs in the training loop: loading it there could make ComfyUI push the
training UNet out of memory (and it costs time every step). Like kohya's
--cache_text_encoder_outputs, every caption's conditioning is stored (fp16) in one safetensors
file keyed by the caption's hash, and read lazily.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PVAError
from ..files import write_atomically

TOKENS = 77  # one CLIP window per caption

TextEncoder = Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]  # -> [1, T, C], pooled [1, P] or None


def _stored(path: Path) -> dict[str, torch.Tensor]:
    """The conditionings in an existing cache file; {} (and a note) when it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        if all(k.endswith((".cond", ".pooled")) and v.dtype == torch.float16 for k, v in stored.items()):
            return stored
        problem = "it holds tensors this pack does not write"
    except Exception as error:  # safetensors' own error types: a pickle, a truncated copy, ...
        problem = f"it cannot be read ({error})"
    print(f"[PVA] text cache {path}: {problem}; making it again.", flush=True)
    return {}


def _key(caption: str) -> str:
    return hashlib.sha1(caption.encode()).hexdigest()


class TextCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as error:  # safetensors' own error types
            raise PVAError(
                f"{self.path}: the text cache cannot be read ({error}); delete it, and the next run makes it again."
            ) from None
        self._keys = set(self._file.keys())

    @classmethod
    def build(cls, path: Path, captions: Iterable[str], encode: TextEncoder) -> TextCache:
        """Encode the captions the file does not hold yet (all of them the first time). A damaged
        file (truncated, or not one this pack wrote) is made again from scratch."""
        path = Path(path)
        stored = _stored(path) if path.is_file() else {}
        missing = sorted({c for c in captions if f"{_key(c)}.cond" not in stored})
        if missing or not path.is_file():
            with torch.no_grad():
                for caption in missing:
                    cond, pooled = encode(caption)
                    stored[f"{_key(caption)}.cond"] = cond[0, :TOKENS].to("cpu", torch.float16).contiguous()
                    if pooled is not None:
                        stored[f"{_key(caption)}.pooled"] = pooled[0].to("cpu", torch.float16).contiguous()
            write_atomically(path, lambda temp: save_file(stored, str(temp)))
        return cls(path)

    def lookup(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T, C] conditioning and [B, P] pooled output (None for models without one), float32."""
        conds = torch.stack([self._file.get_tensor(f"{_key(c)}.cond") for c in captions]).float()
        pooled_keys = [f"{_key(c)}.pooled" for c in captions]
        if pooled_keys[0] not in self._keys:
            return conds, None
        return conds, torch.stack([self._file.get_tensor(k) for k in pooled_keys]).float()
