"""Does GenerateAndRetrieve find products with the asked attributes? Attribute precision@k.

For each asked condition (attribute group -> value), a method returns its top k catalogue
products; precision@k is the share of those k whose metadata has the asked value, per group
and for "all" asked groups at once, averaged over the queries. Four methods, same queries:

    <model name>         the real `RetrievalService.generate_and_retrieve`, in process
    random products      k products drawn uniformly at random: the floor (the value's share)
    query by real image  a real product of the condition, from the held-out split, is the query:
                         its own stored vector is searched, itself excluded. What a perfect
                         generator (one that draws a real product) would get from the index
    metadata filter      products whose metadata equals the asked attributes, k of them in
                         random order: the ceiling (1.0 wherever k such products exist)

Matching and scoring: atelier.retrieval.precision (the demo scores with it too). Conditions are
expected in the schema's canonical spelling, as `combinations_in_index` gives.

Seeds. A generated query's request seed is `condition_seed(seed, condition)`: a function of the
condition, not of its position in the list, so one condition re-run alone (say for the HTML
report's pictures) returns the same products. The baselines draw query i from
`numpy.random.default_rng([seed, i])`, so one list of conditions repeats exactly.

Seen and held-out conditions: score the per-condition entries of one run separately
(`atelier eval` does), or call `evaluate_retrieval` once per list.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atelier.indexer.index_directory import IndexDirectory
from atelier.progress import progress_bar
from atelier.retrieval.precision import has_value, precision_at_k
from atelier.retrieval.service import RetrievalRequest, RetrievalService

RANDOM = "random products"
REAL_IMAGE = "query by real image"
METADATA = "metadata filter"
BASELINES = (RANDOM, REAL_IMAGE, METADATA)


@dataclass
class Retrieved:
    """What one method returned for a list of conditions; `results[i]` answers `conditions[i]`.

    Each result is the retrieved products in rank order, as dicts: "id" plus the product's
    attribute columns. `conditions` holds only the queries that ran; `skipped` the ones that
    could not (query by real image: no product of that condition to query with).
    """

    method: str
    conditions: list[dict[str, Any]]
    results: list[list[dict[str, Any]]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None  # how the method deviated from its description, if it did
    query_ids: list[str] | None = None  # query by real image: the product each query used
    seeds: list[int] | None = None  # generated: each request's seed
    images: list[np.ndarray] | None = None  # generated, when asked for: each query's samples (N, H, W, C)
    index_version: str | None = None
    # generated: the answers of requests that asked for exactly k products, per k. The service
    # merges the drawings' neighbours into its top k, so the first 5 of a top-10 answer need not
    # be the top-5 answer; precision@k is scored on the request that asked for k.
    results_at: dict[int, list[list[dict[str, Any]]]] | None = None

    def precision(self, groups: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float | None]]:
        if self.results_at is None:
            return precision_at_k(self.results, self.conditions, groups, ks)
        out: dict[str, dict[int, float | None]] = {}
        for k in ks:
            for name, per_k in precision_at_k(self.results_at[int(k)], self.conditions, groups, (k,)).items():
                out.setdefault(name, {}).update(per_k)
        return out


# -- the methods ------------------------------------------------------------------------------
def condition_seed(seed: int, condition: Mapping[str, Any]) -> int:
    """The request seed of `condition`: stable across runs, lists and positions."""
    text = json.dumps(_jsonable(condition), sort_keys=True)
    return (int(seed) * 1_000_003 + zlib.crc32(text.encode())) % (2**31)


def _generate_one(service: RetrievalService, model: str, condition: Mapping[str, Any], k: int,
                  num_samples: int | None, seed: int, return_images: bool):
    result = service.generate_and_retrieve(RetrievalRequest(
        dict(condition), model=model, num_samples=num_samples or 0, top_k=k, seed=seed, return_images=return_images))
    products = [{"id": p.id, **p.attributes} for p in result.products]
    images = np.stack(result.images) if return_images else None
    return products, images, result.index_version


def generated_queries(service: RetrievalService, model: str, conditions: Sequence[Mapping[str, Any]], k: int = 10,
                      num_samples: int | None = None, seed: int = 0, return_images: bool = False) -> Retrieved:
    """`service.generate_and_retrieve` once per condition (request seed `condition_seed(seed, c)`).

    `num_samples` None = the service's default (`Limits.default_num_samples`). With
    `return_images` the generated samples of each query are kept in `Retrieved.images`.
    Raises RuntimeError if the served index is swapped during the run (results would mix versions).
    """
    out = Retrieved(model, [dict(c) for c in conditions], [], seeds=[], images=[] if return_images else None)
    versions = set()
    for condition in conditions:
        request_seed = condition_seed(seed, condition)
        products, images, version = _generate_one(service, model, condition, k, num_samples, request_seed,
                                                  return_images)
        out.results.append(products)
        out.seeds.append(request_seed)
        versions.add(version)
        if return_images:
            out.images.append(images)
    if len(versions) > 1:
        raise RuntimeError(f"the served index changed during the run ({sorted(versions)}); run again")
    out.index_version = versions.pop() if versions else service.index.version
    return out


def _columns(index: IndexDirectory, conditions: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    names = sorted({g for c in conditions for g in c})
    missing = [g for g in names if g not in index.products.column_names]
    if missing:
        raise ValueError(f"index {index.path} has no attribute column {missing}; it has {index.products.column_names}")
    return {g: index.products.column(g).to_pylist() for g in names}


def _matching_rows(columns: Mapping[str, list], condition: Mapping[str, Any], rows: Iterable[int]) -> list[int]:
    return [r for r in rows if all(has_value(columns[g][r], v) for g, v in condition.items())]


def _products(index: IndexDirectory, columns: Sequence[str], rows: Sequence[int]) -> list[dict[str, Any]]:
    if not len(rows):
        return []
    return index.products.select(list(columns)).take(np.asarray(rows, dtype=np.int64)).to_pylist()


def _attribute_columns(index: IndexDirectory) -> list[str]:
    return ["id", *(name for name in index.schema.names if name in index.products.column_names)]


def random_products(index: IndexDirectory, conditions: Sequence[Mapping[str, Any]], k: int = 10,
                    seed: int = 0) -> Retrieved:
    """k distinct products drawn uniformly at random per query (all of them if fewer than k)."""
    n, wanted = len(index), _attribute_columns(index)
    results = [_products(index, wanted, np.random.default_rng([seed, i]).choice(n, size=min(k, n), replace=False))
               for i in range(len(conditions))]
    return Retrieved(RANDOM, [dict(c) for c in conditions], results, index_version=index.version)


def metadata_filter(index: IndexDirectory, conditions: Sequence[Mapping[str, Any]], k: int = 10,
                    seed: int = 0) -> Retrieved:
    """Per query, the products whose metadata matches every asked attribute: k of them in random
    order, or all of them (fewer than k) where fewer exist."""
    columns, wanted = _columns(index, conditions), _attribute_columns(index)
    results = []
    for i, condition in enumerate(conditions):
        rows = np.asarray(_matching_rows(columns, condition, range(len(index))), dtype=np.int64)
        rows = np.random.default_rng([seed, i]).permutation(rows)[:k]
        results.append(_products(index, wanted, rows))
    return Retrieved(METADATA, [dict(c) for c in conditions], results, index_version=index.version)


def query_by_real_image(index: IndexDirectory, conditions: Sequence[Mapping[str, Any]], k: int = 10,
                        split: str | None = "test", seed: int = 0,
                        splits: Mapping[str, str | None] | None = None) -> Retrieved:
    """Per query, a random real product of the condition from `split` is the query: its stored
    vector is searched over the whole index and the product itself is left out of its results.

    Which products are in `split`: `splits` (product id -> split, e.g. from the catalogue's
    `attributes()`) when given, else the index's own "split" column when it has one; with neither
    (or `split` None) any product of the condition may be the query, and `note` says so.
    Conditions without such a product are skipped: listed in `skipped`, not scored.
    """
    columns, wanted = _columns(index, conditions), _attribute_columns(index)
    note = None
    if split is None:
        pool = range(len(index))
        note = "no split asked for: query products drawn from all products"
    elif splits is not None:
        ids = index.products.column("id").to_pylist()
        pool = [r for r, pid in enumerate(ids) if splits.get(pid) == split]
    elif "split" in index.products.column_names:
        pool = [r for r, s in enumerate(index.products.column("split").to_pylist()) if s == split]
    else:
        pool = range(len(index))
        note = (f"the index has no 'split' column and no splits were given: query products drawn from all "
                f"products, not only split {split!r}")
    if note is None and not len(pool):
        note = f"no product is in split {split!r}: every query skipped"
    kept, query_rows, skipped = [], [], []
    for i, condition in enumerate(conditions):
        rows = _matching_rows(columns, condition, pool)
        if not rows:
            skipped.append(dict(condition))
            continue
        kept.append(dict(condition))
        query_rows.append(int(np.random.default_rng([seed, i]).choice(rows)))
    results, query_ids = [], []
    if query_rows:
        _, found = index.search(index.vectors(np.asarray(query_rows)), k + 1)
        for row, neighbours in zip(query_rows, found):
            others = [int(r) for r in neighbours if r >= 0 and r != row][:k]
            results.append(_products(index, wanted, others))
        query_ids = index.products.column("id").take(np.asarray(query_rows, dtype=np.int64)).to_pylist()
    return Retrieved(REAL_IMAGE, kept, results, skipped=skipped, note=note, query_ids=query_ids,
                     index_version=index.version)


# -- the whole comparison ---------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _keyed(precision: Mapping[str, Mapping[int, float | None]]) -> dict[str, dict[str, float | None]]:
    return {name: {str(k): p for k, p in per_k.items()} for name, per_k in precision.items()}


def evaluate_retrieval(service: RetrievalService, models: Sequence[str], conditions: Sequence[Mapping[str, Any]],
                       ks: Sequence[int] = (1, 5, 10), seed: int = 0, progress: bool = True,
                       num_samples: int | None = None, split: str | None = "test",
                       splits: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Attribute precision@k of each model's GenerateAndRetrieve and the three baselines.

    Every method answers the same `conditions` from the index the service serves now: the
    baselines with max(ks) products (their first k are their answer for k), each model with one
    request per k that asks for exactly k products (same seed, so the same drawings) (read once; a swap during the run raises RuntimeError). `num_samples` None = the
    service's default; `split`/`splits`: see `query_by_real_image`. JSON-ready result:

        {"ks": [1, 5, 10], "groups": [...], "queries": n, "seed": 0, "num_samples": ..., "index_version": ...,
         "methods": {method: {group or "all": {"1": p, "5": p, "10": p}}},   # p None: no query asked it
         "queries_per_method": {method: scored queries}, "skipped": {method: [condition, ...]},
         "notes": {method: str}, "seconds": {method: float},
         "per_condition": {method: [{"condition": {...}, "precision": {group: {"1": p}},
                                     "retrieved_ids": [...], "seed" (models) | "query_id" (real image)}]}}

    Methods, in order: "random products", "query by real image", "metadata filter", then models.
    """
    index = service.served.index
    models = list(models) or [service.default_model]
    ks, groups = _check_request(service, index, models, conditions, ks)
    k = ks[-1]

    runs: dict[str, Retrieved] = {}
    seconds: dict[str, float] = {}
    for name, method in ((RANDOM, lambda: random_products(index, conditions, k, seed)),
                         (REAL_IMAGE, lambda: query_by_real_image(index, conditions, k, split, seed, splits)),
                         (METADATA, lambda: metadata_filter(index, conditions, k, seed))):
        start = time.perf_counter()
        runs[name] = method()
        seconds[name] = time.perf_counter() - start

    for model in models:
        runs[model] = Retrieved(model, [dict(c) for c in conditions], [], seeds=[], index_version=index.version,
                                results_at={cut: [] for cut in ks})
        seconds[model] = 0.0
    for condition in progress_bar(conditions, desc="conditions", disable=not progress):
        request_seed = condition_seed(seed, condition)
        for model in models:
            for cut in ks:  # one request per k, same seed: the same drawings, asked for exactly k products
                start = time.perf_counter()
                products, _, version = _generate_one(service, model, condition, cut, num_samples, request_seed, False)
                seconds[model] += time.perf_counter() - start
                if version != index.version:
                    raise RuntimeError(f"the served index changed during the run ({index.version} -> {version}); "
                                       "run again")
                runs[model].results_at[cut].append(products)
            runs[model].results.append(products)  # the largest k's answer
            runs[model].seeds.append(request_seed)

    return {
        "ks": ks, "groups": groups, "queries": len(conditions), "seed": seed,
        "num_samples": num_samples or service.limits.default_num_samples, "index_version": index.version,
        "methods": {name: _keyed(run.precision(groups, ks)) for name, run in runs.items()},
        "queries_per_method": {name: len(run.results) for name, run in runs.items()},
        "skipped": {name: _jsonable(run.skipped) for name, run in runs.items() if run.skipped},
        "notes": {name: run.note for name, run in runs.items() if run.note},
        "seconds": seconds,
        "per_condition": {name: _per_condition(run, groups, ks) for name, run in runs.items()},
    }


