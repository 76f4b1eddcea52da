"""The PVA weights file: one .safetensors per PVA model, described by its header metadata.

Keys: `identity_encoder.<param>` and `layers.<ComfyUI block name>.to_{q,k,v}.weight`, e.g.
`layers.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight`. Metadata (all strings):
format, format_version, family, context_dim, num_tokens, encoder (json), layers (json),
provenance (json).

Version 2 adds an optional person token: `person_token.<clip_l|clip_g>` [count, width] and the
metadata `person_token` (json: name, class_word). Files without one are still written as version 1,
so packs that read only version 1 keep reading them.

Version 3: models of an MMDiT (family e.g. Flux, Flux2): layers are double-stream blocks
(`layers.double_blocks.<i>.to_q.weight`), each layer's json has "kind": "joint_attention", and
context_dim is the model's hidden width. Only such files are written as version 3, so an older
pack refuses them with "update the pack" instead of misreading them.
"""

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..errors import PVAWeightsError
from ..files import save_safetensors, write_atomically
from .encoder import IdentityEncoder
from .layers import JOINT, LayerSpec
from .model import PVAModel
from .person_token import PersonToken

FORMAT = "comfyui-pva"
FORMAT_VERSION = 3
ENCODER_PREFIX = "identity_encoder."
LAYER_PREFIX = "layers."
TOKEN_PREFIX = "person_token."


def state_dict_for_file(pva: PVAModel) -> dict[str, torch.Tensor]:
    tensors = {ENCODER_PREFIX + k: v for k, v in pva.identity_encoder.state_dict().items()}
    for spec in pva.layers:
        proj = pva.projections_for(spec.name)
        for name in ("to_q", "to_k", "to_v"):
            tensors[f"{LAYER_PREFIX}{spec.name}.{name}.weight"] = getattr(proj, name).weight
    if pva.person_token is not None:
        tensors.update({TOKEN_PREFIX + k: v for k, v in pva.person_token.tensors().items()})
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def metadata_for_file(pva: PVAModel) -> dict[str, str]:
    token = pva.person_token
    extra = (
        {}
        if token is None
        else {"person_token": json.dumps({"name": token.name, "class_word": token.class_word})}
    )
    return {
        "format": FORMAT,
        "format_version": str(_version(pva)),
        "family": pva.family,
        "context_dim": str(pva.context_dim),
        "num_tokens": str(pva.num_tokens),
        "encoder": json.dumps(pva.identity_encoder.config),
        "layers": json.dumps([s.to_json() for s in pva.layers]),
        "provenance": json.dumps(pva.provenance),
        **extra,
    }


def _version(pva: PVAModel) -> int:
    """The oldest format that can hold this model (older packs keep reading what they can)."""
    if pva.layers[0].kind == JOINT:
        return 3
    return 1 if pva.person_token is None else 2


