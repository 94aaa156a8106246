"""Writer: collects embedded batches, then builds and publishes the index directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_directory import write_index_directory
from atelier.indexer.mapper import Embedded


class TooManyFailures(RuntimeError):
    """More images failed to decode than the job allows; nothing was published."""


class IndexWriter:
    def __init__(self, dest: Path, schema: AttributeSchema, embedder: dict[str, Any],
                 catalogue: dict[str, Any], max_failed_fraction: float):
        self.dest, self.schema, self.embedder, self.catalogue = dest, schema, embedder, catalogue
        self.max_failed_fraction = max_failed_fraction
        self.vectors: list[np.ndarray] = []
        self.rows: list[pa.Table] = []
        self.skipped: list[dict[str, str]] = []

    def write(self, batch: Embedded) -> None:
        self.vectors.append(batch.vectors)
        self.rows.append(batch.rows)
        self.skipped.extend(batch.skipped)

    def close(self, extra: dict[str, Any] | None = None) -> Path:
        kept = sum(len(v) for v in self.vectors)
        total = kept + len(self.skipped)
        if total and len(self.skipped) / total > self.max_failed_fraction:
            raise TooManyFailures(
                f"{len(self.skipped)} of {total} images could not be decoded (allowed fraction "
                f"{self.max_failed_fraction}); first: {self.skipped[:3]}; the previous index is untouched"
            )
        return write_index_directory(
            self.dest, np.concatenate(self.vectors), pa.concat_tables(self.rows), self.embedder,
            self.schema, self.catalogue, extra={"skipped": self.skipped, **(extra or {})},
        )
