"""A person token: a new word for the text encoders, learned beside the PVA parameters (the
research recipe's `<new1>`), written in prompts as `embedding:<name>`.

It carries what a PVA model without pretraining lacks: where the identity encoder has never seen
a face, the token's vectors hold the person for the text cross-attention. Its vectors are kept per
text encoder under the keys of a textual-inversion file ('clip_l', 'clip_g'), so the same tensors
go into the person's PVA file and into models/embeddings/<name>.safetensors.
"""

import re

import torch
from torch import nn

from ..errors import PVAError

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{2,39}$")


def check_token_name(name: str) -> str:
    """The name as it is written after `embedding:`; refused when ComfyUI's prompt syntax or a
    file name could not carry it."""
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise PVAError(
            f"person_token: {name!r} cannot name a token; use 3 to 40 letters, digits, _ or -, starting "
            "with a letter (e.g. 'anna_pva'). It is written in prompts as embedding:<name>."
        )
    return name


class PersonToken(nn.Module):
    def __init__(self, name: str, vectors: dict[str, torch.Tensor], class_word: str = ""):
        super().__init__()
        self.name = check_token_name(name)
        self.class_word = class_word
        counts = {v.shape[0] for v in vectors.values()}
        if not vectors or len(counts) != 1 or any(v.dim() != 2 for v in vectors.values()):
            raise PVAError(
                f"person token {name}: needs [count, width] vectors, the same count per text encoder."
            )
        self.vectors = nn.ParameterDict(
            {k: nn.Parameter(v.detach().float().clone()) for k, v in vectors.items()}
        )

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def prompt_word(self) -> str:
        return f"embedding:{self.name}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.vectors.items()}

    def describe(self) -> str:
        widths = ", ".join(f"{k} {v.shape[1]}" for k, v in self.vectors.items())
        return f"{self.prompt_word} ({self.count} vector{'s' if self.count != 1 else ''}; {widths})"