def save_pva(pva: PVAModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write atomically (pva.files): never a half-written file under the final name."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PVAWeightsError(
            f"{path.name} already exists in {path.parent}; choose another name or allow overwriting."
        )
    tensors, metadata = state_dict_for_file(pva), metadata_for_file(pva)
    return write_atomically(path, lambda temp: save_safetensors(tensors, temp, metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise PVAWeightsError(
            f"PVA file not found: {path}. Put PVA .safetensors files in ComfyUI/models/pva/."
        )
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise PVAWeightsError(
            f"{path.name} cannot be read as a .safetensors file ({error}). It may be truncated "
            "(an interrupted download or copy): download or save it again."
        ) from None
    if metadata.get("format") != FORMAT:
        raise PVAWeightsError(
            f"{path.name} is not a PVA weights file (no '{FORMAT}' header). PVA files are written by "
            "the 'Save PVA Model' node; LoRA, checkpoint or IP-Adapter files do not fit here."
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise PVAWeightsError(
            f"{path.name}: damaged PVA header (format_version {metadata.get('format_version')!r}); "
            "save or download the file again."
        ) from None
    if version > FORMAT_VERSION:
        raise PVAWeightsError(
            f"{path.name} uses PVA format version {version}; this pack reads up to {FORMAT_VERSION}. Update the pack."
        )
    return metadata


def load_pva(path: str | os.PathLike) -> PVAModel:
    with torch.inference_mode(False):  # normal tensors: the loaded model may be trained further
        return _load_pva(Path(path))


def _load_pva(path: Path) -> PVAModel:
    metadata = read_metadata(path)
    try:
        tensors = safetensors.torch.load_file(str(path))
        encoder_config = json.loads(metadata["encoder"])
        layers = [LayerSpec(**spec) for spec in json.loads(metadata["layers"])]
        provenance = json.loads(metadata.get("provenance", "{}"))
        pva = PVAModel(layers, IdentityEncoder(**encoder_config), metadata["family"], provenance)
        if "person_token" in metadata:
            token = json.loads(metadata["person_token"])
            vectors = {k[len(TOKEN_PREFIX) :]: v for k, v in tensors.items() if k.startswith(TOKEN_PREFIX)}
            pva.person_token = PersonToken(token["name"], vectors, token.get("class_word", ""))
    except (KeyError, ValueError, TypeError) as error:
        raise PVAWeightsError(
            f"{path.name}: damaged PVA header ({error}); save or download the file again."
        ) from None
    except Exception as error:
        raise PVAWeightsError(
            f"{path.name}: tensor data cannot be read ({error}); the file is probably truncated. Download or save it again."
        ) from None
    expected = state_dict_for_file(pva).keys()
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise PVAWeightsError(
            f"{path.name}: {len(missing)} tensors missing and {len(unexpected)} unexpected for its own header "
            f"(e.g. {example}); the file is damaged. Save or download it again."
        )
    encoder_state = {k[len(ENCODER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    try:
        pva.identity_encoder.load_state_dict(encoder_state)
        with torch.no_grad():
            for spec in pva.layers:
                proj = pva.projections_for(spec.name)
                for name in ("to_q", "to_k", "to_v"):
                    getattr(proj, name).weight.copy_(tensors[f"{LAYER_PREFIX}{spec.name}.{name}.weight"])
    except RuntimeError as error:
        raise PVAWeightsError(f"{path.name}: tensor shapes disagree with its header ({error}).") from None
    return pva


EMBEDDING_FORMAT = "comfyui-pva-person-token"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", "")


def embedding_owner(path: Path) -> str | None:
    """The person a textual-inversion file was written for by this pack, or None for any other
    file (someone else's embedding)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file: not ours
        return None
    return metadata.get("person") if metadata.get("format") == EMBEDDING_FORMAT else None


def check_embedding_free(token: PersonToken, folders: list[str], overwrite: bool = False) -> None:
    """Refused when any embeddings folder already has a file ComfyUI would read for the token's
    name, unless it is this pack's file of the same person and `overwrite` is on."""
    for folder in folders:
        for suffix in EMBEDDING_SUFFIXES:
            existing = Path(folder) / f"{token.name}{suffix}"
            if not existing.is_file():
                continue
            if embedding_owner(existing) != token.name:
                raise PVAWeightsError(
                    f"person_token: models/embeddings already has {existing.name} ({existing.parent}), an embedding "
                    f"that is not this person's; embedding:{token.name} would be ambiguous. Choose another token name."
                )
            if not overwrite:
                raise PVAWeightsError(
                    f"{existing.name} already exists in {existing.parent} (an earlier training of {token.name}); "
                    "allow overwriting or choose another token name."
                )


def save_embedding(token: PersonToken, folders: list[str], overwrite: bool = False) -> Path:
    """Write the token as a textual-inversion file, <first folder>/<name>.safetensors, that
    ComfyUI reads for `embedding:<name>` in any prompt (see check_embedding_free)."""
    check_embedding_free(token, folders, overwrite)
    path = Path(folders[0]) / f"{token.name}.safetensors"
    metadata = {"format": EMBEDDING_FORMAT, "person": token.name, "class_word": token.class_word}
    return write_atomically(path, lambda temp: save_safetensors(token.tensors(), temp, metadata))
