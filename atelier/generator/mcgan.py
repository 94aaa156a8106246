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
- `discriminator="pretrained"`: D judges frozen ImageNet mobilenet_v2 features instead of pixels
  (Projected GAN, Sauer et al. 2021): small trainable spectrally normalised heads on the
  network's stride-8 and stride-16 feature maps, each with its own projection term, their
  logits summed. Pretrained features reach a given quality in far fewer images; they can also
  lower an ImageNet-Inception FID without better images (Kynkaanniemi et al. 2023), so a model
  trained this way is graded by the judge's measures beside FID, never by FID alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import register
from atelier.generator.cgan import CGAN, CGANConfig, Discriminator
from atelier.generator.conditioning import ConditionEmbedding, drop_groups
from atelier.pretrained import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2_features

DISCRIMINATORS = ("projection", "channel", "pretrained")


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


class PretrainedDiscriminator(nn.Module):
    """Trainable heads on frozen mobilenet_v2 features; the frozen network is not in the state dict
    (it is ImageNet's, never trained here, and checked against its sha256 when loaded)."""

    SCALES = ((7, 32), (14, 96))  # (features[:i] ends at stride 8 / 16, its channels)
    INPUT_SIZE = 64  # what the frozen network sees: 8 x 8 and 4 x 4 maps

    def __init__(self, schema: AttributeSchema, config: MCGANConfig):
        super().__init__()
        features = mobilenet_v2_features(pretrained=True)[0].eval()
        for p in features.parameters():
            p.requires_grad_(False)
        stages, start = [], 0
        for end, _ in self.SCALES:
            stages.append(features[start:end])
            start = end
        object.__setattr__(self, "frozen", stages)  # a plain list: no parameters, no state dict entries
        width = 4 * config.d_width
        self.heads = nn.ModuleList(nn.Sequential(
            spectral_norm(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(width, width, 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True)) for _, channels in self.SCALES)
        self.logits = nn.ModuleList(spectral_norm(nn.Linear(width, 1)) for _ in self.SCALES)
        self.embeds = nn.ModuleList(ConditionEmbedding(schema, width, learn_any=True) for _ in self.SCALES)
        for embed in self.embeds:
            for layer in embed.groups:
                nn.init.normal_(layer.weight, std=0.02)
        self.groups = len(schema.groups)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if x.shape[-1] != self.INPUT_SIZE:
            x = F.interpolate(x, size=self.INPUT_SIZE, mode="bilinear", align_corners=False)
        h = ((x + 1) / 2 - self.mean) / self.std
        total = torch.zeros(len(images), device=images.device)
        for stage, head, logit, embed in zip(self.frozen, self.heads, self.logits, self.embeds):
            stage.to(h.device)
            h = stage(h)
            phi = head(h).sum(dim=(2, 3))
            projection = embed(condition).view(len(images), self.groups, -1).sum(dim=1)
            total = total + logit(phi).squeeze(1) + (projection * phi).sum(dim=1)
        return total


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
        if self.config.discriminator == "pretrained":
            return PretrainedDiscriminator(self.schema, self.config)
        return Discriminator(self.schema, self.config, learn_any=True)

    def training_condition(self, condition: torch.Tensor) -> torch.Tensor:
        return drop_groups(condition, self.embed.sizes, self.config.condition_dropout)
