"""Condition embeddings shared by every generator family.

The input is the schema's condition vector (one-hot block per single-label group, multi-hot
per multi-label group). Each group gets its own bias-free linear map to `dim` features, so for
a one-hot block this *is* an embedding lookup, and a multi-label block sums its values'
embeddings. An all-zero block (a group left unspecified) maps to zeros. The group embeddings
are concatenated, as the seed's multi-conditional GAN does.
"""

from __future__ import annotations

import torch
from torch import nn

from atelier.catalog.schema import AttributeSchema


class ConditionEmbedding(nn.Module):
    def __init__(self, schema: AttributeSchema, dim: int):
        super().__init__()
        self.sizes = [len(g.values) for g in schema.groups]
        self.groups = nn.ModuleList(nn.Linear(size, dim, bias=False) for size in self.sizes)
        for layer in self.groups:
            nn.init.normal_(layer.weight, std=1.0)  # like nn.Embedding's init
        self.out_dim = dim * len(self.sizes)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(condition, self.sizes, dim=1)
        return torch.cat([layer(block) for layer, block in zip(self.groups, blocks)], dim=1)
