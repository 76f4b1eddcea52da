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
        # `dropout` is a training setting, not part of the saved architecture
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

    def set_dropout(self, p: float) -> None:
        """Dropout probability everywhere in the transformer: its Dropout modules and the
        attention weights' dropout, which nn.MultiheadAttention keeps as a plain float."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, nn.MultiheadAttention):
                module.dropout = p

    @property
    def num_tokens(self) -> int:
        return self.queries.shape[0]

    def forward(
        self, face_embeddings: torch.Tensor, reference_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, face_dim] or [B, N, face_dim] -> [B, M, context_dim] (B = 1 for 2-d input).

        reference_mask: [B, N] bool, False where a row is padding (samples of a training batch
        have different numbers of references); padded rows are not attended to."""
        if face_embeddings.dim() == 2:
            face_embeddings = face_embeddings.unsqueeze(0)
        faces = self.face_projection(face_embeddings.to(self.queries.dtype))
        queries = self.queries.unsqueeze(0).expand(faces.shape[0], -1, -1)
        padding = None
        if reference_mask is not None:
            queries_kept = torch.ones(queries.shape[:2], dtype=torch.bool, device=faces.device)
            padding = ~torch.cat([reference_mask.to(faces.device, torch.bool), queries_kept], dim=1)
        encoded = self.transformer(torch.cat([faces, queries], dim=1), src_key_padding_mask=padding)
        return encoded[:, -self.num_tokens :] + self.position
