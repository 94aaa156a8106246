"""Index choice under a memory budget: which type is picked, that it stays under the budget,
and that the recall recorded in the manifest is what the opened index really gives. Real FAISS."""

import subprocess
import sys

import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import publish_vectors

from atelier import artifacts
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.indexer import index_directory
from atelier.indexer.index_choice import (
    COMPACT_SQ_TRIM,
    DIRECT_MAP_BYTES,
    ID_BYTES,
    IndexBudgetError,
    IndexOptions,
    candidates,
    choose_index,
    exact_neighbours,
    parse_bytes,
    recall_at_k,
)
from atelier.indexer.index_directory import INDEX_FILE, IndexDirectory

DIM = 64
EMBEDDER = {"name": "test", "input_size": 32, "dim": DIM, "weights_sha256": "0" * 64}


def clustered(n: int, d: int = DIM, centres: int = 200, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbourhoods like embeddings have, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, d)).astype(np.float32)
    v = middle[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def low_rank(n: int, rank: int = 32, d: int = DIM, seed: int = 0) -> np.ndarray:
    """`clustered` unit vectors in a random rank-dimensional subspace: a PCA to 40 dimensions keeps them
    whole (as it keeps the most of real embeddings), so what the compact index loses is its codes'."""
    basis = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((d, rank)))[0].T.astype(np.float32)
    return np.ascontiguousarray(clustered(n, rank, seed=seed) @ basis)


def compact_options(n: int, **kwargs) -> IndexOptions:
    """A memory budget that the compact index fits and IVF-SQ8, the next larger kind, does not."""
    options = IndexOptions(exact_below=1_000, **kwargs)
    specs = {s.kind: s for s in candidates(n, DIM, options)}
    options.memory_budget = int(specs["compact"].estimated_bytes(n) * 1.02)
    assert specs["ivf-sq8"].estimated_bytes(n) > options.memory_budget
    return options


def publish(dest, vectors, options):
    products = pa.table({"id": [f"p{i:06d}" for i in range(len(vectors))], "category": ["Dress"] * len(vectors)})
    return publish_vectors(dest, vectors, products, EMBEDDER, SCHEMA, {"name": "t", "fingerprint": "f"}, options)


def resident_bytes(folder, index: IndexDirectory) -> int:
    """What the index costs a server: the mapped FAISS file, plus the direct map IVF builds at open."""
    direct_map = DIRECT_MAP_BYTES * len(index) if "IVF" in index.manifest["index_type"] else 0
    return (folder / INDEX_FILE).stat().st_size + direct_map


def test_the_fastest_type_that_fits_is_chosen():
    n = 1_000_000
    assert choose_index(20_000, 256).factory == "Flat"  # small: exact
    assert choose_index(n, 256).factory == "HNSW32,Flat"  # no budget: the fastest
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("2GB"))).factory == "HNSW32,Flat"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("1.1GB"))).factory == "Flat"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("400MB"))).factory == "IVF4096,SQ8"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("100MB"))).factory == "PCAR40,IVF4096,SQ8"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("60MB"))).factory == "PCAR40,IVF4096,SQ8"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("55MB"))).factory == "IVF4096,PQ32np"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("40MB"))).factory == "IVF4096,PQ16np"
    assert choose_index(n, 256, IndexOptions(memory_budget=parse_bytes("200MB"), pca=128)).factory == "PCA128,IVF4096,SQ8"
    sizes = [s.estimated_bytes(n) for s in candidates(n, 256)]
    assert sizes[2:] == sorted(sizes[2:], reverse=True)  # after HNSW and Flat, each step is smaller


def test_the_compact_candidate_is_at_most_64_bytes_a_vector_and_replaces_the_pq_codes_as_large():
    n = 1_000_000
    specs = candidates(n, 256)
    compact = next(s for s in specs if s.kind == "compact")
    assert compact.factory == "PCAR40,IVF4096,SQ8"
    assert compact.bytes_per_vector == 40 + ID_BYTES + DIRECT_MAP_BYTES  # code, list id, direct map
    assert compact.estimated_bytes(n) / n <= 64  # centroids and PCA matrices included
    assert [s.factory for s in specs if s.kind == "ivf-pq"] == ["IVF4096,PQ32np", "IVF4096,PQ16np", "IVF4096,PQ8np"]
    # its own PCA replaces --pca's, at most 40 dimensions
    assert next(s for s in candidates(n, 256, IndexOptions(pca=128)) if s.kind == "compact").factory == "PCAR40,IVF4096,SQ8"
    assert next(s for s in candidates(n, 256, IndexOptions(pca=32)) if s.kind == "compact").factory == "PCAR32,IVF4096,SQ8"


