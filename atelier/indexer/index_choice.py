"""Which FAISS index to build, from catalogue size, dimension and a memory budget (autofaiss's way).

Candidates, fastest first, each with its resident bytes per vector at dimension d:

    Flat                  exact; 4d                     (chosen up to `exact_below` vectors: a
                                                          scan that small is a few ms, no recall lost)
    HNSW32,Flat           graph over full vectors; 4d + 2*32*4 + ~24
    IVF{nlist},SQ8        inverted lists of 8-bit scalar codes; d + 8 + 8 (+ centroids)
    PCAR{c},IVF{nlist},SQ8   "compact": PCA to c = min(40, d) dimensions and a random rotation,
                          then 8-bit codes of the residuals, their range cut at the 0.2% tails;
                          c + 8 + 8 (+ centroids, the PCA matrices): 57 bytes a vector at 1M,
                          recall@10 0.90 at nprobe 8 on the 1M benchmark (docs/performance.md)
    [OPQ{m}_{d},]IVF{nlist},PQ{m}np   product-quantised codes; m + 8 + 8 (+ centroids, codebooks);
                          OPQ only where it measures better on a sample; "np": no polysemous
                          training, which we would not use and which took 5x the training time;
                          only code sizes below the compact index's (a PQ as large measured far
                          less accurate)

Per vector, every IVF candidate counts its code, the 8-byte id its inverted list stores beside
it, and the 8-byte direct map IndexDirectory builds at open (row -> list position). The first
that fits the budget is chosen (`choose_index`, once per job, before embedding) and
built (`build_index`); then its search parameter (efSearch / nprobe) is raised step by step
until recall@10 against exact search reaches the target on queries drawn from the vectors
themselves (each query's own row left out of both answers), and the measured recall, the
parameter and the bytes are recorded in the index manifest. An optional PCA pre-transform
(`pca=`) cuts the dimension for every candidate.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("atelier.indexer")

EXACT_BELOW = 50_000
TARGET_RECALL = 0.95
HNSW_M = 32
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PQ_BYTES = (64, 32, 16, 8)  # PQ code sizes tried, largest (most accurate) first
ID_BYTES = 8  # an inverted list stores each vector's 64-bit id beside its code
DIRECT_MAP_BYTES = 8  # row -> list position, built at open so the merge can reconstruct rows
OPQ_ITERATIONS = 10  # faiss's default 50 takes minutes on 2 cores for a gain measured at ~0
RECALL_K = 10
COMPACT = "compact"
COMPACT_DIM = 40  # 1M benchmark: recall@10 0.91 at 57 bytes a vector; 48 dims gave 0.92 at 65, over 64
# Share of each tail of the residuals left outside the compact index's SQ8 range: faiss's min-max
# range stretches to rare outliers, which costs the common values precision (recall 0.89 -> 0.91).
COMPACT_SQ_TRIM = 0.002
ADD_CHUNK = 65_536  # vectors per index.add
SHARD_ROWS = 262_144  # vectors per shard of on-disk lists (its codes are what the build holds at a time)


class IndexBudgetError(ValueError):
    """No index type fits the memory budget; the message names the smallest estimate."""


@dataclass(frozen=True)
class IndexSpec:
    """One candidate: a faiss.index_factory string, its search parameter, and its size."""

    factory: str
    parameter: str | None  # "efSearch" / "nprobe" / None (exact)
    bytes_per_vector: float
    fixed_bytes: int  # centroids, codebooks, rotations
    kind: str  # flat / hnsw / ivf-sq8 / compact / ivf-pq

    def estimated_bytes(self, n: int) -> int:
        return int(self.fixed_bytes + self.bytes_per_vector * n)


@dataclass
class IndexOptions:
    """What `atelier index` was asked for (all optional)."""

    memory_budget: int | None = None  # bytes for the FAISS index; None = no limit
    target_recall: float = TARGET_RECALL
    exact_below: int = EXACT_BELOW
    pca: int | None = None  # reduce vectors to this many dimensions first
    factory: str | None = None  # force one faiss.index_factory string (skips the choice)
    recall_queries: int = 1000
    seed: int = 0
    # an IVF index's inverted lists in a file of their own (index.ivfdata), filled chunk by chunk
    # and memory-mapped when served: neither the build nor a replica holds the codes in memory
    on_disk_lists: bool = False

    def __post_init__(self) -> None:
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory budget must be positive, got {self.memory_budget} bytes")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target recall must be within (0, 1], got {self.target_recall}")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"PCA dimension must be at least 1, got {self.pca}")


@dataclass
class BuiltIndex:
    index: faiss.Index
    spec: IndexSpec
    record: dict[str, Any] = field(default_factory=dict)  # goes into the manifest's "index"


def ivf_lists(n: int) -> int:
    """About 4 sqrt(n) inverted lists (a power of two), so a list holds ~sqrt(n)/4 vectors."""
    return int(2 ** max(4, round(math.log2(4 * math.sqrt(max(n, 1))))))


def candidates(n: int, dim: int, options: IndexOptions | None = None) -> list[IndexSpec]:
    """Every index type for n vectors of `dim`, fastest (and largest) first."""
    options = options or IndexOptions()
    d = options.pca or dim
    prefix = f"PCA{d}," if options.pca else ""
    pca_bytes = pca_file_bytes(dim, d) if options.pca else 0
    nlist = ivf_lists(n)
    centroids = nlist * d * 4
    compact = compact_spec(dim, d, nlist)
    specs = [IndexSpec(prefix + "Flat", None, 4 * d, pca_bytes, "flat"),
             IndexSpec(prefix + f"HNSW{HNSW_M},Flat", "efSearch", 4 * d + 2 * HNSW_M * 4 + 24, pca_bytes, "hnsw"),
             IndexSpec(prefix + f"IVF{nlist},SQ8", "nprobe", d + ID_BYTES + DIRECT_MAP_BYTES,
                       pca_bytes + centroids + 2 * d * 4, "ivf-sq8"),
             compact]
    for m in PQ_BYTES:
        if m < d and d % m == 0 and m + ID_BYTES + DIRECT_MAP_BYTES < compact.bytes_per_vector:
            codebooks = m * 256 * (d // m) * 4
            specs.append(IndexSpec(prefix + f"IVF{nlist},PQ{m}np", "nprobe", m + ID_BYTES + DIRECT_MAP_BYTES,
                                   pca_bytes + centroids + codebooks, "ivf-pq"))
    if n <= options.exact_below:  # a scan this small is cheap: exact first
        return specs
    return specs[1:2] + specs[:1] + specs[2:]


def compact_spec(dim: int, d: int, nlist: int) -> IndexSpec:
    """The compact candidate for vectors of `dim` (`d`: after the optional --pca, which it replaces
    with its own PCA of at most COMPACT_DIM dimensions). The random rotation after the PCA
    spreads the few leading components, which carry most of every inner product, over all
    dimensions, so that each 8-bit code carries an equal share (at 32 dimensions on the 1M
    benchmark, recall@10 0.82 -> 0.87)."""
    c = min(COMPACT_DIM, d)
    return IndexSpec(f"PCAR{c},IVF{nlist},SQ8", "nprobe", c + ID_BYTES + DIRECT_MAP_BYTES,
                     pca_file_bytes(dim, c) + nlist * c * 4 + 2 * c * 4, COMPACT)


def pca_file_bytes(dim: int, d: int) -> int:
    """What a trained faiss PCAMatrix from `dim` to `d` writes: the d x dim projection and its
    bias, the mean and eigenvalues, and the full dim x dim eigenvector matrix."""
    return (d * dim + d + 2 * dim + dim * dim) * 4


def choose_index(n: int, dim: int, options: IndexOptions | None = None) -> IndexSpec:
    """The first candidate whose estimated bytes fit the budget (see `candidates`)."""
    options = options or IndexOptions()
    if options.factory:
        return IndexSpec(options.factory, _parameter_of(options.factory), 0, 0, "given")
    specs = candidates(n, dim, options)
    budget = options.memory_budget
    for spec in specs:
        if budget is None or spec.estimated_bytes(n) <= budget:
            return spec
    smallest = min(specs, key=lambda s: s.estimated_bytes(n))
    raise IndexBudgetError(
        f"no index type fits {n:,} vectors of dimension {options.pca or dim} in a memory budget of "
        f"{format_bytes(budget)}: the smallest, {smallest.factory}, needs about {format_bytes(smallest.estimated_bytes(n))}; "
        f"raise the budget, or reduce the dimension (--pca)"
    )


def _parameter_of(factory: str) -> str | None:
    if "HNSW" in factory:
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


def check_on_disk_lists(spec: IndexSpec, options: IndexOptions) -> None:
    """On-disk inverted lists exist for IVF indexes only: say so before anything is embedded."""
    if options.on_disk_lists and "IVF" not in spec.factory:
        raise ValueError(f"on-disk inverted lists need an IVF index, and this one is {spec.factory} ({spec.kind}); "
                         "give --memory-budget small enough for an IVF kind, or --index-factory with IVF, "
                         "e.g. IVF4096,SQ8")


def add_vectors(index: faiss.Index, vectors: np.ndarray, lists_file=None) -> None:
    """index.add, in chunks; with `lists_file`, into on-disk inverted lists in that file.

    Chunks keep what FAISS allocates per add (assignments, codes) small, and let `vectors` be a
    memory-mapped file read once in order."""
    if lists_file is not None:
        _add_to_on_disk_lists(index, vectors, Path(lists_file))
        return
    for start in range(0, len(vectors), ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32))


def _add_to_on_disk_lists(index: faiss.Index, vectors: np.ndarray, lists_file: Path) -> None:
    """Shards of SHARD_ROWS vectors, each added to a copy of the trained, empty index and written
    beside `lists_file`; then every shard's inverted lists merged into one OnDiskInvertedLists
    file, sized exactly, and the shard files removed. In memory at a time: one shard's codes."""
    shard_files: list[Path] = []
    try:
        for k, first in enumerate(range(0, len(vectors), SHARD_ROWS)):
            shard = faiss.clone_index(index)
            for start in range(first, min(first + SHARD_ROWS, len(vectors)), ADD_CHUNK):
                end = min(start + ADD_CHUNK, first + SHARD_ROWS, len(vectors))
                # ids given here: merge_from_multiple's shift_ids mis-shifted shards in faiss 1.15.1
                shard.add_with_ids(np.ascontiguousarray(vectors[start:end], dtype=np.float32),
                                   np.arange(start, end, dtype=np.int64))
            shard_files.append(lists_file.with_name(f"{lists_file.name}.shard-{k}"))
            faiss.write_index(shard, str(shard_files[-1]))
            del shard
        shards = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in shard_files]
        their_lists = faiss.InvertedListsPtrVector()
        for shard in shards:
            their_lists.push_back(faiss.extract_index_ivf(shard).invlists)
        ivf = faiss.extract_index_ivf(index)
        merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_file))
        total = merged.merge_from_multiple(their_lists.data(), their_lists.size(), False, False)
        ivf.replace_invlists(merged, True)
        merged.this.disown()  # the index owns and frees it
        ivf.ntotal = index.ntotal = total
        del their_lists, shards
    finally:
        for path in shard_files:
            path.unlink(missing_ok=True)


