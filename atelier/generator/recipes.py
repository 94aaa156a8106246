"""Training recipes the families share: a moving average of the generator's weights, and
differentiable augmentation for the discriminator.

Moving average (EMA): the model a checkpoint serves is an exponential moving average of the
weights being trained, `ema <- decay * ema + (1 - decay) * trained`, which smooths away the
last steps' oscillation (Yazici et al. 2019; standard in StyleGAN and diffusion models).
Buffers (BatchNorm statistics, step counters) are copied, not averaged.

Differentiable augmentation (DiffAugment, Zhao et al. 2020): every image the discriminator
sees, real or generated, goes through the same random, differentiable transformations, so D
cannot memorise a small training set and G's gradient still flows through them. Policies,
applied in this order:
    color        brightness (+-0.5), saturation (x0..2, colour images only), contrast (x0.5..1.5)
    translation  a shift of up to 1/8 of the size in each direction, filled with 0
    cutout       a square of half the size set to 0, its centre anywhere in the image
Images are in [-1, 1], so the fill 0 is mid-grey.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AUGMENTATIONS", "diff_augment", "ema_update", "parse_policy"]

AUGMENTATIONS = ("color", "translation", "cutout")


@torch.no_grad()
def ema_update(ema: nn.Module, trained: nn.Module, decay: float) -> None:
    """Move `ema`'s parameters towards `trained`'s by (1 - decay); copy the buffers."""
    for average, current in zip(ema.parameters(), trained.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(ema.buffers(), trained.buffers()):
        average.copy_(current)


def parse_policy(text: str) -> tuple[str, ...]:
    """"color,translation" -> ("color", "translation"); "" -> no augmentation."""
    policy = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in policy if p not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; allowed: {', '.join(AUGMENTATIONS)} "
                         "(comma-separated, e.g. color,translation,cutout)")
    return policy


def diff_augment(images: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """`images` (N, C, H, W) in [-1, 1] through the policy's transformations, each drawn per image."""
    for name in policy:
        images = _TRANSFORMS[name](images)
    return images


def _per_image(images: torch.Tensor) -> torch.Tensor:
    return torch.rand(len(images), 1, 1, 1, device=images.device, dtype=images.dtype)


def color(images: torch.Tensor) -> torch.Tensor:
    images = images + (_per_image(images) - 0.5)
    if images.shape[1] == 3:
        mean = images.mean(dim=1, keepdim=True)
        images = (images - mean) * (_per_image(images) * 2) + mean
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_per_image(images) + 0.5) + mean


def translation(images: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = images.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(-sx, sx + 1, (n, 1, 1), device=images.device)
    # output pixel (y, x) reads input (y - dy, x - dx); outside the image reads the zero border
    ys = (torch.arange(h, device=images.device)[None, :, None] - dy).clamp(-1, h) + 1
    xs = (torch.arange(w, device=images.device)[None, None, :] - dx).clamp(-1, w) + 1
    padded = nn.functional.pad(images, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
    rows = torch.arange(n, device=images.device)[:, None, None]
    return padded[rows, ys, xs].permute(0, 3, 1, 2)


def cutout(images: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = images.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h, (n, 1, 1), device=images.device)
    cx = torch.randint(0, w, (n, 1, 1), device=images.device)
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    inside = ((ys - cy + ch // 2) >= 0) & ((ys - cy + ch // 2) < ch) & ((xs - cx + cw // 2) >= 0) & (
        (xs - cx + cw // 2) < cw)
    return images * (~inside)[:, None].to(images.dtype)


_TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}