def test_a_budget_nothing_fits_is_refused_naming_the_smallest():
    with pytest.raises(IndexBudgetError, match=r"no index type fits 1,000,000 vectors .* 9.5 MiB: the smallest, "
                                               r"IVF4096,PQ8np, needs about .* MiB; raise the budget"):
        choose_index(1_000_000, 256, IndexOptions(memory_budget=parse_bytes("10MB")))


@pytest.mark.parametrize("budget, kind", [("2MB", "ivf-sq8"), ("450KB", "ivf-pq")])
def test_an_index_chosen_under_a_budget_stays_under_it_and_its_recorded_recall_holds(tmp_path, budget, kind):
    vectors = clustered(10_000)
    options = IndexOptions(memory_budget=parse_bytes(budget), exact_below=1_000, recall_queries=300)
    folder = publish(tmp_path / "index", vectors, options)
    index = IndexDirectory.open(tmp_path / "index")
    record = index.manifest["index_choice"]
    assert record["kind"] == kind and index.manifest["index_type"] == record["factory"]
    assert resident_bytes(folder, index) <= parse_bytes(budget)
    assert record["bytes"] == (folder / INDEX_FILE).stat().st_size
    # the opened (memory-mapped) index carries the tuned parameter: its recall is the recorded one
    queries = np.sort(np.random.default_rng(7).choice(len(vectors), 300, replace=False))
    recall = recall_at_k(index.index, vectors, queries, exact_neighbours(vectors, queries))
    assert abs(recall - record["recall_at_10"]) < 0.08
    if kind == "ivf-sq8":  # 8-bit codes keep neighbourhoods: the target is reached
        assert record["recall_at_10"] >= 0.95 and recall >= 0.9
    assert len(index.product_rows(index.search(vectors[:2], 5)[1][0].tolist())) == 5


def test_hnsw_is_tuned_until_it_reaches_the_target_recall(tmp_path):
    vectors = clustered(8_000)
    publish(tmp_path / "index", vectors, IndexOptions(exact_below=1_000, target_recall=0.97, recall_queries=300))
    index = IndexDirectory.open(tmp_path / "index")
    record = index.manifest["index_choice"]
    assert record["factory"] == "HNSW32,Flat" and record["recall_at_10"] >= 0.97
    assert [step[0] for step in record["tuning"]][-1] == record["search_parameters"]["efSearch"]
    assert index.index.hnsw.efSearch == record["search_parameters"]["efSearch"]  # applied at open
    assert np.allclose(index.vectors(np.arange(5)), vectors[:5], atol=1e-6)  # full vectors: the merge is exact


def test_a_small_catalogue_gets_the_exact_index_and_recall_one(tmp_path):
    vectors = clustered(2_000)
    publish(tmp_path / "index", vectors, IndexOptions())
    record = IndexDirectory.open(tmp_path / "index").manifest["index_choice"]
    assert (record["factory"], record["recall_at_10"]) == ("Flat", 1.0)


@pytest.mark.parametrize("text, expected", [("800MB", 800_000_000), ("2GiB", 2 << 30), ("1.5kb", 1500), ("123", 123)])
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


def test_the_job_chooses_once_before_embedding_and_builds_that_choice(tmp_path, small_catalogue, mobilenet_weights,
                                                                     monkeypatch):
    from atelier.indexer import index_choice, runner
    from atelier.indexer.mapper import EmbeddingMapper

    events, real_choose, real_map = [], runner.choose_index, EmbeddingMapper.map

    def choose(*args, **kwargs):
        events.append("choose")
        return real_choose(*args, **kwargs)

    def embed(self, batches):
        events.append("embed")
        yield from real_map(self, batches)

    monkeypatch.setattr(runner, "choose_index", choose)
    monkeypatch.setattr(index_choice, "choose_index", lambda *a, **k: pytest.fail("the index was chosen again"))
    monkeypatch.setattr(EmbeddingMapper, "map", embed)
    options = IndexOptions(exact_below=100, recall_queries=50)  # 456 images: over exact_below, so HNSW
    runner.reindex(small_catalogue, tmp_path / "index", input_size=32, progress=False, index_options=options)
    assert events == ["choose", "embed"]
    manifest = IndexDirectory.open(tmp_path / "index").manifest
    assert manifest["index_type"] == manifest["index_choice"]["factory"] == "HNSW32,Flat"
    assert {"seconds", "images_per_second", "batch_size", "torch_threads", "forward_seconds"} <= manifest["build"].keys()
    assert (manifest["skipped"], manifest["skipped_count"], manifest["images"]) == ([], 0, 456)


