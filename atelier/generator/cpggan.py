"""Conditional progressive GAN (CPGGAN) and its disentangled variant (CDPGGAN), after the seed.

Progressive growing (Karras et al. 2018): training starts at `start_size` (4 x 4) and adds a
block per doubling up to `image_size`. Each new block first fades in: the output at the new
resolution is `(1 - alpha) * upsample(rgb_old) + alpha * rgb_new`, alpha rising linearly from
0 to 1 over `phase_images` images, then trains stable for as many. The discriminator grows
mirror-wise (its new input block blends with the downsampled image the same way) and real
images are blended between the two resolutions with the same alpha. Progress is a counter
buffer in the generator (`images_shown`), saved with the weights, so a run resumes at any phase.
Until the last phase, sampling returns the current resolution upsampled to `image_size`.

Generator: the condition is embedded (one embedding per group, learned "any" for dropped
groups) and goes through conditioning augmentation (StackGAN): a linear map to (mu, log sigma)
of `ca_dim` numbers, code = mu + sigma * eps with eps part of the latent vector (so a seed
fixes it too), KL(N(mu, sigma) || N(0, I)) (mean over dimensions) penalised with weight `kl_weight`. The code is
concatenated with z; a linear layer makes the 4 x 4 map; each block is nearest upsampling and
two 3 x 3 convolutions with pixel norm and leaky ReLU; a 1 x 1 "to RGB" per resolution.
Discriminator: "from RGB" 1 x 1 per resolution, blocks of two 3 x 3 convolutions and average
pooling down to 4 x 4, where the minibatch standard deviation and the condition (its own
embedding, tiled over the 4 x 4 map) are concatenated before the last convolution and the
linear logit.

Losses (`loss`): "lse", the seed's text (least squares with a mismatched pair):
  L_D = E_real,right[(D - 1)^2] + E_fake[(D + 1)^2] + E_real,wrong[(D + 1)^2],  L_G = E_fake[D^2]
and "wgan-gp-mismatch", the seed's code:
  L_D = -(D(x, e) - D(G(z, e), e)) - (D(x, e) - D(x, e_wrong)) + lambda * GP,  L_G = -D(G(z, e), e)
"wrong" pairs a real image with another image's condition (rows whose conditions happen to
agree are left out). Both add `kl_weight * KL` to L_G (conditioning augmentation). The WGAN
variant adds PGGAN's drift term `drift * E[D(x, e)^2 + D(x, e_wrong)^2]` to L_D (`drift=0` is the
seed's code as written; it diverged here, see CPGGANConfig.drift).

CDPGGAN adds the seed's per-field consistency penalty to L_G: for each weighted field f,
`L_f = E |x1 - x2|` over pairs of generated images that share f's value (other fields and z
drawn independently). `consistency_space="pixels"` is the seed's; a pixel penalty pulls every
sample of a category towards one image, so "lowpass" (8 x 8 grey silhouettes) and "features"
(the discriminator's 4 x 4 features) are offered as remedies that constrain shape, not texture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, register
from atelier.generator.checkpoint import OptimizerState
from atelier.generator.conditioning import (
    ConditionEmbedding,
    ConditioningAugmentation,
    drop_groups,
    kl_to_standard_normal,
    mismatched,
    reparameterise,
)

LOSSES = ("lse", "wgan-gp-mismatch")
CONSISTENCY_SPACES = ("pixels", "lowpass", "features")


@dataclass
class CPGGANConfig:
    image_size: int = 64  # the last resolution
    channels: int = 3
    start_size: int = 4
    latent_dim: int = 100  # z only; the conditioning-augmentation noise adds ca_dim more
    embed_dim: int = 32  # per attribute group
    ca_dim: int = 64
    g_width: int = 16  # channels at image_size; doubles per halving of resolution, up to max_width
    d_width: int = 16
    max_width: int = 128
    phase_images: int = 20_000  # images per fade-in and per stable phase
    batch_sizes: str = "4:64,8:64,16:64,32:32,64:32"  # per resolution; others use the nearest below
    loss: str = "lse"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    gp_weight: float = 10.0  # wgan-gp-mismatch
    # wgan-gp-mismatch: PGGAN's drift penalty, weight * E[D(x, e)^2 + D(x, e_wrong)^2]. The gradient
    # penalty does not bound how D scores a real image with a wrong condition, and without this the
    # seed's loss diverged (L_D -2.4e6 after 12,500 images on Fashion Product Images at 8 px).
    drift: float = 1e-3
    kl_weight: float = 1.0
    condition_dropout: float = 0.1  # teaches the "any" embeddings, as in MCGAN


def resolutions(config: CPGGANConfig) -> list[int]:
    sizes, size = [], config.start_size
    while size <= config.image_size:
        sizes.append(size)
        size *= 2
    if sizes[-1] != config.image_size:
        raise ValueError(f"image_size {config.image_size} must be start_size {config.start_size} times a power of 2")
    return sizes


def phase_at(images_shown: int, config: CPGGANConfig) -> tuple[int, float]:
    """(resolution index, alpha): stable at the start size, then fade-in + stable per doubling."""
    phase = int(images_shown) // config.phase_images
    last = len(resolutions(config)) - 1
    if phase == 0:
        return 0, 1.0
    level = (phase + 1) // 2  # phases 1, 2 -> level 1 (fade, stable); 3, 4 -> level 2 ...
    if level > last:
        return last, 1.0
    if phase % 2 == 1:  # fading in
        return level, (int(images_shown) % config.phase_images) / config.phase_images
    return level, 1.0


def batch_size_for(resolution: int, spec: str) -> int:
    table = {}
    for item in spec.split(","):
        size, _, batch = item.partition(":")
        table[int(size)] = int(batch)
    below = [s for s in table if s <= resolution]
    if not below:
        raise ValueError(f"batch_sizes {spec!r} gives no batch size for {resolution} px")
    return table[max(below)]


def fade(old: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """The fade-in blend: old (already upsampled to new's size) -> new as alpha goes 0 -> 1."""
    return old if alpha <= 0 else new if alpha >= 1 else torch.lerp(old, new, alpha)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def conv_block(c_in: int, c_out: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [nn.Conv2d(c, c_out, 3, 1, 1), nn.LeakyReLU(0.2)]
        if norm:
            layers.append(PixelNorm())
    return nn.Sequential(*layers)


def widths(config: CPGGANConfig, base: int) -> list[int]:
    """Channels per resolution, smallest resolution first."""
    sizes = resolutions(config)
    return [min(base * config.image_size // s, config.max_width) for s in sizes]


@register
class CPGGAN(ConditionalGenerator):
    family = "cpggan"
    Config = CPGGANConfig
    accepts_partial = True

    def __init__(self, schema: AttributeSchema, config: CPGGANConfig | None = None):
        config = config or CPGGANConfig()
        if config.loss not in LOSSES:
            raise ValueError(f"unknown loss {config.loss!r}; allowed: {', '.join(LOSSES)}")
        super().__init__(schema, config)
        self.sizes = resolutions(config)
        for s in self.sizes:
            batch_size_for(s, config.batch_sizes)  # a bad table fails now, not hours in
        w = widths(config, config.g_width)
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=True)
        self.ca = ConditioningAugmentation(self.embed.out_dim, config.ca_dim)
        start = config.start_size
        self.project = nn.Sequential(nn.Linear(config.latent_dim + config.ca_dim, w[0] * start * start), nn.LeakyReLU(0.2))
        self.first = nn.Sequential(PixelNorm(), nn.Conv2d(w[0], w[0], 3, 1, 1), nn.LeakyReLU(0.2), PixelNorm())
        self.blocks = nn.ModuleList(conv_block(a, b, norm=True) for a, b in zip(w, w[1:]))
        self.to_rgb = nn.ModuleList(nn.Conv2d(c, config.channels, 1) for c in w)
        self.widths = w
        self.register_buffer("images_shown", torch.zeros((), dtype=torch.int64))

    @property
    def latent_dim(self) -> int:  # z, then the conditioning-augmentation noise
        return self.config.latent_dim + self.config.ca_dim

    def phase(self) -> tuple[int, float]:
        return phase_at(int(self.images_shown), self.config)

    def generate(self, z: torch.Tensor, condition: torch.Tensor, level: int | None = None, alpha: float = 1.0):
        """Images at the resolution of `level` (default: the current phase), plus CA's mu, logvar."""
        if level is None:
            level, alpha = self.phase()
        z_image, eps = z.split([self.config.latent_dim, self.config.ca_dim], dim=1)
        mu, logvar = self.ca(self.embed(condition))
        code = reparameterise(mu, logvar, eps)
        h = self.project(torch.cat([z_image, code], dim=1))
        h = self.first(h.view(len(z), self.widths[0], self.config.start_size, self.config.start_size))
        previous = h
        for block in self.blocks[:level]:
            previous = h
            h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
        image = self.to_rgb[level](h)
        if level > 0 and alpha < 1:
            old = F.interpolate(self.to_rgb[level - 1](previous), scale_factor=2, mode="nearest")
            image = fade(old, image, alpha)
        return torch.tanh(image), mu, logvar

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        images, _, _ = self.generate(z, condition)
        if images.shape[-1] != self.config.image_size:
            images = F.interpolate(images, size=self.config.image_size, mode="nearest")
        return images

    def make_discriminator(self) -> ProgressiveDiscriminator:
        return ProgressiveDiscriminator(self.schema, self.config)

    def consistency_weights(self) -> dict[int, float]:
        """Group index -> weight of its consistency penalty (CDPGGAN); none here."""
        return {}


class ProgressiveDiscriminator(nn.Module):
    def __init__(self, schema: AttributeSchema, config: CPGGANConfig):
        super().__init__()
        w = widths(config, config.d_width)
        self.from_rgb = nn.ModuleList(nn.Sequential(nn.Conv2d(config.channels, c, 1), nn.LeakyReLU(0.2)) for c in w)
        # blocks[i] takes resolution level i + 1 down to level i
        self.blocks = nn.ModuleList(nn.Sequential(conv_block(b, a, norm=False), nn.AvgPool2d(2)) for a, b in zip(w, w[1:]))
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=True)
        self.condition_map = nn.Linear(self.embed.out_dim, config.ca_dim)
        start = config.start_size
        self.last = nn.Sequential(nn.Conv2d(w[0] + 1 + config.ca_dim, w[0], 3, 1, 1), nn.LeakyReLU(0.2), nn.Flatten(),
                                  nn.Linear(w[0] * start * start, w[0]), nn.LeakyReLU(0.2), nn.Linear(w[0], 1))

    def features(self, images: torch.Tensor, level: int, alpha: float = 1.0) -> torch.Tensor:
        """The 4 x 4 feature map of images at resolution level `level`."""
        h = self.from_rgb[level](images)
        if level > 0:
            h = self.blocks[level - 1](h)
            if alpha < 1:
                h = fade(self.from_rgb[level - 1](F.avg_pool2d(images, 2)), h, alpha)
            for i in range(level - 2, -1, -1):
                h = self.blocks[i](h)
        return h

    def forward(self, images: torch.Tensor, condition: torch.Tensor, level: int, alpha: float = 1.0) -> torch.Tensor:
        h = self.features(images, level, alpha)
        std = torch.sqrt(h.var(dim=0, unbiased=False) + 1e-8).mean().expand(len(h), 1, *h.shape[2:])
        code = self.condition_map(self.embed(condition))[:, :, None, None].expand(-1, -1, *h.shape[2:])
        return self.last(torch.cat([h, std, code], dim=1)).squeeze(1)


# -- losses (module-level so tests can check them against hand computations) -------------------
def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """The mean, or 0 for an empty tensor (a batch with no mismatched pair has no wrong term)."""
    return x.mean() if x.numel() else x.new_zeros(())


def lse_discriminator_loss(real_right, fake, real_wrong) -> torch.Tensor:
    return (real_right - 1).pow(2).mean() + (fake + 1).pow(2).mean() + mean_or_zero((real_wrong + 1).pow(2))


def lse_generator_loss(fake) -> torch.Tensor:
    return fake.pow(2).mean()


def wgan_mismatch_discriminator_loss(real_right, fake, real_wrong, gradient_penalty) -> torch.Tensor:
    wrong_term = real_right.mean() - real_wrong.mean() if real_wrong.numel() else real_right.new_zeros(())
    return -(real_right.mean() - fake.mean()) - wrong_term + gradient_penalty


def drift_penalty(*logits: torch.Tensor) -> torch.Tensor:
    """PGGAN's drift term: the mean squared logit, keeping the critic's scale from wandering off."""
    return sum(mean_or_zero(x.pow(2)) for x in logits)


def wgan_generator_loss(fake) -> torch.Tensor:
    return -fake.mean()


def gradient_penalty(d: ProgressiveDiscriminator, real, fake, condition, level, alpha) -> torch.Tensor:
    """E[(||grad_x D(x_hat, e)|| - 1)^2] at random points between real and fake images."""
    t = torch.rand(len(real), 1, 1, 1, device=real.device)
    mixed = torch.lerp(real, fake, t).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(mixed, condition, level, alpha).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def real_at(images: torch.Tensor, size: int, alpha: float) -> torch.Tensor:
    """Real images at `size`, blended with the previous resolution while it fades in (as G is)."""
    scaled = F.interpolate(images, size=size, mode="area") if images.shape[-1] != size else images
    if alpha >= 1:
        return scaled
    coarse = F.interpolate(F.avg_pool2d(scaled, 2), scale_factor=2, mode="nearest")
    return fade(coarse, scaled, alpha)


def share_field(condition: torch.Tensor, sizes: list[int], group: int) -> torch.Tensor:
    """Partner conditions: group `group` as in `condition`, the other groups from other rows."""
    blocks = list(torch.split(condition.roll(1, dims=0), sizes, dim=1))
    blocks[group] = torch.split(condition, sizes, dim=1)[group]
    return torch.cat(blocks, dim=1)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, space: str, d=None, level=0, alpha=1.0) -> torch.Tensor:
    """Mean |a - b| in pixels, in 8 x 8 grey silhouettes, or in D's 4 x 4 features."""
    if space == "lowpass":
        a, b = (F.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), 8) for x in (a, b))
    elif space == "features":
        a, b = d.features(a, level, alpha), d.features(b, level, alpha)
    return (a - b).abs().mean()