def build_index(vectors: np.ndarray, spec: IndexSpec, options: IndexOptions | None = None,
                lists_file=None) -> BuiltIndex:
    """Train, fill and tune an inner-product index of type `spec` over `vectors` (n, d), L2-normalised.

    `spec` is the caller's `choose_index` result, not chosen again here: the reindex job chooses
    before embedding, so that a budget nothing fits fails before any image is embedded.
    `vectors` may be a memory-mapped file (np.memmap): it is read in chunks and samples.
    `lists_file`: with `options.on_disk_lists`, where the inverted lists go."""
    options = options or IndexOptions()
    check_on_disk_lists(spec, options)
    if options.on_disk_lists and lists_file is None:
        raise ValueError("on-disk inverted lists need the file to write them to")
    if vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    start = time.perf_counter()
    rng = np.random.default_rng(options.seed)
    opq_record = None
    if spec.kind == "ivf-pq":  # OPQ where it pays: compare on a sample
        spec, opq_record = _with_opq_if_better(spec, vectors, options, rng)
    index = new_index(dim, spec.factory, spec.kind)
    sample = _training_sample(vectors, spec.factory, rng)
    train_index(index, sample)
    add_vectors(index, vectors, lists_file if options.on_disk_lists else None)
    built = time.perf_counter() - start
    record: dict[str, Any] = {"factory": spec.factory, "kind": spec.kind, "memory_budget": options.memory_budget,
                              "estimated_bytes": spec.estimated_bytes(n), "build_seconds": round(built, 2),
                              "training_rows": len(sample)}
    if spec.kind == COMPACT:
        record["sq_range"] = {"statistic": "quantiles", "tail_share_left_out": COMPACT_SQ_TRIM}
    if opq_record:
        record["opq_comparison"] = opq_record
    if options.on_disk_lists:
        record["on_disk_lists"] = True
    if spec.parameter is None and not options.pca and spec.factory == "Flat":
        record.update(recall_at_10=1.0, search_parameters={}, recall_note="exact search")
    else:
        queries = _query_rows(n, options.recall_queries, rng)
        truth = exact_neighbours(vectors, queries)
        value, recall, tried = tune(index, spec.parameter, vectors, queries, truth, options.target_recall)
        record.update(search_parameters={spec.parameter: value} if spec.parameter else {}, recall_at_10=round(recall, 4),
                      recall_queries=len(queries), recall_target=options.target_recall, tuning=tried,
                      tune_seconds=round(time.perf_counter() - start - built, 2))
        if recall < options.target_recall:
            log.warning("%s reaches recall@10 %.3f at most (target %.2f); recorded in the manifest",
                        spec.factory, recall, options.target_recall)
    return BuiltIndex(index, spec, record)


