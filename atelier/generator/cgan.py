"""Conditional GAN (DCGAN-style), as the seed specifies it for Fashion-MNIST.

Generator: the condition is embedded (one embedding per attribute group) and concatenated
with z; a linear layer makes a `base x base` feature map, then transposed convolutions double
it up to `image_size`. Discriminator: the condition is embedded, mapped by a linear layer to
H*W values and appended to the image as one extra channel; strided convolutions then a linear
real/fake logit. Loss: the non-saturating GAN loss (BCE on logits) with one-sided label
smoothing; Adam 2e-4, beta1 0.5 (the seed's settings). The hinge loss is an option (it is
the usual partner of the projection discriminator in atelier.generator.mcgan).

Two modern options, off by default so that the seed's recipe stays what it was
(atelier.generator.recipes): `ema_decay` > 0 serves a moving average of the trained generator,
and `augment` puts real and generated images through the same differentiable augmentation
(DiffAugment) before D.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, register
from atelier.generator.checkpoint import OptimizerState
from atelier.generator.conditioning import ConditionEmbedding
from atelier.generator.recipes import diff_augment, ema_update, parse_policy


@dataclass
class CGANConfig:
    image_size: int = 28
    channels: int = 1
    latent_dim: int = 100
    embed_dim: int = 50
    g_width: int = 32  # channels of the last generator block; doubles per block towards the base
    d_width: int = 64  # channels of the first discriminator block; doubles per block
    lr: float = 2e-4
    beta1: float = 0.5
    real_label: float = 0.9  # one-sided label smoothing keeps D from saturating early (bce only)
    loss: str = "bce"  # "bce" (non-saturating) or "hinge"
    mode_seeking: float = 0.0  # weight of MSGAN's mode-seeking term (against within-condition collapse)
    ema_decay: float = 0.0  # > 0: the checkpoint's weights are this moving average of the trained ones
    augment: str = ""  # DiffAugment policy before D, e.g. "color,translation,cutout"; "": none


def upsampling_plan(image_size: int) -> tuple[int, int]:
    """(base, doublings) with base * 2**doublings == image_size and 4 <= base <= 7."""
    base, doublings = image_size, 0
    while base > 7:
        if base % 2:
            raise ValueError(f"image_size {image_size} must be base * 2**k with base in 4..7 (e.g. 28, 32, 64, 128)")
        base //= 2
        doublings += 1
    if base < 4:
        raise ValueError(f"image_size {image_size} is too small (at least 4)")
    return base, doublings


@register
class CGAN(ConditionalGenerator):
    family = "cgan"
    Config = CGANConfig
    learn_any = False  # see ConditionEmbedding

    def __init__(self, schema: AttributeSchema, config: CGANConfig | None = None):
        config = config or CGANConfig()
        super().__init__(schema, config)
        self.base, doublings = upsampling_plan(config.image_size)
        widths = [config.g_width * 2 ** (doublings - i) for i in range(doublings + 1)]
        if config.loss not in LOSSES:
            raise ValueError(f"unknown loss {config.loss!r}; allowed: {', '.join(LOSSES)}")
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=self.learn_any)
        self.project = nn.Sequential(
            nn.Linear(config.latent_dim + self.embed.out_dim, widths[0] * self.base**2, bias=False),
            nn.BatchNorm1d(widths[0] * self.base**2),
            nn.ReLU(inplace=True),
        )
        blocks = []
        for w_in, w_out in zip(widths, widths[1:]):
            blocks += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], config.channels, 3, 1, 1), nn.Tanh())
        self.widths = widths
        init_dcgan(self)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(condition)], dim=1))
        h = h.view(len(z), self.widths[0], self.base, self.base)
        return self.to_image(self.blocks(h))

    def make_discriminator(self) -> nn.Module:
        return Discriminator(self.schema, self.config)

    def training_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition a training step uses (families may drop groups here)."""
        return condition


