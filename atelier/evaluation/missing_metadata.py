"""`atelier eval-missing`: what drawing buys when product metadata is missing.

A shop's metadata has holes: a product without a colour cannot be found by a colour filter,
but its photo still shows the colour. This measures it on an index whose metadata is complete:
for a blanked group g and a fraction f, a deterministic pseudo-random fraction f of the
products get no value (null) in g (images and vectors untouched), and the index is served in
process with that metadata. Requests: every (type value, colour value) pair of `pair` with at
least `min_products` products whose TRUE values are that pair. Three methods return k products:

    metadata_filter        no drawing: the products whose (blanked) metadata has both values,
                           the first k in a fixed random order of the pair (a filter has no ranking)
    generate_and_retrieve  GenerateAndRetrieve with the pair as attributes, no filter
    hybrid                 GenerateAndRetrieve with the filter {type: T, colour: C} (the matching
                           products, ranked by the drawings); when fewer than k come back, the rest
                           from a second request filtered {type: [T, ""], colour: [C, ""]} (also
                           products whose value is missing), skipping ids already chosen, in that
                           request's rank order

Metric: capped recall@k = |returned ∩ truly matching| / min(k, truly matching products), per
request, averaged over the requests; the truth is the index's own (unblanked) metadata.

Which products are blanked: product p when `blank_score(p, seed) < f`, a hash of its id and the
seed, so every run blanks the same products and the set at 0.5 holds the set at 0.25. Each
request's seed is `condition_seed(seed, pair)`, the same for every method and fraction. The
generator's drawings and the unfiltered search read no metadata, so generate_and_retrieve is
asked once per pair and scored at every fraction (tests check a blanked index answers the same).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from atelier.evaluation.retrieval_quality import condition_seed
from atelier.evaluation.summary import MISSING_METADATA
from atelier.generator import load_generator
from atelier.indexer.index_directory import MISSING, IndexDirectory
from atelier.progress import progress_bar
from atelier.retrieval.batching import BatchPolicy
from atelier.retrieval.service import (
    IncompatibleArtifacts,
    Limits,
    LoadedModel,
    RetrievalRequest,
    RetrievalService,
    check_index,
)

__all__ = ["METHODS", "MissingSettings", "blank_products", "blank_score", "blanked_index", "capped_recall",
           "evaluate_missing", "format_markdown", "summary_entry", "write_report"]

FILTER, GENERATED, HYBRID = "metadata_filter", "generate_and_retrieve", "hybrid"
METHODS = (FILTER, GENERATED, HYBRID)
TITLES = {FILTER: "metadata filter", GENERATED: "generate-and-retrieve", HYBRID: "hybrid"}
REFERENCE = "none"  # the row with nothing blanked


@dataclass(frozen=True)
class MissingSettings:
    pair: tuple[str, str]  # (type group, colour group): the two groups every request names
    blank: tuple[str, ...] = ()  # groups blanked, each measured on its own; () = both groups of `pair`
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # fraction 0 (nothing blanked) is always measured too
    k: int = 10
    samples: int = 4  # drawings per request
    min_products: int = 1  # pairs with fewer truly matching products are not asked
    seed: int = 0
    progress: bool = True


# -- the pieces -------------------------------------------------------------------------------
def blank_score(product_id: str, seed: int = 0) -> float:
    """A product's place in [0, 1): a hash of its id and the seed, the same in every process."""
    digest = hashlib.blake2b(f"{int(seed)}:{product_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def blanked_mask(ids: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Which of `ids` are blanked at `fraction`: those whose `blank_score` lies below it."""
    return np.array([blank_score(pid, seed) < fraction for pid in ids], dtype=bool)


def blank_products(products: pa.Table, group: str, fraction: float, seed: int = 0) -> pa.Table:
    """A copy of `products` with `group` set to null for the blanked products; other columns as they are."""
    if group not in products.column_names:
        raise ValueError(f"the products have no column {group!r}; they have {', '.join(products.column_names)}")
    mask = blanked_mask(products.column("id").to_pylist(), fraction, seed)
    column = products.column(group)
    blanked = pc.if_else(pa.array(mask), pa.scalar(None, type=column.type), column)
    position = products.column_names.index(group)
    return products.set_column(position, products.schema.field(group), blanked)


def blanked_index(index: IndexDirectory, group: str, fraction: float, seed: int = 0) -> IndexDirectory:
    """`index` with `group` blanked for a fraction of its products (FAISS index and vectors shared)."""
    return dataclasses.replace(index, products=blank_products(index.products, group, fraction, seed), _columns={})


def capped_recall(returned: Sequence[str], relevant: set[str] | frozenset[str], k: int) -> float | None:
    """|returned ∩ relevant| / min(k, |relevant|), over the first k returned; None without relevant products."""
    if not relevant:
        return None
    return len(set(returned[:k]) & relevant) / min(k, len(relevant))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _key(fraction: float) -> str:
    return format(float(fraction), "g")


# -- checking what was asked ------------------------------------------------------------------
def check_settings(index: IndexDirectory, settings: MissingSettings) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(blanked groups, fractions without 0, sorted), or a ValueError naming what is allowed."""
    schema, pair = index.schema, tuple(settings.pair)
    single = [g.name for g in schema.groups if not g.multi_label]
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"--pair names two different groups (TYPE_GROUP,COLOUR_GROUP) of the index's: "
                         f"{', '.join(single)}; got {','.join(pair)}")
    for name in pair:
        if name not in single:
            raise ValueError(f"--pair group {name!r} is not a single-label group of index {index.path}; "
                             f"its groups: {', '.join(single)}")
    blank = tuple(dict.fromkeys(settings.blank or pair))
    for name in blank:
        if name not in pair:
            raise ValueError(f"--blank group {name!r} is not one of the --pair groups: {', '.join(pair)}")
    fractions = tuple(sorted({float(f) for f in settings.fractions} - {0.0}))
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"--fractions must lie in (0, 1] (0, nothing blanked, is always measured); got "
                         f"{list(settings.fractions)}")
    if settings.k < 1 or settings.samples < 1 or settings.min_products < 1:
        raise ValueError(f"--k, --samples and --min-products must be at least 1; got {settings.k}, "
                         f"{settings.samples}, {settings.min_products}")
    return blank, fractions


def check_model(model: LoadedModel, pair: tuple[str, str]) -> None:
    """A ValueError unless a request naming only the two groups of `pair` is one `model` takes."""
    schema, generator = model.generator.schema, model.generator
    lacking = [g for g in pair if g not in schema.names]
    if lacking:
        raise ValueError(f"model {model.name!r} does not know group(s) {lacking}; its groups: {', '.join(schema.names)}")
    others = [g.name for g in schema.groups if not g.multi_label and g.name not in pair]
    if others and not generator.accepts_partial:
        raise ValueError(f"model {model.name!r} needs every group asked ({', '.join(schema.names)}); --pair names "
                         f"only {', '.join(pair)}")


def open_service(index_path: Path, models: Mapping[str, Path], settings: MissingSettings,
                 sampling: Mapping[str, Mapping[str, Any]] | None = None) -> RetrievalService:
    """The service over the index with its true metadata, after checking the settings against the
    index (before the slow model loading) and each model against the pair and the index."""
    if len(models) != 1:
        raise ValueError(f"name exactly one model: --model NAME=CHECKPOINT (got {len(models)})")
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(models))
    if unknown:
        raise ValueError(f"sampling options for unknown model(s) {unknown}; models: {', '.join(models)}")
    index = IndexDirectory.open(index_path)
    check_settings(index, settings)
    embedder = check_index(index, {})
    loaded = {name: LoadedModel(name, *load_generator(path, sampling=sampling.get(name))) for name, path in models.items()}
    for model in loaded.values():
        check_model(model, settings.pair)
    limits = Limits(max_num_samples=max(32, settings.samples), max_top_k=max(100, settings.k),
                    max_candidates=max(1024, settings.samples * settings.k))
    try:
        return RetrievalService(index, embedder, loaded, limits, index_source=index_path,
                                batching=BatchPolicy(max_wait_ms=0.0))
    except IncompatibleArtifacts as error:
        raise ValueError(f"{error}; use a model trained on this index's catalogue "
                         f"(the index's groups: {describe_groups(index)})") from None


def describe_groups(index: IndexDirectory) -> str:
    return "; ".join(f"{g.name}: {', '.join(g.values)}" for g in index.schema.groups)


def served_copy(service: RetrievalService, index: IndexDirectory) -> RetrievalService:
    """A service like `service` (its models, embedder, limits) over `index` (other metadata)."""
    return RetrievalService(index, service.embedder, service.models, service.limits,
                            index_source=service.index_source, batching=service.batching)


# -- the requests and the three methods -------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    values: dict[str, str]  # the pair's group -> value, as asked
    relevant: frozenset[str]  # ids of the products whose TRUE metadata is the pair


def true_pairs(index: IndexDirectory, pair: tuple[str, str], model: LoadedModel, min_products: int) -> list[Pair]:
    """Every value pair of the two groups that the model can draw and at least `min_products`
    products have in the index's own metadata; most products first (ties by the values)."""
    columns = [index.products.column(g).to_pylist() for g in pair]
    drawable = [set(model.generator.schema.group(g).values) for g in pair]
    counts = Counter(combo for combo in zip(*columns) if all(v is not None for v in combo))
    ids = index.products.column("id")
    pairs = []
    for combo, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if n < min_products or not all(v in values for v, values in zip(combo, drawable)):
            continue
        values = dict(zip(pair, combo))
        rows = index.rows_matching({g: (v,) for g, v in values.items()})
        pairs.append(Pair(values, frozenset(ids.take(pa.array(rows)).to_pylist())))
    return pairs


def filter_ids(index: IndexDirectory, values: Mapping[str, str], order: np.ndarray, k: int) -> list[str]:
    """metadata_filter: the products whose metadata has every value, the first k by `order`
    (one random key per index row, fixed per pair: a filter has no ranking of its own)."""
    rows = index.rows_matching({g: (v,) for g, v in values.items()})
    chosen = rows[np.argsort(order[rows], kind="stable")[:k]]
    return index.products.column("id").take(pa.array(chosen, type=pa.int64())).to_pylist()


def generated_ids(service: RetrievalService, model: str, values: Mapping[str, str], settings: MissingSettings,
                  seed: int, filters: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The ids GenerateAndRetrieve returns for the pair (with `filters`, among the matching products)."""
    result = service.generate_and_retrieve(RetrievalRequest(
        dict(values), model=model, num_samples=settings.samples, top_k=settings.k, seed=seed,
        filters={g: list(v) for g, v in (filters or {}).items()}))
    return [p.id for p in result.products]


def hybrid_ids(service: RetrievalService, model: str, values: Mapping[str, str], settings: MissingSettings,
               seed: int) -> tuple[list[str], int]:
    """hybrid: the drawings ranking the products whose metadata has both values, then (when fewer
    than k) those whose metadata agrees or is missing, skipping ids already chosen. Returns
    (ids, how many came from the second request)."""
    chosen = generated_ids(service, model, values, settings, seed, {g: (v,) for g, v in values.items()})
    if len(chosen) >= settings.k:
        return chosen, 0
    exact = len(chosen)
    seen = set(chosen)
    for pid in generated_ids(service, model, values, settings, seed, {g: (v, MISSING) for g, v in values.items()}):
        if len(chosen) == settings.k:
            break
        if pid not in seen:
            chosen.append(pid)
            seen.add(pid)
    return chosen, len(chosen) - exact


def score_pair(pair: Pair, service: RetrievalService, model: str, settings: MissingSettings, seed: int,
               order: np.ndarray, generated: list[str]) -> dict[str, Any]:
    """One request's row at one blanking: what each method returned and its capped recall."""
    index = service.index
    returned = {FILTER: filter_ids(index, pair.values, order, settings.k), GENERATED: generated}
    returned[HYBRID], filled = hybrid_ids(service, model, pair.values, settings, seed)
    with_metadata = len(index.rows_matching({g: (v,) for g, v in pair.values.items()}))
    return {**pair.values, "products": len(pair.relevant), "with_metadata": with_metadata, "seed": seed,
            "returned": {m: len(ids) for m, ids in returned.items()},
            "relevant_returned": {m: len(set(ids) & pair.relevant) for m, ids in returned.items()},
            "recall": {m: capped_recall(ids, pair.relevant, settings.k) for m, ids in returned.items()},
            "hybrid_filled": filled, "ids": returned}


# -- the whole run ----------------------------------------------------------------------------
def evaluate_missing(index_path: Path, models: Mapping[str, Path], settings: MissingSettings,
                     sampling: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Capped recall@k of the three methods per (blanked group, fraction), and with nothing
    blanked; JSON-ready (see `format_markdown` for its table)."""
    started = time.perf_counter()
    service = open_service(index_path, models, settings, sampling)
    blank, fractions = check_settings(service.index, settings)
    model = service.default_model
    loaded = service.models[model]
    pairs = true_pairs(service.index, settings.pair, loaded, settings.min_products)
    if not pairs:
        raise ValueError(f"no {'/'.join(settings.pair)} pair that model {model!r} can draw has {settings.min_products} "
                         f"products in {index_path}; lower --min-products")
    rows = [(REFERENCE, 0.0, service)]
    rows += [(g, f, served_copy(service, blanked_index(service.index, g, f, settings.seed))) for g in blank for f in fractions]
    scored: dict[tuple[str, float], list[dict[str, Any]]] = {(g, f): [] for g, f, _ in rows}
    for pair in progress_bar(pairs, desc="pairs", disable=not settings.progress):
        seed = condition_seed(settings.seed, pair.values)
        order = np.random.default_rng(seed).random(len(service.index))
        generated = generated_ids(service, model, pair.values, settings, seed)  # reads no metadata: asked once
        for group, fraction, served in rows:
            scored[(group, fraction)].append(score_pair(pair, served, model, settings, seed, order, generated))

    def summary_row(group: str, fraction: float, served: RetrievalService) -> dict[str, Any]:
        entries = scored[(group, fraction)]
        return {"fraction": fraction,
                "products_without_value": served.index.products.column(group).null_count if group != REFERENCE else 0,
                "recall": {m: _mean([e["recall"][m] for e in entries]) for m in METHODS},
                "hybrid_filled_requests": sum(e["hybrid_filled"] > 0 for e in entries), "per_pair": entries}

    results: dict[str, dict[str, Any]] = {}
    for group, fraction, served in rows[1:]:
        results.setdefault(group, {})[_key(fraction)] = summary_row(group, fraction, served)
    return {
        "index": str(index_path), "index_version": service.index.version,
        "catalogue": service.index.manifest.get("catalogue", {}).get("name"), "products": len(service.index),
        "model": model, "checkpoint": str(models[model]), "model_version": loaded.version,
        "sampling": loaded.manifest.get("sampling"), "pair": list(settings.pair), "blank": list(blank),
        "fractions": list(fractions), "k": settings.k, "samples": settings.samples,
        "min_products": settings.min_products, "seed": settings.seed, "requests": len(pairs), "methods": list(METHODS),
        "reference": summary_row(REFERENCE, 0.0, service), "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- writing ----------------------------------------------------------------------------------
def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report's table: one row per (blanked group, fraction), the reference row first."""
    k, pair = report["k"], report["pair"]
    head = ["blanked", "fraction", "products without a value", *(TITLES[m] for m in METHODS)]
    least = report["min_products"]
    lines = [f"**Capped recall@{k} over {report['requests']} requests ({' x '.join(pair)} pairs with at least "
             f"{least} product{'s' if least != 1 else ''}; model `{report['model']}`, {report['samples']} drawings per "
             f"request; index {report['index_version']}, {report['products']:,} products)**", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = [(REFERENCE, report["reference"])]
    rows += [(group, row) for group, by_fraction in report["results"].items() for row in by_fraction.values()]
    for group, row in rows:
        cells = [group, _key(row["fraction"]), f"{row['products_without_value']:,}",
                 *(_f(row["recall"][m]) for m in METHODS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json and report.md in `out` (each written whole, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    for key, text in (("json", json.dumps(report, indent=2, default=float) + "\n"),
                      ("markdown", format_markdown(report) + "\n")):
        partial = paths[key].with_suffix(paths[key].suffix + ".partial")
        partial.write_text(text)
        os.replace(partial, paths[key])
    return paths


def summary_entry(report: dict[str, Any], report_path: str | None = None) -> dict[str, dict[str, Any]]:
    """{"missing-metadata": entry} for docs/results/summary.json: the first blanked group at the
    fraction nearest 0.5, and every measured fraction of every blanked group."""
    group = report["blank"][0]
    fraction = min(report["fractions"], key=lambda f: (abs(f - 0.5), f))
    recall = f"recall_at_{report['k']}"
    return {MISSING_METADATA: {
        "model": report["model"], "checkpoint": report["checkpoint"], "version": report["model_version"],
        "index": report["index"], "index_version": report["index_version"], "catalogue": report["catalogue"],
        "pair": report["pair"], "blanked": group, "fraction_missing": fraction,
        recall: report["results"][group][_key(fraction)]["recall"],
        "by_fraction": {g: {key: row["recall"] for key, row in rows.items()} for g, rows in report["results"].items()},
        f"{recall}_nothing_missing": report["reference"]["recall"],
        "k": report["k"], "requests": report["requests"], "samples": report["samples"], "seed": report["seed"],
        "command": report.get("command"), "report": report_path, "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }}
