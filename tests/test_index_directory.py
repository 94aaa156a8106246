"""FAISS index directories: exact results, the merge rule, atomic publishing, bad images."""

import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import publish_vectors, random_unit_vectors

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.runner import reindex
from atelier.indexer.writer import TooManyFailures
from atelier.retrieval.service import merge_by_mean_similarity

EMBEDDER = {"name": "test", "input_size": 32, "dim": 64, "weights_sha256": "0" * 64}


def _products(n):
    return pa.table({"id": [f"p{i:04d}" for i in range(n)], "category": ["Dress"] * n})


def _publish(dest, vectors):
    return publish_vectors(dest, vectors, _products(len(vectors)), EMBEDDER, SCHEMA, {"name": "t", "fingerprint": "f"})


def test_faiss_search_equals_brute_force(tmp_path):
    vectors = random_unit_vectors(2000, 64, seed=1)
    queries = random_unit_vectors(25, 64, seed=2)
    _publish(tmp_path / "index", vectors)
    index = IndexDirectory.open(tmp_path / "index")
    scores, rows = index.search(queries, 10)
    similarity = queries @ vectors.T
    expected_rows = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(scores, np.take_along_axis(similarity, expected_rows, axis=1), atol=1e-5)
    assert index.manifest["count"] == 2000 and index.manifest["dimension"] == 64


def test_merge_ranks_candidates_by_mean_similarity(tmp_path):
    vectors = random_unit_vectors(500, 64, seed=3)
    queries = random_unit_vectors(4, 64, seed=4)
    _publish(tmp_path / "index", vectors)
    index = IndexDirectory.open(tmp_path / "index")
    _, rows = index.search(queries, 8)
    ranked, scores = merge_by_mean_similarity(index, queries, rows, 8)
    candidates = np.unique(rows)
    mean = (vectors[candidates] @ queries.T).mean(axis=1)
    expected = candidates[np.argsort(-mean, kind="stable")][:8]
    assert ranked.tolist() == expected.tolist()
    assert np.all(np.diff(scores) <= 0) and np.allclose(scores, np.sort(mean)[::-1][:8], atol=1e-5)


