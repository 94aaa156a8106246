"""`atelier eval`: several models side by side on one index (conditioning accuracy, diversity, speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atelier.catalog.catalogue import Catalogue
from atelier.evaluation.conditioning import KnnJudge, combinations_in_index, evaluate_generator, evaluate_real
from atelier.generator.checkpoint import load_generator
from atelier.indexer.embedders import build_embedder
from atelier.indexer.index_directory import IndexDirectory
from atelier.progress import progress_bar


def compare_models(index_path: Path, catalogue_path: Path, models: Mapping[str, Path], samples: int = 16,
                   seed: int = 0, minimum: int = 20, k: int = 10, progress: bool = True) -> dict[str, Any]:
    """Every model, and the real products as the reference, over the index's common conditions.

    The conditions are the single-label attribute combinations with at least `minimum` products
    in the index that every model can draw.
    """
    index = IndexDirectory.open(index_path)
    embedder = build_embedder(index.embedder["name"], int(index.embedder["input_size"]))
    loaded = {name: load_generator(path) for name, path in models.items()}
    schema = next(iter(loaded.values()))[0].schema if loaded else index.schema
    judge = KnnJudge.over(index, schema, k=k)
    conditions = [c for c in combinations_in_index(index, schema, minimum)
                  if all(c[g] in m.schema.group(g).values for m, _ in loaded.values() for g in c)]
    if not conditions:
        raise ValueError(f"no attribute combination has {minimum} products in {index_path}; lower --min-products")
    catalogue = Catalogue.open(catalogue_path)
    images, rows = catalogue.load_images()
    by_id = {pid: i for i, pid in enumerate(rows.column("id").to_pylist())}

    def load(ids: list[str]) -> np.ndarray:
        return images[[by_id[i] for i in ids]]

    results: dict[str, Any] = {"real products": evaluate_real(index, judge, conditions, load, samples, seed)}
    for name, (model, manifest) in progress_bar(loaded.items(), desc="models", disable=not progress):
        result = evaluate_generator(model, embedder, judge, conditions, samples, seed)
        result.update(family=model.family, image_size=model.image_size, version=manifest["version"],
                      training_seconds=manifest.get("training", {}).get("seconds"),
                      images_seen=manifest.get("training", {}).get("images_seen"))
        results[name] = result
    return {"index": str(index_path), "index_version": index.version, "embedder": index.embedder["name"],
            "judge": f"{k}-NN majority vote over {len(index)} products", "groups": list(judge.groups),
            "conditions": conditions, "samples_per_condition": samples, "seed": seed, "results": results}


def format_markdown(report: dict[str, Any]) -> str:
    groups = report["groups"]
    head = ["model", *(f"{g} acc." for g in groups), "all acc.", "diversity (cosine)", "diversity (pixels)",
            "sampling img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in report["results"].items():
        speed = r.get("sampling_images_per_second")
        cells = [name, *(f"{r['accuracy'][g]:.3f}" for g in groups), f"{r['accuracy']['all']:.3f}",
                 f"{r['diversity_cosine']:.3f}", f"{r['diversity_pixels']:.1f}", f"{speed:.0f}" if speed else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
