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


def drop_groups(condition: torch.Tensor, sizes: list[int], probability: float, random=None) -> torch.Tensor:
    """Zero each group's block independently with `probability` (teaches the "any" vectors).

    `random`: a `distributed.StepRandom` to draw from (else torch's global generator)."""
    if probability <= 0:
        return condition
    draws = (random.rand(len(sizes)) if random is not None
             else torch.rand(len(condition), len(sizes), device=condition.device))
    keep = (draws >= probability).to(condition.dtype)
    return condition * torch.repeat_interleave(keep, torch.tensor(sizes, device=condition.device), dim=1)


class ConditioningAugmentation(nn.Module):
    """StackGAN's conditioning augmentation: an embedded condition -> (mu, log sigma^2) of a code.

    The code is `reparameterise(mu, logvar, eps)`; `kl_to_standard_normal` keeps it near N(0, I),
    which smooths the condition manifold a generator sees.
    """

    def __init__(self, in_dim: int, code_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, 2 * code_dim)
        self.code_dim = code_dim

    def forward(self, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.fc(embedded).chunk(2, dim=1)
        return mu, logvar


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return mu + torch.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) averaged over the batch and the code's dimensions.

    StackGAN's convention: the mean, not the sum, over dimensions. Summed (64 times stronger
    at a 64-d code) the penalty pushed mu to 0 within a few thousand images on Fashion Product
    Images, and with it every trace of the condition from a progressive generator's input.
    """
    return (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean()


def mismatched(condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """"Wrong" conditions for matching-aware losses: each row gets the previous row's, plus a
    mask of the rows where that really differs from their own."""
    wrong = condition.roll(1, dims=0)
    return wrong, (wrong != condition).any(dim=1)
