"""The one way images become network input, for embedders and attribute networks alike.

Embedders (atelier.indexer.embedders) and attribute networks (atelier.indexer.attribute_net)
both read images through `network_input`, so an in-domain embedder sees, when serving, exactly
the input it was trained on: square (aspect kept), RGB, ImageNet-normalised, channels_last.
The ImageNet network itself is atelier.pretrained.
"""

from __future__ import annotations

import numpy as np
import torch

from atelier.catalog.images import to_square
from atelier.pretrained import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["network_input", "normalise", "square_rgb"]

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def square_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """One uint8 (H, W, 1|3) image -> uint8 (size, size, 3): aspect kept, padded with its top row's median, RGB."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[:2] != (size, size):
        image = to_square(image, size, pad_value=int(np.median(image[0])))
    return image


def normalise(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) from `square_rgb` -> ImageNet-normalised float (N, 3, S, S), channels_last."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()  # NHWC memory = channels_last
    return ((x - _MEAN) / _STD).contiguous(memory_format=torch.channels_last)


def network_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images (N, H, W, 1|3) -> what an embedder or attribute network reads."""
    return normalise(np.stack([square_rgb(im, size) for im in images]))
