"""Does a generator draw what was asked, and does it draw more than one thing? Measured.

Conditioning accuracy uses a k-nearest-neighbour judge: an image's attributes are predicted by
the majority vote of its k nearest catalogue products in the index's embedding space (the same
CNN that serves retrieval). Its own accuracy on real catalogue images, each with itself left
out, is reported beside every model as the ceiling a perfect generator would reach.

Diversity is measured under one fixed condition: the mean pairwise cosine distance between the
embeddings of `n` samples (0 = all identical), and the mean absolute pixel difference between
them (0-255). Real products sharing the condition give the reference values: a model far below
them has collapsed towards one image per condition.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator
from atelier.indexer.embedders import Embedder
from atelier.indexer.index_directory import IndexDirectory


@dataclass
class KnnJudge:
    index: IndexDirectory
    groups: tuple[str, ...]  # the single-label groups it judges
    columns: dict[str, list]  # group -> its value for each index row, read once
    k: int = 10

    @classmethod
    def over(cls, index: IndexDirectory, schema: AttributeSchema, k: int = 10) -> "KnnJudge":
        """A judge for `schema`'s single-label groups (multi-label ones have no single answer)."""
        groups = tuple(g.name for g in schema.groups if not g.multi_label)
        if not groups:
            raise ValueError("the schema has no single-label attribute group to judge")
        return cls(index, groups, {g: index.products.column(g).to_pylist() for g in groups}, k)

    def predict(self, vectors: np.ndarray, exclude_rows: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Per vector, the commonest value of each group among its k nearest products."""
        extra = 1 if exclude_rows is not None else 0
        _, rows = self.index.search(vectors, self.k + extra)
        predictions = []
        for i, neighbours in enumerate(rows):
            kept = [r for r in neighbours if r >= 0 and (exclude_rows is None or r != exclude_rows[i])][: self.k]
            predictions.append({g: Counter(self.columns[g][r] for r in kept).most_common(1)[0][0] for g in self.groups})
        return predictions


def combinations_in_index(index: IndexDirectory, schema: AttributeSchema, minimum: int) -> list[dict[str, str]]:
    """Every combination of the schema's single-label values with at least `minimum` products."""
    groups = [g.name for g in schema.groups if not g.multi_label]
    table = index.products.select(groups).to_pylist()
    counts = Counter(tuple(row[g] for g in groups) for row in table)
    allowed = [set(schema.group(g).values) for g in groups]
    return [dict(zip(groups, combo)) for combo, n in sorted(counts.items(), key=lambda item: -item[1])
            if n >= minimum and all(v in values for v, values in zip(combo, allowed))]


def pairwise_diversity(vectors: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    """(mean pairwise cosine distance of unit vectors, mean pairwise |pixel difference|)."""
    n = len(vectors)
    similarity = vectors @ vectors.T
    off_diagonal = ~np.eye(n, dtype=bool)
    cosine = float((1.0 - similarity[off_diagonal]).mean())
    flat = images.reshape(n, -1).astype(np.float32)
    pixels = float(np.mean([np.abs(flat[i] - flat[j]).mean() for i in range(n) for j in range(i + 1, n)]))
    return cosine, pixels


def score(asked: list[dict[str, str]], predicted: list[dict[str, Any]], groups: tuple[str, ...]) -> dict[str, float]:
    result = {g: float(np.mean([p[g] == a[g] for a, p in zip(asked, predicted)])) for g in groups}
    result["all"] = float(np.mean([all(p[g] == a[g] for g in groups) for a, p in zip(asked, predicted)]))
    return result


def evaluate_generator(model: ConditionalGenerator, embedder: Embedder, judge: KnnJudge,
                       conditions: list[dict[str, str]], samples: int = 16, seed: int = 0) -> dict[str, Any]:
    """Conditioning accuracy (judge) and within-condition diversity over `conditions`."""
    asked, predicted, cosines, pixels = [], [], [], []
    seconds = 0.0
    for i, condition in enumerate(conditions):
        start = time.perf_counter()
        images = model.sample(condition, samples, seed=seed + i)
        seconds += time.perf_counter() - start
        vectors = embedder.embed(images)
        predicted += judge.predict(vectors)
        asked += [condition] * samples
        cosine, pixel = pairwise_diversity(vectors, images)
        cosines.append(cosine)
        pixels.append(pixel)
    return {"accuracy": score(asked, predicted, judge.groups), "diversity_cosine": float(np.mean(cosines)),
            "diversity_pixels": float(np.mean(pixels)), "images": len(asked),
            "sampling_images_per_second": len(asked) / max(seconds, 1e-9)}


def evaluate_real(index: IndexDirectory, judge: KnnJudge, conditions: list[dict[str, str]], load_images,
                  samples: int = 16, seed: int = 0) -> dict[str, Any]:
    """The same measures on real products of each condition (the judge leaves each one out).

    `load_images(product_ids)` returns their images (uint8 NHWC) for the pixel diversity.
    """
    rng = np.random.default_rng(seed)
    groups = judge.groups
    table = index.products.select(["id", *groups]).to_pylist()
    asked, predicted, cosines, pixels = [], [], [], []
    for condition in conditions:
        rows = np.array([r for r, row in enumerate(table) if all(row[g] == condition[g] for g in groups)])
        rows = rng.choice(rows, size=min(samples, len(rows)), replace=False)
        vectors = index.vectors(rows)
        predicted += judge.predict(vectors, exclude_rows=rows)
        asked += [condition] * len(rows)
        if len(rows) >= 2:
            cosine, pixel = pairwise_diversity(vectors, load_images([table[r]["id"] for r in rows]))
            cosines.append(cosine)
            pixels.append(pixel)
    return {"accuracy": score(asked, predicted, groups), "diversity_cosine": float(np.mean(cosines)),
            "diversity_pixels": float(np.mean(pixels)), "images": len(asked)}