def new_index(dim: int, factory: str, kind: str | None = None) -> faiss.Index:
    """faiss.index_factory for inner product, with OPQ's iterations cut (OPQ_ITERATIONS); for
    the compact kind, its SQ8 range set to leave out the tails (COMPACT_SQ_TRIM)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = OPQ_ITERATIONS
    if kind == COMPACT:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index)).sq
        quantizer.rangestat = faiss.ScalarQuantizer.RS_quantiles
        quantizer.rangestat_arg = COMPACT_SQ_TRIM
    return index


def train_index(index: faiss.Index, sample: np.ndarray) -> None:
    """index.train, except that a PCA pre-transform is trained first and its bias zeroed:
    faiss's PCA maps x to A(x - mean), which shifts each row's inner product by a different
    amount (recall@10 0.08 on the real 44k); A x keeps the ranking. Trained transforms are then
    skipped by index.train, so IVF centroids are learnt in the space searched."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.PCAMatrix) and not transform.is_trained:
                transform.train(sample)
                faiss.copy_array_to_vector(np.zeros(transform.d_out, dtype=np.float32), transform.b)
    if not index.is_trained:
        index.train(sample)


def _training_sample(vectors: np.ndarray, factory: str, rng: np.random.Generator) -> np.ndarray:
    match = re.search(r"IVF(\d+)", factory)
    wanted = 64 * int(match.group(1)) if match else 65_536  # k-means wants ~40-256 points per centroid
    if "PQ" in factory or "PCA" in factory:
        wanted = max(wanted, 65_536)
    if len(vectors) <= wanted:
        return vectors
    return vectors[np.sort(rng.choice(len(vectors), wanted, replace=False))]


