"""Multi-conditional GAN (the seed's design for Fashion Product Images, 64 x 64).

One embedding per attribute group (type, colour, ...), all concatenated with z (latent 100):
that is the CGAN generator with a multi-group ConditionEmbedding, which it already has. What
this family adds:

- a learned "any" embedding per group, trained by dropping each group from the condition with
  probability `condition_dropout` (for G and D alike, so D judges the pair it is shown). A
  request may then leave a group out: the model draws a plausible value for it.
- a projection discriminator (Miyato & Koyama 2018) as the default D: the image goes through
  spectrally normalised convolutions to a feature vector phi(x); the logit is
  w . phi(x) + sum over groups of <embed_g(y_g), phi(x)>. It judges how well image and
  condition agree with an inner product instead of an extra input channel, and pairs with the
  hinge loss. `discriminator="channel"` keeps the seed's condition-as-a-channel D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import register
from atelier.generator.cgan import CGAN, CGANConfig, Discriminator
from atelier.generator.conditioning import ConditionEmbedding, drop_groups

DISCRIMINATORS = ("projection", "channel")


@dataclass
class MCGANConfig(CGANConfig):
    image_size: int = 64
    channels: int = 3
    d_width: int = 32
    loss: str = "hinge"
    discriminator: str = "projection"
    condition_dropout: float = 0.1  # per group and image, during training
    mode_seeking: float = 1.0  # the CGAN on Fashion-MNIST collapsed within each class without it


class ProjectionDiscriminator(nn.Module):
    def __init__(self, schema: AttributeSchema, config: MCGANConfig):
        super().__init__()
        layers, w_in, w, spatial = [], config.channels, config.d_width, config.image_size
        while spatial > 4:
            layers += [spectral_norm(nn.Conv2d(w_in, w, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            w_in, w, spatial = w, min(w * 2, 512), spatial // 2
        self.features = nn.Sequential(*layers, nn.Flatten(), spectral_norm(nn.Linear(w_in * spatial * spatial, 256)),
                                      nn.LeakyReLU(0.2, inplace=True))
        self.head = spectral_norm(nn.Linear(256, 1))
        self.embed = ConditionEmbedding(schema, 256, learn_any=True)
        self.groups = len(schema.groups)
        for layer in self.embed.groups:
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        phi = self.features(images)
        projection = self.embed(condition).view(len(images), self.groups, -1).sum(dim=1)
        return self.head(phi).squeeze(1) + (projection * phi).sum(dim=1)


@register
class MCGAN(CGAN):
    family = "mcgan"
    Config = MCGANConfig
    learn_any = True
    accepts_partial = True

    def __init__(self, schema: AttributeSchema, config: MCGANConfig | None = None):
        config = config or MCGANConfig()
        if config.discriminator not in DISCRIMINATORS:
            raise ValueError(f"unknown discriminator {config.discriminator!r}; allowed: {', '.join(DISCRIMINATORS)}")
        super().__init__(schema, config)

    def make_discriminator(self) -> nn.Module:
        if self.config.discriminator == "projection":
            return ProjectionDiscriminator(self.schema, self.config)
        return Discriminator(self.schema, self.config, learn_any=True)

    def training_condition(self, condition: torch.Tensor) -> torch.Tensor:
        return drop_groups(condition, self.embed.sizes, self.config.condition_dropout)