class Discriminator(nn.Module):
    def __init__(self, schema: AttributeSchema, config: CGANConfig, learn_any: bool = False):
        super().__init__()
        size = config.image_size
        self.size = size
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=learn_any)
        self.condition_map = nn.Linear(self.embed.out_dim, size * size)
        layers, w_in, w = [], config.channels + 1, config.d_width
        spatial = size
        while spatial > 7:
            layers += [nn.Conv2d(w_in, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            w_in, w, spatial = w, w * 2, spatial // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(w_in * spatial * spatial, 1))
        init_dcgan(self)

    def forward(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        plane = self.condition_map(self.embed(condition)).view(len(images), 1, self.size, self.size)
        return self.head(self.features(torch.cat([images, plane], dim=1))).squeeze(1)


def init_dcgan(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def discriminator_loss(kind: str, real_logits, fake_logits, real_label: float) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label)) + \
        F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(kind: str, gen_logits) -> torch.Tensor:
    if kind == "hinge":
        return -gen_logits.mean()
    return F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))


LOSSES = ("bce", "hinge")


class CGANTrainer:
    """One adversarial step at a time; owns D and both optimisers (and, with EMA, the trained G)."""

    def __init__(self, generator: CGAN, discriminator: nn.Module | None = None):
        cfg = generator.config
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay {cfg.ema_decay} must be in [0, 1) (0: no moving average)")
        self.policy = parse_policy(cfg.augment)
        self.served = generator  # what the checkpoint saves and serving samples
        self.g = copy.deepcopy(generator) if cfg.ema_decay else generator  # what the optimiser trains
        device = next(generator.parameters()).device
        self.d = (discriminator or generator.make_discriminator()).to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.loss, self.real_label, self.mode_seeking = cfg.loss, cfg.real_label, cfg.mode_seeking

    def step(self, real: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        condition = self.g.training_condition(condition)
        half = len(real) // 2
        fake_condition = condition
        if self.mode_seeking:  # fakes i and half + i share a condition: pairs for the mode-seeking term
            fake_condition = torch.cat([condition[:half], condition[:half], condition[2 * half:]])
        z = torch.randn(len(real), self.g.latent_dim, device=real.device)
        fake = self.g(z, fake_condition)

        self.opt_d.zero_grad(set_to_none=True)
        real_logits = self.d(diff_augment(real, self.policy), condition)
        fake_logits = self.d(diff_augment(fake.detach(), self.policy), fake_condition)
        loss_d = discriminator_loss(self.loss, real_logits, fake_logits, self.real_label)
        loss_d.backward()
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=True)
        loss_g = generator_loss(self.loss, self.d(diff_augment(fake, self.policy), fake_condition))
        stats = {}
        if self.mode_seeking:
            # MSGAN (Mao et al. 2019): two z under one condition should give two different images;
            # penalise a small image distance per unit of z distance.
            ratio = (fake[:half] - fake[half : 2 * half]).abs().mean() / (z[:half] - z[half : 2 * half]).abs().mean()
            loss_g = loss_g + self.mode_seeking / (ratio + 1e-5)
            stats["ms_ratio"] = ratio.item()
        loss_g.backward()
        self.opt_g.step()
        if self.g is not self.served:
            ema_update(self.served, self.g, self.g.config.ema_decay)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), **stats,
                "d_real": torch.sigmoid(real_logits).mean().item(), "d_fake": torch.sigmoid(fake_logits).mean().item()}

    def extra_state(self) -> dict[str, nn.Module]:
        """Modules besides the generator that a resumed run needs (saved beside the weights)."""
        extra = {"discriminator": self.d, "optimizer_g": OptimizerState(self.opt_g),
                 "optimizer_d": OptimizerState(self.opt_d)}
        if self.g is not self.served:
            extra["online"] = self.g  # the trained weights; the checkpoint's own are their average
        return extra


CGAN.Trainer = CGANTrainer
