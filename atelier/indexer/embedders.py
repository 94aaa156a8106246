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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atelier import artifacts
from atelier.indexer.attribute_net import read_attribute_net_files
from atelier.indexer.backbone import normalise, square_rgb
from atelier.pretrained import MOBILENET_V2_WIDTH, mobilenet_v2_features
from atelier.registry import Registry

__all__ = [
    "AUTO", "DEFAULT_EMBEDDER", "DEFAULT_INPUT_SIZE", "EMBEDDERS", "INDEX_EMBEDDER_FOLDER", "Embedder",
    "build_embedder", "embedder_for_catalogue", "embedder_of_index", "fixed_chunks", "trained_embedder",
    "weights_hash",
]


def weights_hash(module: nn.Module) -> str:
    """sha256 over the state dict's names and bytes: the same weights give the same hash."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Embedder:
    """uint8 images (N, H, W, 1|3) -> float32 (N, dim), L2-normalised, inner product = cosine."""

    def __init__(self, name: str, backbone: nn.Module, dim: int, input_size: int, files: Path | None = None):
        self.name, self.dim, self.input_size = name, dim, input_size
        self.files = files  # trained embedders: the folder whose config + weights an index copies
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.network = fold_batch_norm(self.backbone)  # what forward runs; the backbone stays as trained
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
        return square_rgb(image, self.input_size)

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Prepared uint8 (N, S, S, 3) -> normalised float32 vectors."""
        features = self.network(normalise(batch))
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


EMBEDDERS: Registry[Callable[[int], Embedder]] = Registry("embedder")  # name -> factory(input_size)
DEFAULT_EMBEDDER = "mobilenet_v2"
DEFAULT_INPUT_SIZE = 64
TRAINED_NAME = "attribute-net"
TRAINED_FILES = ("config.json", "weights.safetensors")
INDEX_EMBEDDER_FOLDER = "embedder"


@EMBEDDERS.register("mobilenet_v2")
def _mobilenet_v2(input_size: int) -> Embedder:
    return Embedder("mobilenet_v2", mobilenet_v2_features(), dim=MOBILENET_V2_WIDTH, input_size=input_size)


def trained_embedder(folder: Path) -> Embedder:
    """An attribute network's penultimate layer as an embedder (its own input size)."""
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
            return trained_embedder(artifacts.resolve(Path(name)))
        raise ValueError(f"unknown embedder {name!r}; available: {', '.join(EMBEDDERS.names())}, "
                         "or the folder of one trained by `atelier train-attributes`")
    if not 32 <= input_size <= 512:
        raise ValueError(f"embedder input size {input_size} out of range 32..512")
    return EMBEDDERS.get(name)(input_size)


AUTO = "auto"
# The embedder each catalogue is indexed with by default: chosen by measurement (docs/evaluation.md,
# attribute precision@k of GenerateAndRetrieve), the in-domain ones beat ImageNet mobilenet_v2.
CATALOGUE_EMBEDDERS = {
    "fashion-mnist": "embedder-fashion-mnist",
    "fashion-product-images-apparel-6x6": "embedder-fpi-apparel",
    "fashion-product-images-apparel-6x6-all": "embedder-fpi-apparel",
    "fashion-product-images-full": "embedder-fpi-full",
}


def embedder_for_catalogue(catalogue_name: str) -> str:
    """`auto` resolved: the committed in-domain embedder measured best for this catalogue, if it
    is here, else ImageNet mobilenet_v2."""
    folder = artifacts.COMMITTED_CHECKPOINTS / CATALOGUE_EMBEDDERS.get(catalogue_name, "-")
    return str(folder) if (folder / "manifest.json").is_file() else DEFAULT_EMBEDDER


def embedder_of_index(spec: dict, index_folder: Path) -> Embedder:
    """Rebuild the embedder an index manifest names (a trained one from the index's own copy)."""
    if "files" in spec:
        return trained_embedder(Path(index_folder) / spec["files"])
    return build_embedder(spec["name"], int(spec["input_size"]))