class CPGGANTrainer:
    """One adversarial step at the generator's current phase; owns D and both optimisers."""

    def __init__(self, generator: CPGGAN):
        cfg = generator.config
        self.g, self.cfg = generator, cfg
        device = next(generator.parameters()).device
        self.d = generator.make_discriminator().to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.weights = generator.consistency_weights()

    @property
    def batch_size(self) -> int:
        level, _ = self.g.phase()
        return batch_size_for(self.g.sizes[level], self.cfg.batch_sizes)

    def step(self, real: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        level, alpha = self.g.phase()
        size = self.g.sizes[level]
        wrong, differs = mismatched(condition)  # from the full conditions: "any" is never wrong
        condition = drop_groups(condition, self.g.embed.sizes, self.cfg.condition_dropout)
        real = real_at(real, size, alpha)
        z = torch.randn(len(real), self.g.latent_dim, device=real.device)
        fake, mu, logvar = self.g.generate(z, condition, level, alpha)

        self.opt_d.zero_grad(set_to_none=True)
        d_right = self.d(real, condition, level, alpha)
        d_fake = self.d(fake.detach(), condition, level, alpha)
        # with no mismatched row in the batch, d_wrong is empty and its terms contribute nothing
        d_wrong = self.d(real[differs], wrong[differs], level, alpha) if differs.any() else d_right[:0]
        if self.cfg.loss == "lse":
            loss_d = lse_discriminator_loss(d_right, d_fake, d_wrong)
            stats = {}
        else:
            gp = gradient_penalty(self.d, real, fake.detach(), condition, level, alpha)
            loss_d = wgan_mismatch_discriminator_loss(d_right, d_fake, d_wrong, self.cfg.gp_weight * gp)
            loss_d = loss_d + self.cfg.drift * drift_penalty(d_right, d_wrong)
            stats = {"gp": gp.item()}
        loss_d.backward()
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=True)
        d_gen = self.d(fake, condition, level, alpha)
        adversarial = lse_generator_loss(d_gen) if self.cfg.loss == "lse" else wgan_generator_loss(d_gen)
        kl = kl_to_standard_normal(mu, logvar)
        loss_g = adversarial + self.cfg.kl_weight * kl
        for group, weight in self.weights.items():
            # pairs share this field's value; rows where dropout left the field unspecified do not count
            specified = torch.split(condition, self.g.embed.sizes, dim=1)[group].sum(dim=1) > 0
            if not specified.any():
                continue
            partner = share_field(condition, self.g.embed.sizes, group)
            other, _, _ = self.g.generate(torch.randn_like(z), partner, level, alpha)
            term = consistency_distance(fake[specified], other[specified], self.cfg.consistency_space,
                                        self.d, level, alpha)
            loss_g = loss_g + weight * term
            stats[f"consistency_{self.g.schema.groups[group].name}"] = term.item()
        loss_g.backward()
        self.opt_g.step()
        self.g.images_shown += len(real)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "kl": kl.item(), **stats,
                "resolution": float(size), "alpha": alpha}

    def extra_state(self) -> dict[str, nn.Module]:
        return {"discriminator": self.d, "optimizer_g": OptimizerState(self.opt_g),
                "optimizer_d": OptimizerState(self.opt_d)}


