"""Writer: collects embedded batches, then builds the index directory in the job's staging
folder and publishes it.

Images that could not be decoded are counted and listed (product id + reason) in the
manifest's `skipped`; the job fails, publishing nothing, once more than `max_failed_fraction`
of the catalogue has failed (as soon as that is certain, not only at the end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from atelier import artifacts
from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_choice import IndexOptions
from atelier.indexer.index_directory import build_index_directory
from atelier.indexer.mapper import Embedded


class TooManyFailures(RuntimeError):
    """More images failed to decode than the job allows; nothing was published."""


class IndexWriter:
    def __init__(self, stage: Path, dest: Path, schema: AttributeSchema, embedder: dict[str, Any],
                 catalogue: dict[str, Any], max_failed_fraction: float, index_options: IndexOptions | None = None):
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be within [0, 1], got {max_failed_fraction}")
        self.stage, self.dest, self.schema, self.embedder, self.catalogue = stage, dest, schema, embedder, catalogue
        self.max_failed_fraction = max_failed_fraction
        self.index_options = index_options
        self.expected = int(catalogue.get("rows") or 0)  # 0: unknown, checked at the end only
        self.vectors: list[np.ndarray] = []
        self.rows: list[pa.Table] = []
        self.skipped: list[dict[str, str]] = []

    def write(self, batch: Embedded) -> None:
        self.vectors.append(batch.vectors)
        self.rows.append(batch.rows)
        self.skipped.extend(batch.skipped)
        if self.expected:
            seen = sum(len(v) for v in self.vectors) + len(self.skipped)
            self._check(self.expected, "" if seen >= self.expected else "at least ")

    def _check(self, total: int, prefix: str = "") -> None:
        if total and len(self.skipped) / total > self.max_failed_fraction:
            raise TooManyFailures(
                f"{prefix}{len(self.skipped)} of {total} images could not be decoded (allowed fraction "
                f"{self.max_failed_fraction}); first: {self.skipped[:3]}; the previous index is untouched"
            )

    def close(self, extra: dict[str, Any] | None = None) -> Path:
        """Build the index in the staging folder and publish it; returns the version folder."""
        kept = sum(len(v) for v in self.vectors)
        total = kept + len(self.skipped)
        self._check(total)
        failures = {"skipped_count": len(self.skipped), "images": total,
                    "max_failed_fraction": self.max_failed_fraction}
        build_index_directory(
            self.stage, np.concatenate(self.vectors), pa.concat_tables(self.rows), self.embedder,
            self.schema, self.catalogue, extra={"skipped": self.skipped, **failures, **(extra or {})},
            options=self.index_options,
        )
        return artifacts.publish(self.stage, self.dest)