def _with_opq_if_better(spec: IndexSpec, vectors: np.ndarray, options: IndexOptions,
                        rng: np.random.Generator) -> tuple[IndexSpec, dict[str, Any]]:
    """Build the PQ spec with and without an OPQ rotation on a sample; keep the better recall."""
    m = int(re.search(r"PQ(\d+)", spec.factory).group(1))
    d = options.pca or vectors.shape[1]
    head, _, tail = spec.factory.rpartition("IVF")
    opq = IndexSpec(f"{head}OPQ{m}_{d},IVF{tail}", spec.parameter, spec.bytes_per_vector,
                    spec.fixed_bytes + d * d * 4, spec.kind)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), 20_000), replace=False))]
    queries = _query_rows(len(sample), 300, rng)
    truth = exact_neighbours(sample, queries)
    scores = {}
    for candidate in (spec, opq):
        small = candidate.factory.replace(f"IVF{ivf_lists(len(vectors))}", f"IVF{ivf_lists(len(sample))}")
        index = new_index(vectors.shape[1], small)
        train_index(index, _training_sample(sample, small, rng))
        index.add(sample)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 16)
        scores[candidate.factory] = round(recall_at_k(index, sample, queries, truth), 4)
    fits = options.memory_budget is None or opq.estimated_bytes(len(vectors)) <= options.memory_budget
    best = opq if fits and scores[opq.factory] > scores[spec.factory] else spec
    return best, {"sample": len(sample), "nprobe": 16, "recall_at_10": scores, "chosen": best.factory}