def test_tampered_index_is_refused(tmp_path):
    _publish(tmp_path / "index", random_unit_vectors(50, 64))
    folder = artifacts.resolve(tmp_path / "index")
    with open(folder / "products.arrow", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(artifacts.ArtifactError, match="products.arrow does not match its sha256"):
        IndexDirectory.open(tmp_path / "index")


def test_killed_index_build_leaves_previous_index_loadable(tmp_path, small_catalogue, mobilenet_weights):
    dest = tmp_path / "index"
    first = reindex(small_catalogue, dest, input_size=32, progress=False)
    before = IndexDirectory.open(dest)
    command = [sys.executable, "-m", "atelier.cli", "index", "--catalogue", str(small_catalogue), "--out", str(dest),
               "--input-size", "224", "--batch-size", "16", "--quiet"]
    # On a free CPU the 160 px build used to finish at about 9 s, racing the last kill: the
    # build is now larger and the kills earlier (tests/test_artifacts.py has exact points).
    for delay in (0.5, 2.0, 4.0):
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if job.poll() is not None:
            pytest.fail(f"the build finished within {delay} s, so the kill tested nothing; make it longer")
        job.send_signal(signal.SIGKILL)
        job.wait()
        after = IndexDirectory.open(dest)  # verifies every sha256
        assert after.path == first and after.manifest["embedder"]["input_size"] == 32
        assert np.array_equal(after.products.column("id").to_pylist(), before.products.column("id").to_pylist())
    # A rerun completes and publishes a new version; the staging leftovers of killed runs never show.
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert IndexDirectory.open(dest).manifest["embedder"]["input_size"] == 224


def test_undecodable_images_are_skipped_and_listed(tmp_path, small_catalogue, mobilenet_weights):
    table = Catalogue.open(small_catalogue).read().slice(0, 40)
    images = table.column("image").to_pylist()
    images[3], images[7] = b"\x89PNG broken", b""
    broken = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    write_catalogue(tmp_path / "cat", "broken", SCHEMA, [broken], image_channels=1)
    reindex(tmp_path / "cat", tmp_path / "index", input_size=32, max_failed_fraction=0.1, progress=False)
    index = IndexDirectory.open(tmp_path / "index")
    skipped = index.manifest["skipped"]
    assert [s["id"] for s in skipped] == [table.column("id")[3].as_py(), table.column("id")[7].as_py()]
    assert all(s["reason"] for s in skipped) and len(index) == 38
    # Over the allowed fraction: nothing is published, the previous index stays.
    with pytest.raises(TooManyFailures, match="2 of 40 images"):
        reindex(tmp_path / "cat", tmp_path / "index", input_size=48, max_failed_fraction=0.01, progress=False)
    assert IndexDirectory.open(tmp_path / "index").manifest["embedder"]["input_size"] == 32


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    v = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_on_disk_inverted_lists_search_as_the_same_index_in_memory(tmp_path, monkeypatch):
    from atelier.indexer import index_choice
    from atelier.indexer.index_choice import IndexOptions
    from atelier.indexer.index_directory import EXACT_FILTER_ROWS, LISTS_FILE

    monkeypatch.setattr(index_choice, "SHARD_ROWS", 7000)  # several shards, merged

    n = EXACT_FILTER_ROWS + 4000  # so that a filter of most rows takes the ID-selector path
    vectors, queries = _clustered(n, 32, seed=3), _clustered(20, 32, seed=4)
    opened = {}
    for on_disk in (False, True):
        options = IndexOptions(factory="IVF64,SQ8", on_disk_lists=on_disk)
        publish_vectors(tmp_path / str(on_disk), vectors, _products(n), EMBEDDER, SCHEMA,
                        {"name": "t", "fingerprint": "f"}, options)
        opened[on_disk] = IndexDirectory.open(tmp_path / str(on_disk))  # a renamed folder: the lists found beside
    memory, disk = opened[False], opened[True]
    assert (disk.path / LISTS_FILE).is_file() and LISTS_FILE in disk.manifest["files"]
    assert not (memory.path / LISTS_FILE).exists()
    assert disk.manifest["index_choice"]["on_disk_lists"] is True
    assert sorted(p.name for p in disk.path.iterdir()) == sorted([*disk.manifest["files"], "manifest.json"])
    assert disk.manifest["index_choice"]["search_parameters"] == memory.manifest["index_choice"]["search_parameters"]
    for rows in (None, np.arange(0, n - 1000)):
        got, expected = disk.search(queries, 10, rows=rows), memory.search(queries, 10, rows=rows)
        assert np.array_equal(got[1], expected[1]) and np.allclose(got[0], expected[0])
    assert np.array_equal(disk.vectors(np.array([0, 7, n - 1])), memory.vectors(np.array([0, 7, n - 1])))


def test_on_disk_lists_of_a_catalogue_that_gets_a_flat_index_are_refused_before_embedding(
        tmp_path, small_catalogue, mobilenet_weights, monkeypatch):
    from atelier.indexer import runner
    from atelier.indexer.index_choice import IndexOptions

    monkeypatch.setattr(runner, "run_stages", lambda *a, **k: pytest.fail("embedding started"))
    with pytest.raises(ValueError, match="on-disk inverted lists need an IVF index, and this one is Flat"):
        reindex(small_catalogue, tmp_path / "index", input_size=32, index_options=IndexOptions(on_disk_lists=True),
                progress=False)
    assert not (tmp_path / "index").exists()


def test_the_reindex_job_leaves_no_scratch_vectors_behind(tmp_path, small_catalogue, mobilenet_weights):
    from atelier.indexer.index_choice import IndexOptions
    from atelier.indexer.writer import SCRATCH_VECTORS

    version = reindex(small_catalogue, tmp_path / "index", input_size=32, progress=False,
                      index_options=IndexOptions(factory="IVF8,SQ8", on_disk_lists=True))
    index = IndexDirectory.open(tmp_path / "index")
    assert not (version / SCRATCH_VECTORS).exists() and SCRATCH_VECTORS not in index.manifest["files"]
    assert len(index) == len(Catalogue.open(small_catalogue))
    own = index.vectors(np.arange(20))
    _, rows = index.search(own, 1)
    assert (rows[:, 0] == np.arange(20)).mean() >= 0.9  # each product finds itself (what a broken map would not)
