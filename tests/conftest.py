"""Shared fixtures: real Fashion-MNIST, real mobilenet_v2 weights, a tiny trained model, a real server.

Real data is found through one setting, ATELIER_DATA (default ../shared/data); the Debian IDX
files through atelier's own lookup. Where either is absent the tests that need it skip with
the reason, unless ATELIER_REQUIRE_DATA=1 (set by .ci/run), which turns those skips into failures.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ATELIER_DATA", REPO.parent / "shared" / "data"))
REQUIRED = os.environ.get("ATELIER_REQUIRE_DATA") == "1"


def missing(reason: str):
    """Skip (a user's fresh clone) or fail (CI) when real data or weights are absent."""
    if REQUIRED:
        pytest.fail(f"ATELIER_REQUIRE_DATA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def listening_port(server: subprocess.Popen) -> int:
    """The port that `atelier serve --address HOST:0` printed it listens on: port 0 leaves no race for a free one."""
    line = server.stdout.readline()
    found = re.search(r"listening on [^:]+:(\d+)", line)
    assert found, server.stderr.read() if server.poll() is not None else line
    return int(found.group(1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA / "fashion_mnist" / "train.parquet").is_file():
        missing(f"real data not found under {DATA} (set ATELIER_DATA)")
    return DATA


@pytest.fixture(scope="session")
def fpi_parquet(shared_data) -> Path:
    folder = shared_data / "fashion_product_images_small"
    if len(list(folder.glob("*.parquet"))) != 4:
        missing(f"Fashion Product Images Parquet copy not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def idx_dir() -> Path:
    from atelier.catalog.fashion_mnist import DatasetUnavailable, locate

    try:
        return locate(download=False)
    except DatasetUnavailable as error:
        missing(str(error))


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    import torch

    from atelier.pretrained import MOBILENET_V2_FILE, WeightsUnavailable, install_mobilenet_v2_weights

    target = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE
    if not target.is_file():
        try:
            install_mobilenet_v2_weights()
        except WeightsUnavailable as error:
            missing(str(error))
    return target


def write_fashion_mnist_subset(dest: Path, idx_dir: Path, per_split: dict[str, int]):
    """A small real catalogue: the first N rows of each official split, via the real schema."""
    from atelier.catalog.catalogue import write_catalogue
    from atelier.catalog.fashion_mnist import CLASS_NAMES, SCHEMA, load_split
    from atelier.catalog.images import encode_png

    def batches():
        for split, n in per_split.items():
            images, labels = load_split(idx_dir, split)
            yield pa.record_batch({
                "id": [f"{split}_{i:05d}" for i in range(n)], "split": [split] * n,
                "category": [CLASS_NAMES[int(k)] for k in labels[:n]],
                "image": [encode_png(im[:, :, None]) for im in images[:n]],
            })

    return write_catalogue(dest, "fashion-mnist-subset", SCHEMA, batches(), image_channels=1)


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory, idx_dir) -> Path:
    dest = tmp_path_factory.mktemp("catalogue") / "fm-small"
    write_fashion_mnist_subset(dest, idx_dir, {"train": 256, "test": 200})
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, small_catalogue) -> Path:
    from atelier.generator.train import TrainConfig, train

    out = tmp_path_factory.mktemp("model") / "cgan-tiny"
    train(TrainConfig(catalogue=small_catalogue, out=out, epochs=1, batch_size=32, max_steps=4, progress=False,
                      model_overrides={"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}))
    return out


@pytest.fixture(scope="session")
def flow_checkpoint(tmp_path_factory, small_catalogue) -> Path:
    """A tiny flow trained two steps on the small catalogue (test_flow, test_distill)."""
    from atelier.generator.train import TrainConfig, train

    out = tmp_path_factory.mktemp("flow") / "model"
    train(TrainConfig(catalogue=small_catalogue, out=out, model="flow", epochs=1, batch_size=16, max_steps=2,
                      progress=False, model_overrides={"width": 8, "sample_steps": 2}))
    return out


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, small_catalogue, mobilenet_weights) -> Path:
    from atelier.indexer.runner import reindex

    out = tmp_path_factory.mktemp("index") / "fm-small"
    reindex(small_catalogue, out, input_size=32, batch_size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def service(small_index, tiny_model):
    from atelier.retrieval.service import Limits, RetrievalService

    return RetrievalService.open(small_index, {"cgan": tiny_model}, Limits(max_num_samples=8, max_top_k=20, max_candidates=100))


@pytest.fixture(scope="session")
def server(service):
    """The real gRPC server on a free localhost port."""
    from atelier.server.app import start_server

    running = start_server(service, "127.0.0.1:0", max_workers=4)
    yield running
    running.stop(grace=1)


@pytest.fixture()
def client(server):
    from atelier.server.client import AtelierClient

    with AtelierClient(server.target, timeout=60) as c:
        c.wait_ready()
        yield c


def publish_vectors(dest: Path, vectors: np.ndarray, products: pa.Table, embedder: dict, schema, catalogue: dict,
                    options=None) -> Path:
    """An index over ready vectors (row i = products row i) published at `dest` the way the reindex
    job publishes one: its staging folder, its one index choice, its writer, runner.publish_index
    (only the reader and mapper are left out). Returns the version folder."""
    from atelier import artifacts
    from atelier.indexer.index_choice import IndexOptions, choose_index
    from atelier.indexer.mapper import Embedded
    from atelier.indexer.runner import publish_index
    from atelier.indexer.writer import IndexWriter

    options = options or IndexOptions()
    with artifacts.staging(dest) as stage:
        choice = choose_index(len(vectors), vectors.shape[1], options)
        writer = IndexWriter(stage, schema, embedder, catalogue, choice, options)
        writer.write(Embedded(products, vectors, []))
        return publish_index(writer, dest)


def random_unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
