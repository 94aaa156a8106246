"""AttributeSchema: the attribute groups a catalogue is described by, and their encoding.

A group is single-label (exactly one value per product, e.g. `category`) or multi-label (any
number, e.g. DeepFashion's `texture`). The condition vector is the concatenation, group by
group in schema order, of a one-hot (single-label) or multi-hot (multi-label) block. The
schema is saved inside every model and index so that the two only combine when they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AttributeValues = str | Sequence[str]


class InvalidAttributes(ValueError):
    """A request's attributes do not fit the schema; the message says what is allowed."""


@dataclass(frozen=True)
class AttributeGroup:
    name: str
    values: tuple[str, ...]
    multi_label: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise ValueError(f"attribute group {self.name!r} has no values")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"attribute group {self.name!r} repeats a value")

    def index_of(self, value: str) -> int:
        """Position of `value`; exact match first, then a unique case-insensitive one."""
        try:
            return self.values.index(value)
        except ValueError:
            folded = [i for i, v in enumerate(self.values) if v.casefold() == str(value).casefold()]
            if len(folded) == 1:
                return folded[0]
        raise InvalidAttributes(
            f"unknown value {value!r} for attribute {self.name!r}; allowed: {', '.join(self.values)}"
        )


@dataclass(frozen=True)
class AttributeSchema:
    groups: tuple[AttributeGroup, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute schema repeats a group name: {names}")

    # -- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> AttributeGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise InvalidAttributes(f"unknown attribute {name!r}; allowed: {', '.join(self.names)}")

    @property
    def condition_dim(self) -> int:
        return sum(len(g.values) for g in self.groups)

    # -- validation and encoding --------------------------------------------------------------
    def normalise(self, attributes: Mapping[str, AttributeValues], require_all: bool = True) -> dict[str, tuple[str, ...]]:
        """Check attributes against the schema; return canonical spellings as value tuples.

        Single-label groups take exactly one value; with `require_all` every single-label
        group must be given (models without an "any" value cannot draw an unspecified group).
        """
        result: dict[str, tuple[str, ...]] = {}
        for name, raw in attributes.items():
            g = self.group(name)
            values = (raw,) if isinstance(raw, str) else tuple(raw)
            if not values:
                raise InvalidAttributes(f"attribute {name!r} has no value; allowed: {', '.join(g.values)}")
            if not g.multi_label and len(values) != 1:
                raise InvalidAttributes(
                    f"attribute {name!r} takes exactly one value, got {len(values)}: {list(values)}"
                )
            canonical = tuple(g.values[g.index_of(v)] for v in values)
            if len(set(canonical)) != len(canonical):
                raise InvalidAttributes(f"attribute {name!r} repeats a value: {list(values)}")
            result[g.name] = canonical
        if require_all:
            missing = [g.name for g in self.groups if not g.multi_label and g.name not in result]
            if missing:
                raise InvalidAttributes(
                    "missing attribute(s) " + ", ".join(repr(m) for m in missing)
                    + "; each needs one of: "
                    + "; ".join(f"{m}: {', '.join(self.group(m).values)}" for m in missing)
                )
        return result

    def indices(self, attributes: Mapping[str, AttributeValues]) -> dict[str, list[int]]:
        """Value positions per group (the input of embedding layers)."""
        normal = self.normalise(attributes, require_all=False)
        return {name: [self.group(name).values.index(v) for v in vals] for name, vals in normal.items()}

    def encode(self, attributes: Mapping[str, AttributeValues], require_all: bool = True) -> np.ndarray:
        """Attributes -> condition vector (one-hot / multi-hot blocks, float32)."""
        normal = self.normalise(attributes, require_all=require_all)
        vector = np.zeros(self.condition_dim, dtype=np.float32)
        offset = 0
        for g in self.groups:
            for v in normal.get(g.name, ()):
                vector[offset + g.values.index(v)] = 1.0
            offset += len(g.values)
        return vector

    def decode(self, vector: np.ndarray, threshold: float = 0.5) -> dict[str, str | tuple[str, ...]]:
        """Condition vector -> attributes: argmax for single-label, > threshold for multi-label."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.condition_dim,):
            raise ValueError(f"condition vector has shape {vector.shape}, expected ({self.condition_dim},)")
        result: dict[str, str | tuple[str, ...]] = {}
        offset = 0
        for g in self.groups:
            block = vector[offset : offset + len(g.values)]
            offset += len(g.values)
            if g.multi_label:
                result[g.name] = tuple(v for v, x in zip(g.values, block) if x > threshold)
            elif block.max() > 0:
                result[g.name] = g.values[int(block.argmax())]
        return result

    def combinations(self, group_names: Iterable[str] | None = None) -> list[dict[str, str]]:
        """Every combination of values of the named single-label groups (default: all of them)."""
        names = list(group_names) if group_names is not None else [g.name for g in self.groups if not g.multi_label]
        combos: list[dict[str, str]] = [{}]
        for name in names:
            combos = [{**c, name: v} for c in combos for v in self.group(name).values]
        return combos

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"groups": [{"name": g.name, "values": list(g.values), "multi_label": g.multi_label} for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeSchema:
        return cls(tuple(AttributeGroup(g["name"], tuple(g["values"]), bool(g.get("multi_label", False))) for g in data["groups"]))

    def fits_within(self, other: AttributeSchema) -> str | None:
        """None when every group here is in `other` with the same kind and a subset of its values.

        A model trained on a selection (e.g. six colours) can then serve an index whose catalogue
        carries more (those six plus `other`); a request is validated against the model's schema.
        """
        for g in self.groups:
            if g.name not in other.names:
                return f"attribute {g.name!r} is not in the other schema (groups: {', '.join(other.names)})"
            theirs = other.group(g.name)
            if theirs.multi_label != g.multi_label:
                return f"attribute {g.name!r} is multi-label in one schema and single-label in the other"
            extra = [v for v in g.values if v not in theirs.values]
            if extra:
                return f"attribute {g.name!r} has values {extra} that the other schema lacks"
        return None

    def describe_difference(self, other: AttributeSchema) -> str | None:
        """None when equal, else a sentence saying how the two schemas differ."""
        if self == other:
            return None
        if self.names != other.names:
            return f"attribute groups differ: {list(self.names)} vs {list(other.names)}"
        for a, b in zip(self.groups, other.groups):
            if a != b:
                return f"attribute {a.name!r} differs: values {list(a.values)} vs {list(b.values)}"
        return "schemas differ"
