"""Conditional VAE (Sohn et al. 2015): an encoder q(z | x, y) and a decoder p(x | z, y).

Decoder (`forward(z, condition)`, what sampling uses): the condition is embedded (one
embedding per attribute group) and concatenated with z; a linear layer makes a `base x base`
feature map, then transposed convolutions double it up to `image_size` (the CGAN generator's
plan) and a 3x3 convolution gives one logit per pixel. The image is 2 * sigmoid(logit) - 1,
so the interface stays [-1, 1]. Sampling draws z ~ N(0, I) with the condition.

Encoder (`encode(images, condition) -> (mu, logvar)`): the condition embedding is mapped by a
linear layer to H*W values and appended to the image as one extra channel; strided
convolutions then a linear layer give mu and log sigma^2. It lives in the model, so it is
saved with the weights and a checkpoint can encode images later.

Loss: reconstruction + kl_weight * KL(q(z | x, y) || N(0, I)), each summed over pixels (or
latent dimensions) per image and averaged over the batch. The reconstruction is the Bernoulli
log-likelihood (BCE on the logits, pixels mapped to [0, 1]) or the sum of squared errors in
[-1, 1]. The KL weight may rise linearly from 0 over `kl_anneal_steps` (KL annealing, against
posterior collapse early on); the step count is a buffer in the weights, so a resumed run
goes on where it stopped. No batch normalisation: the model behaves the same in training and
in eval mode, so encoding one image does not depend on batch statistics.

With `condition_dropout` > 0 the model learns an "any" embedding per group, as the MCGAN does,
and accepts requests that leave a group out.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, register
from atelier.generator.cgan import upsampling_plan
from atelier.generator.checkpoint import OptimizerState
from atelier.generator.conditioning import ConditionEmbedding, drop_groups, kl_to_standard_normal

RECONSTRUCTIONS = ("bce", "mse")


@dataclass
class CVAEConfig:
    image_size: int = 28
    channels: int = 1
    latent_dim: int = 32
    embed_dim: int = 50
    width: int = 32  # channels of the last decoder block (and first encoder block); doubles per block
    lr: float = 1e-3
    kl_weight: float = 1.0
    kl_anneal_steps: int = 0  # raise the KL weight linearly from 0 over this many steps; 0: full weight at once
    recon: str = "bce"  # "bce" (Bernoulli, on logits) or "mse" (sum of squared errors in [-1, 1])
    condition_dropout: float = 0.0  # > 0: drop groups in training and learn an "any" embedding per group


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)): summed over latent dimensions (the ELBO's), averaged over the batch."""
    return kl_to_standard_normal(mu, logvar) * mu.shape[1]  # that one averages over dimensions too