CPGGAN.Trainer = CPGGANTrainer


@dataclass
class CDPGGANConfig(CPGGANConfig):
    consistency: str = ""  # "type=1.0,colour=0.5"; empty: the first group (the category) at weight 1
    consistency_space: str = "pixels"  # the seed's; "lowpass" or "features" constrain shape, not texture


@register
class CDPGGAN(CPGGAN):
    family = "cdpggan"
    Config = CDPGGANConfig

    def __init__(self, schema: AttributeSchema, config: CDPGGANConfig | None = None):
        config = config or CDPGGANConfig()
        if config.consistency_space not in CONSISTENCY_SPACES:
            raise ValueError(f"unknown consistency_space {config.consistency_space!r}; "
                             f"allowed: {', '.join(CONSISTENCY_SPACES)}")
        super().__init__(schema, config)
        self.consistency_weights()  # a bad field name fails at construction

    def consistency_weights(self) -> dict[int, float]:
        """Group index -> weight, from `consistency`."""
        spec = self.config.consistency.strip() or f"{self.schema.groups[0].name}=1.0"
        names = [g.name for g in self.schema.groups]
        weights = {}
        for item in spec.split(","):
            name, _, weight = item.partition("=")
            name = name.strip()
            if name not in names:
                raise ValueError(f"consistency field {name!r} is not in the schema; allowed: {', '.join(names)}")
            value = float(weight) if weight.strip() else 1.0
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"consistency weight for {name!r} must be a finite number >= 0, got {weight!r}")
            weights[names.index(name)] = value
        return weights