def _query_rows(n: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, min(n, wanted), replace=False))


def exact_neighbours(vectors: np.ndarray, query_rows: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """Each query row's exact top-k by inner product, its own row left out.

    faiss.knn scans `vectors` where they are (a memory-mapped file is not copied into memory)."""
    _, found = faiss.knn(np.ascontiguousarray(vectors[query_rows]), vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _without_self(found, query_rows, k)


def _without_self(found: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, own) in enumerate(zip(found, query_rows)):
        kept = row[(row != own) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def recall_at_k(index: faiss.Index, vectors: np.ndarray, query_rows: np.ndarray, truth: np.ndarray,
                k: int = RECALL_K) -> float:
    """Mean share of each query's exact top-k (own row excluded) that `index` also returns."""
    _, found = index.search(vectors[query_rows], k + 1)
    found = _without_self(found, query_rows, k)
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def tune(index: faiss.Index, parameter: str | None, vectors: np.ndarray, query_rows: np.ndarray,
         truth: np.ndarray, target: float) -> tuple[int | None, float, list[list[float]]]:
    """Raise `parameter` step by step until recall@10 reaches `target` (or the steps end)."""
    if parameter is None:
        return None, recall_at_k(index, vectors, query_rows, truth), []
    steps = EF_SEARCH_STEPS if parameter == "efSearch" else NPROBE_STEPS
    if parameter == "nprobe":
        steps = tuple(s for s in steps if s <= faiss.extract_index_ivf(index).nlist)
    space, tried = faiss.ParameterSpace(), []
    best = (steps[0], -1.0)
    for value in steps:
        space.set_index_parameter(index, parameter, value)
        recall = recall_at_k(index, vectors, query_rows, truth)
        tried.append([value, round(recall, 4)])
        if recall > best[1]:
            best = (value, recall)
        if recall >= target:
            return value, recall, tried
    space.set_index_parameter(index, parameter, best[0])
    return best[0], best[1], tried


def apply_search_parameters(index: faiss.Index, parameters: dict[str, int]) -> None:
    """Set the tuned efSearch / nprobe recorded in the manifest on an opened index."""
    space = faiss.ParameterSpace()
    for name, value in parameters.items():
        space.set_index_parameter(index, name, int(value))


UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
         "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """'512MB', '1.5GiB', '200000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"memory budget {text!r} is not a size: use e.g. 800MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_bytes(n: int | None) -> str:
    if n is None:
        return "no limit"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