def test_an_impossible_budget_fails_before_embedding_and_keeps_the_old_index(tmp_path, small_catalogue, small_index):
    dest = tmp_path / "index"
    dest.symlink_to(artifacts.resolve(small_index))  # "the previous index": what dest serves now
    before = artifacts.resolve(dest)
    run = subprocess.run([sys.executable, "-m", "atelier.cli", "index", "--catalogue", str(small_catalogue), "--out", str(dest),
                          "--embedder", "mobilenet_v2", "--memory-budget", "1KB", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "no index type fits" in run.stderr and "1000 B" in run.stderr and "raise the budget" in run.stderr
    assert artifacts.resolve(dest) == before
    bad = subprocess.run([sys.executable, "-m", "atelier.cli", "index", "--catalogue", str(small_catalogue), "--out", str(dest),
                          "--memory-budget", "lots"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "memory budget 'lots' is not a size" in bad.stderr


def test_under_a_budget_only_the_compact_index_fits_it_is_built_as_estimated_and_keeps_neighbours(tmp_path):
    vectors = low_rank(10_000)
    options = compact_options(len(vectors), recall_queries=300)
    folder = publish(tmp_path / "index", vectors, options)
    index = IndexDirectory.open(tmp_path / "index")
    record = index.manifest["index_choice"]
    assert (record["kind"], record["factory"]) == ("compact", "PCAR40,IVF512,SQ8")
    resident = resident_bytes(folder, index)
    assert resident <= options.memory_budget
    assert abs(resident - record["estimated_bytes"]) <= 0.02 * record["estimated_bytes"]
    assert record["training_rows"] == len(vectors)  # 64 per list would be 32,768: all there are
    assert record["sq_range"] == {"statistic": "quantiles", "tail_share_left_out": COMPACT_SQ_TRIM}
    assert faiss.extract_index_ivf(index.index).nprobe == record["search_parameters"]["nprobe"]  # applied at open
    queries = np.sort(np.random.default_rng(7).choice(len(vectors), 300, replace=False))
    recall = recall_at_k(index.index, vectors, queries, exact_neighbours(vectors, queries))
    assert recall >= 0.85 and abs(recall - record["recall_at_10"]) < 0.05  # not a quality bar: wrong rows would fail it


@pytest.mark.parametrize("exact_filter_rows", [index_directory.EXACT_FILTER_ROWS, 100],
                         ids=["scored exactly", "the index with an ID selector"])
def test_a_compact_index_answers_filtered_and_unfiltered_searches_with_the_right_rows(tmp_path, monkeypatch,
                                                                                     exact_filter_rows):
    vectors = low_rank(6_000)
    publish(tmp_path / "index", vectors, compact_options(len(vectors), recall_queries=200))
    index = IndexDirectory.open(tmp_path / "index")
    assert index.manifest["index_choice"]["kind"] == "compact"
    monkeypatch.setattr(index_directory, "EXACT_FILTER_ROWS", exact_filter_rows)  # 3,000 allowed rows: which path
    allowed = np.arange(0, len(vectors), 2)
    own = allowed[::150]  # 20 queries, each a product among the allowed
    scores, found = index.search(vectors[own], 10)
    assert (found[:, 0] == own).all()  # each product finds itself first
    scores, found = index.search(vectors[own], 10, rows=allowed)
    assert np.isin(found, allowed).all() and (found[:, 0] == own).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # scores are those of the stored (decoded) vectors, whichever path scored them
    stored = index.vectors(found.ravel()).reshape(*found.shape, DIM)
    assert np.allclose(scores, np.einsum("qkd,qd->qk", stored, vectors[own]), atol=1e-4)
    if exact_filter_rows == 100:  # the selector keeps the index's own ranking, cut to the allowed rows
        _, wide = index.search(vectors[own], 400)
        assert np.array_equal(found, np.stack([row[np.isin(row, allowed)][:10] for row in wide]))
