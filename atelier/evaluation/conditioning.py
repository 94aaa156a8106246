"""Which conditions to ask for, and how to score what the judge saw against what was asked.

Conditioning accuracy: the share of images whose judged value equals the asked one, per
single-label group and for all groups at once. Diversity within one condition: the mean
pairwise cosine distance of the judge's features (0 = every image the same); real products of
the condition give the reference value.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_directory import IndexDirectory


def combinations_in_index(index: IndexDirectory, schema: AttributeSchema, minimum: int,
                          groups: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every combination of the schema's single-label values (of `groups` only, when given) with
    at least `minimum` products."""
    groups = list(groups) or [g.name for g in schema.groups if not g.multi_label]
    table = index.products.select(groups).to_pylist()
    counts = Counter(tuple(row[g] for g in groups) for row in table)
    allowed = [set(schema.group(g).values) for g in groups]
    return [dict(zip(groups, combo)) for combo, n in sorted(counts.items(), key=lambda item: -item[1])
            if n >= minimum and all(v in values for v, values in zip(combo, allowed))]


def score(asked: list[dict[str, str]], predicted: list[dict[str, Any]], groups: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per group and for all groups together."""
    result = {g: float(np.mean([p[g] == a[g] for a, p in zip(asked, predicted)])) for g in groups}
    result["all"] = float(np.mean([all(p[g] == a[g] for g in groups) for a, p in zip(asked, predicted)]))
    return result


def mean_pairwise_cosine_distance(features: np.ndarray) -> float:
    """Mean over distinct pairs of 1 - cosine similarity; NaN for fewer than two images."""
    n = len(features)
    if n < 2:
        return float("nan")
    v = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = v @ v.T
    return float((1.0 - similarity[~np.eye(n, dtype=bool)]).mean())
