"""The IDENTITY passed between nodes: what the references encode to, and what made it."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Identity:
    tokens: torch.Tensor  # [1, M, context_dim], float32, CPU
    face_embeddings: torch.Tensor  # [N, 512], one FaceNet embedding per reference photo
    context_dim: int
    pva_instance_id: str  # the PVAModel whose encoder produced `tokens`
    family: str

    @property
    def num_references(self) -> int:
        return self.face_embeddings.shape[0]

    def tokens_for(self, pva) -> torch.Tensor:  # noqa: ANN001  (PVAModel; avoids an import cycle)
        """Tokens for `pva`: ours if it made them, else re-encoded from the face embeddings."""
        if pva.instance_id == self.pva_instance_id:
            return self.tokens
        return pva.encode(self.face_embeddings)
