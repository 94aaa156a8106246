"""Attribute selection: which source rows become products, and which values each group keeps.

Shared by the importers whose sources carry free-form columns: Fashion Product Images' presets
and the generic table importer. A selection is data (`AttributeSelection`), so a preset, a TOML
file and a test all describe it the same way, and the manifest records it.

Each group takes a source column as is, or derives its values from rules; it may keep only its
`top` most frequent values and values with at least `min_count` rows, and says what happens to
the rest (`rare`) and to rows without a value (`missing`): map them to the selection's `other`
value, or leave the row out. Groups are resolved in order: a group's counts cover the rows that
the `where` filter and the earlier groups kept. The schema lists each group's values by
frequency in the catalogue (descending, then name), `other` last; ties in `top` also break by
name.

A group with a `separator` is multi-label: its column holds several values (split on the
separator, trimmed, empties dropped, repeats once). A product counts once for each of its
values. There, `rare = "drop"` removes the rare values from the product rather than the
product (dropping every product with one uncommon tag would drop most of a shop), and
`rare = "other"` replaces them by one `other`; a product left with no value is `missing`.

Which source columns a selection may name is the subclass's business (`allowed_columns`, e.g.
Fashion Product Images' fixed columns, checked when the selection is made); with None, the
columns are checked against the source when the selection is applied.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from atelier.catalog.schema import AttributeGroup, AttributeSchema

POLICIES = ("other", "drop")


def _check_column(owner: str, column: str, allowed: tuple[str, ...] | None, what: str = "unknown column") -> None:
    if allowed is not None and column not in allowed:
        raise ValueError(f"{owner}: {what} {column!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class GroupSelection:
    """One attribute group: where its values come from and what happens to the rest.

    `column` takes a source column as is; `derive` instead maps value -> (column, source value),
    first match wins, rows matching no rule count as missing. `separator` (with `column` only)
    makes the group multi-label.
    """

    name: str
    column: str | None = None
    derive: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    top: int | None = None
    min_count: int = 1
    rare: str = "drop"
    missing: str = "drop"
    separator: str | None = None

    allowed_columns: ClassVar[tuple[str, ...] | None] = None  # None: any, checked against the source

    def __post_init__(self) -> None:
        if (self.column is None) == (not self.derive):
            raise ValueError(f"group {self.name!r}: give either column or derive rules, not both or neither")
        for col in self.source_columns:
            _check_column(f"group {self.name!r}", col, self.allowed_columns)
        for policy, value in (("rare", self.rare), ("missing", self.missing)):
            if value not in POLICIES:
                raise ValueError(f"group {self.name!r}: {policy}={value!r}; allowed: {', '.join(POLICIES)}")
        if self.top is not None and self.top < 1:
            raise ValueError(f"group {self.name!r}: top must be >= 1 or None, got {self.top}")
        if self.min_count < 1:
            raise ValueError(f"group {self.name!r}: min_count must be >= 1, got {self.min_count}")
        if self.separator is not None and (not self.separator or self.column is None):
            raise ValueError(f"group {self.name!r}: a separator needs a column and must not be empty")

    @property
    def multi_label(self) -> bool:
        return self.separator is not None

    @property
    def source_columns(self) -> tuple[str, ...]:
        return (self.column,) if self.column is not None else tuple(dict.fromkeys(c for c, _ in self.derive.values()))

    def raw_values(self, columns: Mapping[str, list]) -> list:
        """Per row: the value (None: missing), or for a multi-label group a tuple of values (None: none)."""
        if self.column is not None and self.separator is not None:
            out = []
            for v in columns[self.column]:
                parts = () if v is None else tuple(dict.fromkeys(p.strip() for p in str(v).split(self.separator)))
                parts = tuple(p for p in parts if p)
                out.append(parts or None)
            return out
        if self.column is not None:
            return [None if v is None else str(v) for v in columns[self.column]]
        n = len(next(iter(columns.values())))
        derived: list[str | None] = [None] * n
        for value, (col, source_value) in reversed(list(self.derive.items())):  # first rule wins
            for i, v in enumerate(columns[col]):
                if v is not None and str(v) == source_value:
                    derived[i] = value
        return derived


@dataclass(frozen=True)
class AttributeSelection:
    """Which rows (`where`: column -> allowed values) and which attribute groups to import."""

    name: str
    groups: tuple[GroupSelection, ...]
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    other: str = "other"

    allowed_columns: ClassVar[tuple[str, ...] | None] = None  # None: any, checked against the source

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        where = {c: tuple(str(x) for x in ((v,) if isinstance(v, (str, int)) else v)) for c, v in self.where.items()}
        object.__setattr__(self, "where", where)
        names = [g.name for g in self.groups]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"selection {self.name!r}: needs at least one group and unique group names, got {names}")
        for col in self.where:
            _check_column(f"selection {self.name!r}", col, self.allowed_columns, "where on unknown column")

    @property
    def source_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.where, *(c for g in self.groups for c in g.source_columns)]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Selected:
    """The rows a selection keeps (id, split, one column per group, source order), and why others went."""

    table: pa.Table
    schema: AttributeSchema
    report: dict[str, Any]


def select_attributes(attributes: pa.Table, selection: AttributeSelection, split_of: Callable[[str], str]) -> Selected:
    """Apply a selection to a source's attribute rows (no images involved: this is cheap).

    `split_of(id)` gives each kept product's split (`train` / `test`).
    """
    absent = [c for c in ("id", *selection.source_columns) if c not in attributes.column_names]
    if absent:
        raise ValueError(f"selection {selection.name!r} needs column(s) {absent}; the source has {attributes.column_names}")
    columns = {c: attributes.column(c).to_pylist() for c in ("id", *selection.source_columns)}
    n = attributes.num_rows
    keep = [True] * n
    report: dict[str, Any] = {"selection": selection.name, "rows_in": n, "dropped_by_where": 0, "groups": {}}
    for col, allowed in selection.where.items():
        allowed_set = set(allowed)
        for i, v in enumerate(columns[col]):
            if keep[i] and (None if v is None else str(v)) not in allowed_set:
                keep[i] = False
                report["dropped_by_where"] += 1

    values: dict[str, list] = {}
    for g in selection.groups:
        resolve = _resolve_multi_label if g.multi_label else _resolve_single_label
        values[g.name], report["groups"][g.name] = resolve(g, g.raw_values(columns), keep, selection.other)

    rows = [i for i in range(n) if keep[i]]
    if not rows:
        raise ValueError(f"selection {selection.name!r} keeps none of the {n} source rows")
    ids = [columns["id"][i] for i in rows]
    groups = [_group_of(g, [values[g.name][i] for i in rows], selection.other) for g in selection.groups]
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "split": pa.array([split_of(x) for x in ids], pa.string()),
        **{group.name: _column(group, [values[group.name][i] for i in rows]) for group in groups},
    })
    report["rows_out"] = len(rows)
    return Selected(table, AttributeSchema(tuple(groups)), report)


def _vocabulary(g: GroupSelection, counts: Counter, other: str) -> tuple[set[str], dict[str, Any]]:
    """The values a group keeps (top / min_count), and the start of its report."""
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    vocabulary = set([v for v in ranked if counts[v] >= g.min_count][: g.top])
    if (g.rare == "other" or g.missing == "other") and other.casefold() in {v.casefold() for v in vocabulary}:
        raise ValueError(f"group {g.name!r}: the data has a value {other!r}; give the selection another `other` name")
    rare_values = sorted(set(counts) - vocabulary)
    return vocabulary, {"missing": 0, "rare": 0, "missing_policy": g.missing, "rare_policy": g.rare,
                        "rare_values": rare_values}


def _resolve_single_label(g: GroupSelection, raw: list, keep: list[bool], other: str) -> tuple[list, dict[str, Any]]:
    """Each kept row's value, `other` or None; rows dropped by the policies are unset in `keep`."""
    vocabulary, stats = _vocabulary(g, Counter(v for i, v in enumerate(raw) if keep[i] and v is not None), other)
    out: list[str | None] = [None] * len(raw)
    for i, v in enumerate(raw):
        if not keep[i]:
            continue
        kind = "missing" if v is None else None if v in vocabulary else "rare"
        if kind is None:
            out[i] = v
            continue
        stats[kind] += 1
        if getattr(g, kind) == "drop":
            keep[i] = False
        else:
            out[i] = other
    return out, stats


