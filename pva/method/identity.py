"""The IDENTITY passed between nodes: the face embeddings of one person's reference photos.

It holds no identity tokens: the PVA model that applies it encodes them, so an IDENTITY stays
valid for any PVA model (a retrained or personalized one included) without detecting faces again.
"""

from dataclasses import dataclass

import torch

from ..errors import PVAError


@dataclass(frozen=True)
class Identity:
    face_embeddings: torch.Tensor  # [N, 512] FaceNet embeddings, one per reference face, CPU
    source: str = ""  # where the faces came from, for messages (e.g. "3 reference photos")

    def __post_init__(self) -> None:
        if self.face_embeddings.dim() != 2 or self.face_embeddings.shape[0] == 0:
            raise PVAError(
                f"identity: needs at least one face embedding, got shape {list(self.face_embeddings.shape)}."
            )

    @property
    def num_references(self) -> int:
        return self.face_embeddings.shape[0]

    def tokens_for(self, pva) -> torch.Tensor:  # noqa: ANN001  (PVAModel; avoids an import cycle)
        """[1, M, context_dim] identity tokens from `pva`'s identity encoder."""
        return pva.encode(self.face_embeddings)
