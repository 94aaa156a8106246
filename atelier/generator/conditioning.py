"""Condition embeddings shared by every generator family.

The input is the schema's condition vector (one-hot block per single-label group, multi-hot
per multi-label group). Each group gets its own bias-free linear map to `dim` features, so for
a one-hot block this *is* an embedding lookup, and a multi-label block sums its values'
embeddings. The group embeddings are concatenated, as the seed's multi-conditional GAN does.

An all-zero block is a group left unspecified. With `learn_any`, each group also learns an
"any" vector used in its place (trained by dropping groups at random, see `drop_groups`),
so a request may leave a group out and the model draws a plausible value for it; without it
the block maps to zeros, which the model never saw in training (so callers must give every
single-label group).
"""

from __future__ import annotations

import torch
from torch import nn

from atelier.catalog.schema import AttributeSchema


class ConditionEmbedding(nn.Module):
    def __init__(self, schema: AttributeSchema, dim: int, learn_any: bool = False):
        super().__init__()
        self.sizes = [len(g.values) for g in schema.groups]
        self.dim = dim
        self.groups = nn.ModuleList(nn.Linear(size, dim, bias=False) for size in self.sizes)
        for layer in self.groups:
            nn.init.normal_(layer.weight, std=1.0)  # like nn.Embedding's init
        self.any = nn.Parameter(torch.randn(len(self.sizes), dim)) if learn_any else None
        self.out_dim = dim * len(self.sizes)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(condition, self.sizes, dim=1)
        out = []
        for i, (layer, block) in enumerate(zip(self.groups, blocks)):
            embedded = layer(block)
            if self.any is not None:
                unspecified = (block.sum(dim=1, keepdim=True) == 0).to(embedded.dtype)
                embedded = embedded + unspecified * self.any[i]
            out.append(embedded)
        return torch.cat(out, dim=1)


def drop_groups(condition: torch.Tensor, sizes: list[int], probability: float) -> torch.Tensor:
    """Zero each group's block independently with `probability` (teaches the "any" vectors)."""
    if probability <= 0:
        return condition
    keep = (torch.rand(len(condition), len(sizes), device=condition.device) >= probability).to(condition.dtype)
    return condition * torch.repeat_interleave(keep, torch.tensor(sizes, device=condition.device), dim=1)
