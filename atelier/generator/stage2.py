"""StackGAN stage 2 (Zhang et al. 2017): a refiner from a stage-1 image to 128 px (or 256 px).

Any single-stage model of this package is stage 1 (in practice a 64 px `mcgan`). It is frozen:
its weights never train here (no gradient, always in eval mode, so its batch-norm statistics
stay as they were), and stage 2 learns to turn its images into larger, sharper ones.

Generator, for an image_size S = 64 * 2**k and width g (`g_width`):
- x1 = stage1(z, condition), resized to 64 px if stage 1 is smaller or larger;
- encoder: 3x3 conv (g) + ReLU at 64 px, then two 4x4 stride-2 convs + BatchNorm + ReLU
  (2g at 32 px, 4g at 16 px);
- conditioning augmentation: the condition is embedded (`ca_dim` per attribute group), a linear
  layer gives mu and log sigma^2 (`ca_dim` each) and c = mu + sigma * eps while training
  (c = mu otherwise, so a seed always draws the same image). c is tiled over the 16 x 16 map,
  concatenated, and a 3x3 conv + BatchNorm + ReLU joins them back to 4g channels;
- `res_blocks` residual blocks (conv-BN-ReLU-conv-BN, plus the input, ReLU) at 16 px;
- upsampling blocks (nearest x2, 3x3 conv, BatchNorm, ReLU) halving the width each time
  (2g, g, g/2, ... at least 8) from 16 px to S; a 3x3 conv to the image channels; tanh.
There is no new noise input: stage 2's variety comes from z through stage 1 and from eps.

Discriminator, at S: a 4x4 stride-2 conv (d = `d_width`) + LeakyReLU, then 4x4 stride-2 convs
+ BatchNorm + LeakyReLU doubling the width (at most 8d) down to 4 x 4. Its own condition
embedding goes through a linear layer to a `ca_dim` code, tiled over the 4 x 4 map and
concatenated (StackGAN's joint conv): 3x3 conv + BatchNorm + LeakyReLU, then a 4x4 conv to
one logit.

Loss, StackGAN's matching-aware one (module-level functions below), with "wrong" = the
batch's conditions rolled by one (each real image paired with another row's condition; where
two rows share a condition that pair is not actually wrong, as in StackGAN):
  L_D = BCE(D(real, right), 1) + 0.5 * (BCE(D(fake, right), 0) + BCE(D(real, wrong), 0))
  L_G = BCE(D(fake, right), 1) + kl_weight * KL(N(mu, sigma^2) || N(0, I))
with the KL averaged over batch and dimensions (StackGAN's convention). Adam 2e-4, beta1 0.5
for the stage-2 parameters and D only. With stage 1 able to take partial requests (an "any"
embedding per group), groups are dropped from the condition with stage 1's own
`condition_dropout` unless set, so stage 2 serves the same partial requests.

Training input (`source`):
- `stage1` (StackGAN's): stage 2 refines stage 1's own drawings, drawn afresh every step. Cheap
  for a one-pass GAN, prohibitive for a flow (tens of network passes per drawing).
- `real`: stage 2 learns from the catalogue's own pairs: the real image shrunk to stage 1's size
  (area average) with Gaussian noise of std `source_noise` added (cascaded diffusion's noise
  conditioning augmentation, Ho et al. 2021: the refiner must not rely on clean inputs, since
  stage 1's drawings are not clean), refined back, and the output also pulled towards the real
  image by `l1_weight` x L1 (pix2pix's reconstruction term, Isola et al. 2017; weight 100 there).
  Stage 1 never runs in training; serving refines its drawings as with `stage1`.

Usage: `atelier train --model stage2 --catalogue <128 px catalogue> --set stage1=PATH`. On a
fresh run `stage1` is a checkpoint path: its schema must equal the catalogue's, its weights
are copied in, and `config.stage1` becomes {"family", "config", "path", "version",
"weights_sha256"}, so config.json says what stage 1 was and the checkpoint is self-contained
(stage 1's weights live under `stage1.` in weights.safetensors; the source may be deleted).
A resume may repeat `--set stage1=PATH` while that checkpoint holds the same weights, or leave
it out (the checkpoint holds stage 1); a stage 1 with other weights is refused. A fine-tune
(`--init STAGE2 --set stage1=PATH`) of a `source="real"` stage 2 may take another stage 1 of
the same size (e.g. the same flow trained longer): its training never ran stage 1. Sampling
options (`--sampling`) are stage 1's.

Data caveat: Fashion Product Images' sources are 60 x 80 px, so a 128 px (let alone 256 px)
catalogue holds upsampled photos. Stage 2 can then sharpen edges and add texture at best; it
cannot recover detail the data itself lacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, register
from atelier.generator.cgan import init_dcgan
from atelier.generator.checkpoint import OptimizerState
from atelier.generator.conditioning import (
    ConditionEmbedding,
    ConditioningAugmentation,
    drop_groups,
    kl_to_standard_normal,
    mismatched,
    reparameterise,
)

ENCODER_SIZE = 64  # the stage-1 image is resized to this before the encoder
JOINT_SIZE = 16  # where the condition code joins the image features


@dataclass
class Stage2Config:
    image_size: int = 128  # output: 64 * 2**k, larger than stage 1's (128 or 256 in practice)
    channels: int = 3
    stage1: Any = None  # a checkpoint path (fresh run) or the recorded dict (see the docstring)
    ca_dim: int = 128  # conditioning-augmentation code (and per-group embedding) size
    g_width: int = 32  # encoder widths g, 2g, 4g; the 16 px trunk is 4g
    d_width: int = 32  # first discriminator width; doubles per block, at most 8x
    res_blocks: int = 2
    lr: float = 2e-4
    beta1: float = 0.5
    kl_weight: float = 2.0  # StackGAN's stage-2 KL coefficient
    condition_dropout: float | None = None  # None: stage 1's own (0 when it takes no partial request)
    source: str = "stage1"  # what is refined in training: stage 1's drawings, or shrunk real images
    source_noise: float = 0.1  # std of the noise on the shrunk real images (source="real"; pixels in [-1, 1])
    l1_weight: float | None = None  # None: 100 with source="real" (pix2pix), 0 with "stage1" (no pair to match)


SOURCES = ("stage1", "real")


def output_plan(image_size: int, stage1_size: int) -> int:
    """Number of x2 upsamplings from the 16 px trunk to `image_size` (validated)."""
    ratio = image_size // ENCODER_SIZE
    if image_size < ENCODER_SIZE or image_size % ENCODER_SIZE or ratio & (ratio - 1):
        raise ValueError(f"stage2 image_size {image_size} must be 64 * 2**k (64, 128, 256, ...)")
    if image_size <= stage1_size:
        raise ValueError(f"stage2 image_size {image_size} must be larger than stage 1's {stage1_size} px "
                         "(a refiner upsamples: e.g. 128 or 256 from a 64 px stage 1)")
    return (image_size // JOINT_SIZE).bit_length() - 1


# -- losses (module level so they can be checked by hand) -----------------------------------------
def discriminator_loss(real_right: torch.Tensor, fake_right: torch.Tensor, real_wrong: torch.Tensor) -> torch.Tensor:
    """BCE(real, right -> 1) + 0.5 * (BCE(fake, right -> 0) + BCE(real, wrong -> 0)), on logits."""
    bce = F.binary_cross_entropy_with_logits
    return bce(real_right, torch.ones_like(real_right)) + 0.5 * (
        bce(fake_right, torch.zeros_like(fake_right)) + bce(real_wrong, torch.zeros_like(real_wrong)))


def generator_loss(fake_right: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """BCE(fake, right -> 1) + kl_weight * KL."""
    return F.binary_cross_entropy_with_logits(fake_right, torch.ones_like(fake_right)) + kl_weight * kl


# -- stage 1 ----------------------------------------------------------------------------------
def resolve_stage1(schema: AttributeSchema, spec: Any) -> tuple[ConditionalGenerator, dict[str, Any]]:
    """(stage-1 module, the dict to record as config.stage1) from a checkpoint path or that dict.

    From a path the module carries the checkpoint's weights; from a dict it is freshly built
    (a reload then fills it from the stage-2 checkpoint's weights).
    """
    from atelier.generator.checkpoint import build_from_config, load_generator  # checkpoint imports the registry

    if isinstance(spec, dict):
        missing = {"family", "config"} - set(spec)
        if missing:
            raise ValueError(f"stage2 config.stage1 dict lacks {sorted(missing)}")
        if spec["family"] == Stage2.family:
            raise ValueError("stage 1 must be a single-stage model, not a stage2 one")
        model = build_from_config({"family": spec["family"], "config": spec["config"], "schema": schema.to_dict()})
        return model, dict(spec)
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise ValueError("stage2 needs a stage-1 model: --set stage1=PATH (a 64 px checkpoint, e.g. an mcgan)")
    model, manifest = load_generator(Path(spec))
    if model.family == Stage2.family:
        raise ValueError(f"stage 1 must be a single-stage model; {spec} holds a stage2 one")
    difference = model.schema.describe_difference(schema)
    if difference:
        raise ValueError(f"stage 1 ({spec}) was trained on another schema than stage 2's catalogue: {difference}")
    record = {"family": model.family, "config": model.config_dict(), "path": str(spec),
              "version": manifest["version"], "weights_sha256": manifest["weights_sha256"]}
    return model, record


# -- generator --------------------------------------------------------------------------------
def conv_bn_relu(w_in: int, w_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(w_in, w_out, kernel, stride, (kernel - 1) // 2 if stride == 1 else 1, bias=False),
            nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(width, width),
                                  nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h + self.body(h))


@register
class Stage2(ConditionalGenerator):
    family = "stage2"
    Config = Stage2Config

    def __init__(self, schema: AttributeSchema, config: Stage2Config | None = None):
        config = config or Stage2Config()
        stage1, record = resolve_stage1(schema, config.stage1)
        if stage1.channels != config.channels:
            raise ValueError(f"stage 1 draws {stage1.channels}-channel images, stage 2 was asked for {config.channels}")
        doublings = output_plan(config.image_size, stage1.image_size)
        dropout = config.condition_dropout
        if dropout is None:
            dropout = float(getattr(stage1.config, "condition_dropout", 0.0)) if stage1.accepts_partial else 0.0
        elif dropout > 0 and not stage1.accepts_partial:
            raise ValueError(f"condition_dropout {dropout} needs a stage 1 that takes partial requests "
                             f"({stage1.family} does not)")
        if config.kl_weight < 0 or config.res_blocks < 0:
            raise ValueError("kl_weight and res_blocks must be >= 0")
        if config.source not in SOURCES:
            raise ValueError(f"stage2 source {config.source!r} is not one of {', '.join(SOURCES)} "
                             "(stage1: refine stage 1's drawings; real: learn from shrunk real images)")
        l1 = config.l1_weight if config.l1_weight is not None else (100.0 if config.source == "real" else 0.0)
        if l1 < 0 or config.source_noise < 0:
            raise ValueError("l1_weight and source_noise must be >= 0")
        super().__init__(schema, dataclasses.replace(config, stage1=record, condition_dropout=dropout, l1_weight=l1))

        self.stage1 = stage1
        self.stage1.requires_grad_(False)
        self.stage1.eval()

        g, ca = config.g_width, config.ca_dim
        trunk = 4 * g
        self.encoder = nn.Sequential(nn.Conv2d(config.channels, g, 3, 1, 1), nn.ReLU(inplace=True),
                                     *conv_bn_relu(g, 2 * g, 4, 2), *conv_bn_relu(2 * g, trunk, 4, 2))
        self.ca_embed = ConditionEmbedding(schema, ca, learn_any=stage1.accepts_partial)
        self.ca = ConditioningAugmentation(self.ca_embed.out_dim, ca)
        self.joint = nn.Sequential(*conv_bn_relu(trunk + ca, trunk))
        self.residual = nn.Sequential(*(ResidualBlock(trunk) for _ in range(config.res_blocks)))
        widths = [trunk] + [max(trunk >> (i + 1), 8) for i in range(doublings)]
        up: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), *conv_bn_relu(w_in, w_out)]
        self.upsample = nn.Sequential(*up)
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], config.channels, 3, 1, 1), nn.Tanh())
        self.widths = widths
        for module in (self.encoder, self.ca_embed, self.ca, self.joint, self.residual, self.upsample, self.to_image):
            init_dcgan(module)

    # stage 1 decides what z and which requests are accepted
    @property
    def latent_dim(self) -> int:
        return self.stage1.latent_dim

    @property
    def accepts_partial(self) -> bool:  # type: ignore[override]
        return self.stage1.accepts_partial

    def train(self, mode: bool = True) -> Stage2:
        super().train(mode)
        self.stage1.eval()  # frozen: batch-norm statistics stay stage 1's own
        return self

    def keeps_option(self, key: str, value: Any) -> bool:
        """A resume may repeat `--set stage1=PATH` if that checkpoint still holds the same weights."""
        if key == "stage1" and isinstance(value, (str, Path)):
            from atelier import artifacts

            try:
                manifest = artifacts.read_manifest(artifacts.resolve(Path(value)), "model", verify=False)
            except (OSError, artifacts.ArtifactError):
                return False
            return manifest["files"].get("weights.safetensors") == self.config.stage1.get("weights_sha256")
        return super().keeps_option(key, value)

    def changeable_options(self, fine_tune: bool) -> tuple[str, ...]:
        # trained on shrunk real photos, stage 2 never saw stage 1's drawings: a fine-tune may
        # refine another stage 1's (a longer-trained one); one trained on stage 1's drawings may not
        swappable = ("stage1",) if fine_tune and self.config.source == "real" else ()
        return (*super().changeable_options(fine_tune), *swappable)

    def change_options(self, changed: Mapping[str, Any]) -> None:
        changed = dict(changed)
        if "stage1" in changed:
            self.replace_stage1(changed.pop("stage1"))
        if changed:
            super().change_options(changed)

    def replace_stage1(self, spec: Any) -> None:
        """Refine the drawings of another stage 1 (a checkpoint path) of the same size, channels
        and partial requests; its weights are copied in and config.stage1 records it."""
        stage1, record = resolve_stage1(self.schema, spec)
        old = self.stage1
        shape = lambda m: (m.image_size, m.channels, m.accepts_partial)  # noqa: E731
        if shape(stage1) != shape(old):
            raise ValueError(f"stage 1 ({spec}) draws (size, channels, partial requests) {shape(stage1)}; "
                             f"this stage 2 was trained for {shape(old)}")
        stage1.requires_grad_(False)
        self.stage1 = stage1.to(next(old.parameters()).device).eval()
        self.config = dataclasses.replace(self.config, stage1=record)

    def sampling(self) -> dict[str, Any]:
        """Stage 2 draws as its stage 1 does: the sampling options are stage 1's (a flow's guidance)."""
        return self.stage1.sampling()

    def with_sampling(self, options: Mapping[str, Any]) -> Stage2:
        try:
            self.stage1.with_sampling(options)
        except ValueError as e:
            raise ValueError(f"stage2's sampling options are its stage 1's: {e}") from e
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def generate(self, z: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, conditioning-augmentation KL) — the trainer needs both."""
        with torch.no_grad():
            low = self.stage1(z, condition)
        return self.refine(low, condition)

    def shrink(self, real: torch.Tensor) -> torch.Tensor:
        """What `source="real"` refines in training: the real image at stage 1's size, plus noise."""
        size = self.stage1.image_size
        low = F.interpolate(real, size=(size, size), mode="area") if real.shape[-1] != size else real
        return low + self.config.source_noise * torch.randn_like(low)

    def refine(self, low: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage-1-sized image -> output image, conditioning-augmentation KL)."""
        if low.shape[-2:] != (ENCODER_SIZE, ENCODER_SIZE):
            low = F.interpolate(low, size=(ENCODER_SIZE, ENCODER_SIZE), mode="bilinear", align_corners=False)
        h = self.encoder(low)
        mu, logvar = self.ca(self.ca_embed(condition))
        code = reparameterise(mu, logvar, torch.randn_like(mu)) if self.training else mu
        h = torch.cat([h, code[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])], dim=1)
        h = self.residual(self.joint(h))
        return self.to_image(self.upsample(h)), kl_to_standard_normal(mu, logvar)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.generate(z, condition)[0]

    def make_discriminator(self) -> nn.Module:
        return Stage2Discriminator(self.schema, self.config, learn_any=self.accepts_partial)

    def training_condition(self, condition: torch.Tensor) -> torch.Tensor:
        return drop_groups(condition, self.ca_embed.sizes, self.config.condition_dropout)


class Stage2Discriminator(nn.Module):
    def __init__(self, schema: AttributeSchema, config: Stage2Config, learn_any: bool = False):
        super().__init__()
        d, ca = config.d_width, config.ca_dim
        layers: list[nn.Module] = [nn.Conv2d(config.channels, d, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        w, spatial = d, config.image_size // 2
        while spatial > 4:
            w_out = min(2 * w, 8 * d)
            layers += [nn.Conv2d(w, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, inplace=True)]
            w, spatial = w_out, spatial // 2
        self.features = nn.Sequential(*layers)
        self.embed = ConditionEmbedding(schema, ca, learn_any=learn_any)
        self.code = nn.Sequential(nn.Linear(self.embed.out_dim, ca), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(nn.Conv2d(w + ca, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(w, 1, 4, 1, 0))
        init_dcgan(self)

    def forward(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.features(images)
        code = self.code(self.embed(condition))[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return self.joint(torch.cat([h, code], dim=1)).flatten()


class Stage2Trainer:
    """One matching-aware adversarial step at a time; owns D and both optimisers (not stage 1)."""

    def __init__(self, generator: Stage2, discriminator: nn.Module | None = None):
        cfg = generator.config
        self.g = generator
        device = next(generator.parameters()).device
        self.d = (discriminator or generator.make_discriminator()).to(device)
        self.opt_g = torch.optim.Adam(generator.trainable_parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.kl_weight = cfg.kl_weight
        self.from_real = cfg.source == "real"
        self.l1_weight = cfg.l1_weight

    def step(self, real: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        condition = self.g.training_condition(condition)
        wrong, _ = mismatched(condition)  # StackGAN keeps rows whose neighbour shares their condition
        if self.from_real:
            fake, kl = self.g.refine(self.g.shrink(real), condition)
        else:
            z = torch.randn(len(real), self.g.latent_dim, device=real.device)
            fake, kl = self.g.generate(z, condition)

        self.opt_d.zero_grad(set_to_none=True)
        real_right = self.d(real, condition)
        fake_right = self.d(fake.detach(), condition)
        real_wrong = self.d(real, wrong)
        loss_d = discriminator_loss(real_right, fake_right, real_wrong)
        loss_d.backward()
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=True)
        loss_g = generator_loss(self.d(fake, condition), kl, self.kl_weight)
        l1 = (fake - real).abs().mean() if self.l1_weight else fake.new_zeros(())
        (loss_g + self.l1_weight * l1).backward()
        self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "kl": kl.item(), "l1": l1.item(),
                "d_real": torch.sigmoid(real_right).mean().item(), "d_fake": torch.sigmoid(fake_right).mean().item(),
                "d_wrong": torch.sigmoid(real_wrong).mean().item()}

    def extra_state(self) -> dict[str, nn.Module]:
        return {"discriminator": self.d, "optimizer_g": OptimizerState(self.opt_g),
                "optimizer_d": OptimizerState(self.opt_d)}


Stage2.Trainer = Stage2Trainer