def _check_request(service: RetrievalService, index: IndexDirectory, models: list[str],
                   conditions: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> tuple[list[int], list[str]]:
    """(sorted ks, the index's groups the conditions ask), or a ValueError saying what is wrong."""
    clash = [m for m in models if m in BASELINES]
    if clash:
        raise ValueError(f"model name(s) {clash} clash with a baseline's name; name the model otherwise")
    unknown = [m for m in models if m not in service.models]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(service.models)}")
    if not conditions:
        raise ValueError("no conditions to evaluate")
    ks = sorted({int(k) for k in ks})
    if ks[0] < 1 or ks[-1] > service.limits.max_top_k:
        raise ValueError(f"ks must lie in 1..{service.limits.max_top_k} (the service's max_top_k), got {ks}")
    asked = {g for c in conditions for g in c}
    groups = [g for g in index.schema.names if g in asked]
    strange = sorted(asked - set(groups))
    if strange:
        raise ValueError(f"conditions ask for {strange}, which index {index.version} lacks; it has {index.schema.names}")
    return ks, groups


def _per_condition(run: Retrieved, groups: list[str], ks: list[int]) -> list[dict[str, Any]]:
    entries = []
    for i, (condition, products) in enumerate(zip(run.conditions, run.results)):
        one = Retrieved(run.method, [condition], [products],
                        results_at=None if run.results_at is None else {k: [run.results_at[k][i]] for k in ks})
        entry = {"condition": _jsonable(condition), "precision": _keyed(one.precision(groups, ks)),
                 "retrieved_ids": [p["id"] for p in products]}
        if run.seeds is not None:
            entry["seed"] = run.seeds[i]
        if run.query_ids is not None:
            entry["query_id"] = run.query_ids[i]
        entries.append(entry)
    return entries
