"""The interface every conditional generator implements, and the registry of families.

A generator maps (z, condition vector) to images in [-1, 1], NCHW. Callers outside training
use `sample(attributes, n, seed)`, which returns uint8 (n, H, W, C) ready to embed or encode.
Families register under a name (`--model cgan`) in `FAMILIES`; each brings a `Trainer` that
the training loop drives through the `Trainer` protocol below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from atelier.catalog.schema import AttributeSchema, AttributeValues
from atelier.registry import Registry

FAMILIES: Registry[type[ConditionalGenerator]] = Registry("model family")


def register(cls: type[ConditionalGenerator]) -> type[ConditionalGenerator]:
    """Class decorator: register a family under its `family` name (a second one is refused)."""
    FAMILIES.add(cls.family, cls)
    return cls


def family(name: str) -> type[ConditionalGenerator]:
    return FAMILIES.get(name)


class Trainer(Protocol):
    """What `atelier.generator.train` asks of a family's `Trainer(model)`.

    `step` runs one optimisation step on a batch (images in [-1, 1], NCHW, and their condition
    vectors) and returns its losses by name, for the log and the manifest. `extra_state` names
    the modules besides the model a resumed run needs (a discriminator, an optimizer's state);
    each is saved as `<name>.safetensors` beside the weights and loaded back on `--resume`.
    A progressive trainer may also expose `batch_size`, the batch it wants at its current stage.
    """

    def __init__(self, model: ConditionalGenerator) -> None: ...

    def step(self, images: torch.Tensor, condition: torch.Tensor) -> dict[str, float]: ...

    def extra_state(self) -> dict[str, nn.Module]: ...


class ConditionalGenerator(nn.Module):
    family: ClassVar[str]
    Config: ClassVar[type]  # a dataclass of architecture hyper-parameters
    Trainer: ClassVar[type[Trainer]]
    accepts_partial: ClassVar[bool] = False  # may a request leave a single-label group out?
    # config fields a served copy may set without retraining (how it samples, not what it learned)
    SAMPLING_OPTIONS: ClassVar[tuple[str, ...]] = ()
    # config fields a resumed or fine-tuned run may change: how the rest of the run trains (its
    # learning-rate schedule, its EMA), not the network it trains
    SCHEDULE_OPTIONS: ClassVar[tuple[str, ...]] = ()
    can_edit: ClassVar[bool] = False  # implements `invert`, so `edit_conditions` can redraw a given image

    def __init__(self, schema: AttributeSchema, config: Any):
        super().__init__()
        self.schema = schema
        self.config = config

    # subclasses: forward(z, condition) -> images in [-1, 1], (N, C, H, W)
    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.channels

    def keeps_option(self, key: str, value: Any) -> bool:
        """Does `--set key=value` describe this loaded model as it is? (resume and fine-tune refuse changes)"""
        return getattr(self.config, key, value) == value

    def check_config(self, config: Any) -> None:
        """Raise ValueError naming what is allowed if `config` is not a valid one for the family."""

    def changeable_options(self, fine_tune: bool) -> tuple[str, ...]:
        """Config fields `--set` may change on this loaded model: its SCHEDULE_OPTIONS on a resume;
        a family whose training never used some part may let a fine-tune (`--init`) replace it."""
        return self.SCHEDULE_OPTIONS

    def change_options(self, changed: Mapping[str, Any]) -> None:
        """Apply `--set` changes that `changeable_options` allows (recorded in the config)."""
        config = dataclasses.replace(self.config, **changed)
        self.check_config(config)
        self.config = config

    def sampling(self) -> dict[str, Any]:
        """How this copy draws now: its `SAMPLING_OPTIONS` and their values."""
        return {k: getattr(self.config, k) for k in self.SAMPLING_OPTIONS}

    def with_sampling(self, options: Mapping[str, Any]) -> ConditionalGenerator:
        """Set sampling options (`SAMPLING_OPTIONS`) of this loaded model, e.g. fewer ODE steps for a
        faster served copy; the weights are unchanged. Others are refused by name."""
        bad = sorted(set(options) - set(self.SAMPLING_OPTIONS))
        if bad:
            allowed = ", ".join(self.SAMPLING_OPTIONS) or "none"
            raise ValueError(f"{self.family} has no sampling option {bad}; its sampling options: {allowed}")
        config = dataclasses.replace(self.config, **options)
        self.check_config(config)
        self.config = config
        return self

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @torch.inference_mode()
    def sample_conditions(self, conditions: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """One image per row of `conditions` (condition vectors), z drawn from each row's seed."""
        z = torch.stack([torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            images = self(z.to(device), torch.as_tensor(conditions, dtype=torch.float32, device=device)).cpu()
        finally:
            self.train(was_training)
        return to_uint8(images)

    def invert(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The latent z (N, latent_dim) from which `forward(z, condition)` draws `images` (in
        [-1, 1], NCHW at the model's size): an encoder's mean, or the sampler run backwards."""
        raise NotImplementedError(f"the {self.family} family cannot edit an image (no encoder or inversion)")

    @torch.inference_mode()
    def edit_conditions(self, images: np.ndarray, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each uint8 image (N, H, W, C) redrawn under its row of `targets`: inverted under its
        row of `sources` (what the image shows), then drawn from that latent (what is asked)."""
        if not self.can_edit:
            self.invert(torch.empty(0), torch.empty(0))  # raises, naming the family
        fitted = fit_images(images, self.image_size, self.channels)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            x = torch.from_numpy(fitted).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = self.invert(x, torch.as_tensor(sources, dtype=torch.float32, device=device))
            drawn = self(z, torch.as_tensor(targets, dtype=torch.float32, device=device)).cpu()
        finally:
            self.train(was_training)
        return to_uint8(drawn)

    def sample(self, attributes: Mapping[str, AttributeValues], n: int, seed: int = 0) -> np.ndarray:
        """n images of the item described by `attributes`, reproducible for a given seed."""
        condition = self.schema.encode(attributes, require_all=not self.accepts_partial)
        return self.sample_conditions(np.repeat(condition[None], n, axis=0), sample_seeds(seed, n))


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-image seeds derived from a request seed, so image i is the same whatever n is."""
    return [(int(seed) * 1_000_003 + i) % (2**63) for i in range(n)]


def fit_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) images as a model takes them: size x size (aspect kept, padded white,
    as the importers do) and `channels` (grey replicated to RGB, RGB averaged to grey)."""
    from atelier.catalog.images import to_square

    out = []
    for image in images:
        image = to_square(image if image.ndim == 3 else image[:, :, None], size)
        if image.shape[2] != channels:
            image = np.repeat(image, 3, axis=2) if channels == 3 else image.mean(axis=2, keepdims=True).round().astype(np.uint8)
        out.append(image)
    return np.stack(out).astype(np.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