def _resolve_multi_label(g: GroupSelection, raw: list, keep: list[bool], other: str) -> tuple[list, dict[str, Any]]:
    """Each kept row's tuple of values; `rare` counts values, `missing` products left with none."""
    counts = Counter(v for i, vs in enumerate(raw) if keep[i] and vs for v in vs)
    vocabulary, stats = _vocabulary(g, counts, other)
    out: list[tuple[str, ...] | None] = [None] * len(raw)
    for i, vs in enumerate(raw):
        if not keep[i]:
            continue
        kept = [v for v in vs or () if v in vocabulary]
        rare = len(vs or ()) - len(kept)
        stats["rare"] += rare
        if rare and g.rare == "other":
            kept.append(other)
        if not kept:
            stats["missing"] += 1
            if g.missing == "drop":
                keep[i] = False
                continue
            kept = [other]
        out[i] = tuple(kept)
    return out, stats


def _group_of(g: GroupSelection, values: list, other: str) -> AttributeGroup:
    """The schema's group: values by frequency among the kept rows, `other` last."""
    counts = Counter(v for vs in values for v in vs) if g.multi_label else Counter(values)
    real = sorted((v for v in counts if v != other), key=lambda v: (-counts[v], v))
    return AttributeGroup(g.name, tuple(real + ([other] if other in counts else [])), multi_label=g.multi_label)


def _column(group: AttributeGroup, values: list) -> pa.Array:
    if not group.multi_label:
        return pa.array(values, pa.string())
    position = {v: k for k, v in enumerate(group.values)}  # a product's values in schema order
    return pa.array([sorted(vs, key=position.__getitem__) for vs in values], pa.list_(pa.string()))
