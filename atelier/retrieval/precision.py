"""Attribute precision@k: the one scoring of retrieved products, used by the demo and `atelier eval`.

For each query (attribute group -> asked value) a method returns products in rank order;
precision@k is the share of the first k whose metadata has the asked value, per group and for
"all" asked groups at once, averaged over the queries. It always divides by k: a method that
returns fewer than k products scores the missing ones as misses.

Matching. A single-label product value is a hit when it equals the asked value (exact spelling).
A multi-label product value (a list) is a hit when it holds the asked value, or every asked value
when a list is asked. A product that lacks the group, or a value of None, is a miss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ALL", "has_value", "precision_at_k"]

ALL = "all"


def has_value(product_value: Any, asked: Any) -> bool:
    """Whether a product's value of one group matches the asked value (see the module notes)."""
    wanted = (asked,) if isinstance(asked, str) else tuple(asked)
    if product_value is None or not wanted:
        return False
    if isinstance(product_value, str):  # single-label
        return len(wanted) == 1 and product_value == wanted[0]
    held = set(product_value)  # multi-label: a list of values
    return all(v in held for v in wanted)


def precision_at_k(retrieved: Sequence[Sequence[Mapping[str, Any]]], asked: Sequence[Mapping[str, Any]],
                   groups: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float | None]]:
    """Attribute precision@k per group and for "all", averaged over queries.

    `retrieved[i]` is query i's products in rank order (dicts with a value per group), `asked[i]`
    its condition. For query i and group g: (products among the first k whose g matches) / k;
    results missing below k count as misses. "all": a product is a hit when every group of
    `groups` that the query asks matches. A query that does not ask a group is left out of that
    group's average; a group no query asks scores None.
    """
    if len(retrieved) != len(asked):
        raise ValueError(f"{len(retrieved)} result lists for {len(asked)} conditions")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be at least 1, got {list(ks)}")
    names = [*groups, ALL]
    scores: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in names}
    for products, condition in zip(retrieved, asked):
        asked_groups = [g for g in groups if g in condition]
        if not asked_groups:
            continue
        hits = {g: [has_value(p.get(g), condition[g]) for p in products] for g in asked_groups}
        hits[ALL] = [all(hits[g][i] for g in asked_groups) for i in range(len(products))]
        for name, row in hits.items():
            for k in ks:
                scores[name][k].append(sum(row[:k]) / k)
    return {name: {k: (float(np.mean(v)) if v else None) for k, v in per_k.items()} for name, per_k in scores.items()}
