"""Fashion-MNIST: find or fetch the original IDX files, and import them as a catalogue.

Where the files come from, in order:
1. a directory the caller names (any folder holding the four IDX files, .gz or not);
2. `$ATELIER_FASHION_MNIST`, then Debian's `dataset-fashion-mnist` package
   (`/usr/share/datasets/fashion-mnist/`);
3. the dataset's official mirror, downloaded into a cache and checked against the md5s that
   Zalando publishes. (Debian re-packed the .gz headers, so its files have other md5s; their
   decompressed content is identical.)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa

from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.images import encode_png
from atelier.catalog.importers import IMPORTERS
from atelier.catalog.schema import AttributeGroup, AttributeSchema

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SCHEMA = AttributeSchema((AttributeGroup("category", CLASS_NAMES),))

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {  # name -> published md5 of the original .gz
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
SPLITS = {"train": "train", "test": "t10k"}


class DatasetUnavailable(RuntimeError):
    """The dataset is nowhere to be found and cannot be downloaded."""


def _holds_idx(folder: Path) -> bool:
    return all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in FILES)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atelier" / "fashion-mnist"


def locate(directory: Path | None = None, download: bool = True) -> Path:
    """A folder holding the four IDX files; downloads them into the cache as a last resort."""
    if directory is not None:
        directory = Path(directory)
        if not _holds_idx(directory):
            raise DatasetUnavailable(f"{directory} does not hold the Fashion-MNIST IDX files ({', '.join(FILES)}, .gz or not)")
        return directory
    candidates = [Path(p) for p in [os.environ.get("ATELIER_FASHION_MNIST")] if p] + [DEBIAN_DIR, default_cache()]
    for folder in candidates:
        if _holds_idx(folder):
            return folder
    if not download:
        raise DatasetUnavailable(
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist), set ATELIER_FASHION_MNIST, or allow the download into {default_cache()}"
        )
    return fetch(default_cache())


def fetch(cache: Path, mirror: str = MIRROR) -> Path:
    """Download the four .gz files from the official mirror, verifying the published md5s."""
    cache.mkdir(parents=True, exist_ok=True)
    for name, md5 in FILES.items():
        target = cache / f"{name}.gz"
        if target.exists() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        try:
            with urllib.request.urlopen(mirror + f"{name}.gz", timeout=60) as response:
                data = response.read()
        except OSError as error:
            raise DatasetUnavailable(
                f"cannot download Fashion-MNIST from {mirror} ({error}); install Debian's dataset-fashion-mnist instead"
            ) from error
        if hashlib.md5(data).hexdigest() != md5:
            raise DatasetUnavailable(f"{name}.gz from {mirror} does not match its published md5 {md5}")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return cache


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw) into an array of its declared shape."""
    path = Path(path)
    if not path.exists() and Path(f"{path}.gz").exists():
        path = Path(f"{path}.gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the official `train` or `test` split."""
    prefix = SPLITS[split]
    images = read_idx(Path(folder) / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


@IMPORTERS.register("fashion-mnist")
def import_fashion_mnist(source: Path | None, dest: Path) -> Catalogue:
    """IDX files -> catalogue with attribute `category`; ids `train_00000`..., `test_00000`...

    `source`: a folder with the IDX files; None: Debian's package, else the official mirror."""
    folder = locate(source)

    def batches():
        for split in SPLITS:
            images, labels = load_split(folder, split)
            yield pa.record_batch({
                "id": [f"{split}_{i:05d}" for i in range(len(labels))],
                "split": [split] * len(labels),
                "category": [CLASS_NAMES[int(k)] for k in labels],
                "image": [encode_png(im[:, :, None]) for im in images],
            })

    return write_catalogue(
        dest, "fashion-mnist", SCHEMA, batches(), image_channels=1,
        source={"dataset": "Fashion-MNIST", "idx_dir": str(folder)},
    )