def reconstruction_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image sum over pixels, averaged over the batch; `target` is in [-1, 1]."""
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, (target + 1) / 2, reduction="none")
    elif kind == "mse":
        per_pixel = (logits_to_images(logits) - target).pow(2)
    else:
        raise ValueError(f"unknown recon {kind!r}; allowed: {', '.join(RECONSTRUCTIONS)}")
    return per_pixel.flatten(1).sum(dim=1).mean()


def kl_weight_at(step: int, weight: float, anneal_steps: int) -> float:
    """The KL weight at training step `step` (0-based): linear warm-up from 0, then `weight`."""
    if anneal_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, step / anneal_steps)


def logits_to_images(logits: torch.Tensor) -> torch.Tensor:
    return 2 * torch.sigmoid(logits) - 1


@register
class CVAE(ConditionalGenerator):
    family = "cvae"
    Config = CVAEConfig

    def __init__(self, schema: AttributeSchema, config: CVAEConfig | None = None):
        config = config or CVAEConfig()
        if config.recon not in RECONSTRUCTIONS:
            raise ValueError(f"unknown recon {config.recon!r}; allowed: {', '.join(RECONSTRUCTIONS)}")
        if config.kl_weight < 0 or config.kl_anneal_steps < 0:
            raise ValueError(f"kl_weight ({config.kl_weight}) and kl_anneal_steps ({config.kl_anneal_steps}) "
                             "must be >= 0")
        if not 0 <= config.condition_dropout < 1:
            raise ValueError(f"condition_dropout {config.condition_dropout} must be in [0, 1)")
        super().__init__(schema, config)
        self.base, doublings = upsampling_plan(config.image_size)
        widths = [config.width * 2 ** (doublings - i) for i in range(doublings + 1)]
        self.widths = widths
        size = config.image_size
        # One embedding serves encoder and decoder (the same y conditions q and p).
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=config.condition_dropout > 0)

        # Encoder. The condition goes in as one learned H x W plane rather than tiled one-hot
        # channels: one extra channel whatever the vocabulary (Fashion Product Images has dozens
        # of values), multi-label groups and the "any" embedding come for free, and it is the
        # CGAN discriminator's well-tried way of showing a convolution the condition.
        self.condition_map = nn.Linear(self.embed.out_dim, size * size)
        layers, w_in = [], config.channels + 1
        for w in reversed(widths[1:]):  # image_size -> base, widening as it shrinks
            layers += [nn.Conv2d(w_in, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            w_in = w
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_posterior = nn.Linear(w_in * self.base**2, 2 * config.latent_dim)

        # Decoder: [z, embed(y)] -> base x base x widths[0] -> ... -> image_size, one logit per pixel.
        self.project = nn.Sequential(
            nn.Linear(config.latent_dim + self.embed.out_dim, widths[0] * self.base**2), nn.ReLU(inplace=True))
        blocks = []
        for w_in, w_out in pairwise(widths):
            blocks += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_logits = nn.Conv2d(widths[-1], config.channels, 3, 1, 1)

        # Optimisation steps taken: drives the KL warm-up and is saved with the weights.
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def accepts_partial(self) -> bool:  # type: ignore[override]  (per instance: depends on the config)
        return self.config.condition_dropout > 0

    def encode(self, images: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, y): (mu, logvar), each (N, latent_dim); images in [-1, 1], NCHW."""
        size = self.config.image_size
        plane = self.condition_map(self.embed(condition)).view(len(images), 1, size, size)
        mu, logvar = self.to_posterior(self.encoder(torch.cat([images, plane], dim=1))).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(condition)], dim=1))
        return self.to_logits(self.blocks(h.view(len(z), self.widths[0], self.base, self.base)))

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The decoder: images in [-1, 1], (N, C, H, W)."""
        return logits_to_images(self.decode_logits(z, condition))

    can_edit = True

    def invert(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The posterior mean: decoding it under another condition is the edit."""
        return self.encode(images, condition)[0]

    def reconstruct(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image (no sampling): images in [-1, 1]."""
        mu, _ = self.encode(images, condition)
        return self(mu, condition)

    def training_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition a training step uses: groups dropped at random when learning "any"."""
        return drop_groups(condition, self.embed.sizes, self.config.condition_dropout)


class CVAETrainer:
    """One step of the negative ELBO (reparameterised), Adam on all of the model's parameters."""

    def __init__(self, model: CVAE):
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)

    def step(self, real: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        model, cfg = self.model, self.model.config
        condition = model.training_condition(condition)
        mu, logvar = model.encode(real, condition)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = reconstruction_loss(cfg.recon, model.decode_logits(z, condition), real)
        kl = kl_divergence(mu, logvar)
        weight = kl_weight_at(int(model.trained_steps), cfg.kl_weight, cfg.kl_anneal_steps)
        loss = recon + weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        model.trained_steps += 1
        return {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "kl_weight": weight}

    def extra_state(self) -> dict[str, nn.Module]:
        """The optimizer's state: the encoder and the step count are in the model's weights."""
        return {"optimizer": OptimizerState(self.opt)}


CVAE.Trainer = CVAETrainer
