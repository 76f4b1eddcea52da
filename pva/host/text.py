"""A person token inside ComfyUI's text encoders: prompts written with `embedding:<name>` encoded
with the token's vectors from memory (so that they can be trained), exactly as ComfyUI encodes
them from a textual-inversion file in models/embeddings.

ComfyUI's tokenizer reads embeddings only from files, and its CLIP layers add their residuals in
place (`x += ...`), which autograd cannot differentiate. So the prompt is tokenized with a
one-token stand-in word where the person token stands, each stand-in's entry of the token list is
replaced by one of the token's vectors (which is what the tokenizer itself does with a file's
vectors), and while a token trains the CLIP layers run an out-of-place copy of their forward.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..errors import PVAError

if TYPE_CHECKING:
    from comfy.sd import CLIP

EMBEDDING_PREFIX = "embedding:"
# One-token words of CLIP's vocabulary, rare in prompts; the first one the prompt does not use
# stands in for the person token while the prompt is tokenized.
_STAND_INS = ("sks", "zwx", "xqz", "qwv", "vzk")


def encoder_keys(clip: CLIP) -> list[str]:
    """The text encoders of a CLIP as the token lists name them ('l', 'g', ...)."""
    return list(clip.tokenize("a").keys())


def embedding_key(encoder: str) -> str:
    """The key of an encoder's vectors in a textual-inversion file ('clip_l', 'clip_g')."""
    return f"clip_{encoder}"


def _input_embeddings(clip: CLIP, encoder: str) -> torch.nn.Module:
    model = getattr(clip.cond_stage_model, embedding_key(encoder), None)
    if model is None or not hasattr(model, "transformer"):
        raise PVAError(
            f"clip: its text encoder '{encoder}' ({type(clip.cond_stage_model).__name__}) is not a CLIP text "
            "model; a person token can be trained only for CLIP text encoders (SD1.x, SD2.x, SDXL)."
        )
    return model.transformer.get_input_embeddings()


def _word_ids(clip: CLIP, text: str) -> dict[str, list[int]]:
    """The token ids of `text` alone for each encoder, without start, end and padding."""
    empty = clip.tokenize("")
    ids = {}
    for encoder, chunks in clip.tokenize(text).items():
        end = empty[encoder][0][1][0]  # an empty prompt is [start, end, padding...]
        entries = [entry[0] for entry in chunks[0]]
        ids[encoder] = entries[1 : entries.index(end, 1)]
    return ids


def is_vocabulary_word(clip: CLIP, word: str) -> bool:
    """Whether CLIP reads `word` as one whole word of its own vocabulary (then it already means
    something, and a person token of that name would be confused with it)."""
    return all(len(body) == 1 for body in _word_ids(clip, word).values())


def class_word_vectors(clip: CLIP, word: str, count: int) -> dict[str, torch.Tensor]:
    """`count` copies of the input embedding of a one-token `word` ('person', 'woman'), per
    encoder: where textual inversion starts a new token."""
    vectors = {}
    for encoder, body in _word_ids(clip, word).items():
        if len(body) != 1:
            raise PVAError(
                f"class_word: {word!r} is {len(body)} tokens for CLIP; use one common word such as "
                "'person', 'woman' or 'man'."
            )
        table = _input_embeddings(clip, encoder)
        row = table(torch.tensor([body], device=table.weight.device), out_dtype=torch.float32)[0, 0]
        vectors[embedding_key(encoder)] = row.detach().to("cpu", torch.float32).repeat(count, 1)
    return vectors


def token_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w:]){re.escape(EMBEDDING_PREFIX + name)}(?![\w.-])")


def mentions(prompt: str, name: str) -> int:
    return len(token_pattern(name).findall(prompt))


def tokenize_with_token(clip: CLIP, prompt: str, name: str, vectors: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's token lists of `prompt` with each `embedding:<name>` standing for the
    vectors (in the order of the token's rows), as if loaded from models/embeddings/<name>."""
    count = next(iter(vectors.values())).shape[0]
    for stand_in in _STAND_INS:
        if re.search(rf"\b{stand_in}\b", prompt, re.IGNORECASE):
            continue
        text = token_pattern(name).sub(" ".join([stand_in] * count), prompt)
        ids = _word_ids(clip, stand_in)
        if not all(len(body) == 1 for body in ids.values()):
            continue
        tokens = clip.tokenize(text)
        for encoder, chunks in tokens.items():
            rows = vectors[embedding_key(encoder)]
            found = 0
            for chunk in chunks:
                for index, entry in enumerate(chunk):
                    if entry[0] == ids[encoder][0]:
                        chunk[index] = (rows[found % count], *entry[1:])
                        found += 1
            if found != count * mentions(prompt, name):
                break
        else:
            return tokens
    raise PVAError(
        f"prompt: it cannot be tokenized with the person token {EMBEDDING_PREFIX}{name}; simplify it."
    )


def encode(clip: CLIP, tokens: dict) -> list:
    """A CONDITIONING, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(tokens)


@contextmanager
def differentiable(clip: CLIP) -> Iterator[None]:
    """CLIP's layers with out-of-place residual additions, so that gradients reach the input
    embeddings; the same arithmetic, so the encoding is unchanged."""
    import comfy.clip_model

    clip.load_model()
    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
    for layer in layers:

        def forward(x, mask=None, optimized_attention=None, _layer=layer):  # noqa: ANN001, ANN202
            x = x + _layer.self_attn(_layer.layer_norm1(x), mask, optimized_attention)
            return x + _layer.mlp(_layer.layer_norm2(x))

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def replace_text(cond: list, encoded: list) -> list:
    """`cond` (e.g. with the inpainting concat ComfyUI added to it) with the text and pooled
    output of `encoded`, a CONDITIONING of the same prompt."""
    out = []
    for (_, extra), (text, encoded_extra) in zip(cond, encoded, strict=True):
        extra = dict(extra)
        if "pooled_output" in encoded_extra:
            extra["pooled_output"] = encoded_extra["pooled_output"]
        out.append([text, extra])
    return out
