"""Identity transformer: N face embeddings -> M identity tokens of the UNet's context width."""

import torch
from torch import nn


class IdentityEncoder(nn.Module):
    """Project each reference's FaceNet embedding to the context width, append M learnable
    queries, run a transformer encoder over all N + M tokens and read the identity off the
    last M outputs (plus a learned positional offset)."""

    def __init__(
        self,
        context_dim: int,
        num_tokens: int = 10,
        face_dim: int = 512,
        depth: int = 4,
        heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.config = dict(
            context_dim=context_dim,
            num_tokens=num_tokens,
            face_dim=face_dim,
            depth=depth,
            heads=heads,
            ff_dim=ff_dim,
        )
        self.face_projection = nn.Linear(face_dim, context_dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, context_dim) * context_dim**-0.5)
        layer = nn.TransformerEncoderLayer(
            context_dim, heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(context_dim), enable_nested_tensor=False
        )
        self.position = nn.Parameter(torch.zeros(num_tokens, context_dim))

    @property
    def num_tokens(self) -> int:
        return self.queries.shape[0]

    def forward(self, face_embeddings: torch.Tensor) -> torch.Tensor:
        """[N, face_dim] or [B, N, face_dim] -> [B, M, context_dim] (B = 1 for 2-d input)."""
        if face_embeddings.dim() == 2:
            face_embeddings = face_embeddings.unsqueeze(0)
        faces = self.face_projection(face_embeddings.to(self.queries.dtype))
        queries = self.queries.unsqueeze(0).expand(faces.shape[0], -1, -1)
        encoded = self.transformer(torch.cat([faces, queries], dim=1))
        return encoded[:, -self.num_tokens :] + self.position
