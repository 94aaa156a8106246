"""Writer: collects embedded batches, then writes the index files into the folder it is given.

The folder is the job's staging folder; claiming it and publishing it are the runner's
(atelier.indexer.runner), so the writer knows no destination. The index type comes chosen
(index_choice.choose_index, by the runner before embedding) and is built as given.

Images that could not be decoded are counted and listed (product id + reason) in the
manifest's `skipped`; the job fails, writing no index, once more than `max_failed_fraction`
of the catalogue has failed (as soon as that is certain, not only at the end).

With a `thumbnail_size`, every batch brings one thumbnail per kept row (the mapper makes them)
and the index folder gets thumbnails.arrow beside products.arrow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_choice import IndexOptions, IndexSpec
from atelier.indexer.index_directory import build_index_directory
from atelier.indexer.mapper import Embedded


class TooManyFailures(RuntimeError):
    """More images failed to decode than the job allows; nothing was published."""


class IndexWriter:
    """The mapper's batches for one index, written into `folder` by `close`.

    `embedder` and `catalogue` are the manifest's records of them (a catalogue's `rows`, when
    known, lets the failure bound be checked batch by batch); `choice` the index type to build;
    `options` the rest of what was asked (recall target, PCA: atelier.indexer.index_choice);
    `thumbnail_size`: px of the thumbnails each batch carries (0: the index has none)."""

    def __init__(self, folder: Path, schema: AttributeSchema, embedder: dict[str, Any], catalogue: dict[str, Any],
                 choice: IndexSpec, options: IndexOptions | None = None, max_failed_fraction: float = 0.0,
                 thumbnail_size: int = 0):
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be within [0, 1], got {max_failed_fraction}")
        if thumbnail_size < 0:
            raise ValueError(f"thumbnail_size must be >= 0 (0: no thumbnails), got {thumbnail_size}")
        self.thumbnail_size = thumbnail_size
        self.thumbnails: list[pa.Array] = []
        self.folder, self.schema, self.embedder, self.catalogue = folder, schema, embedder, catalogue
        self.choice, self.options = choice, options
        self.max_failed_fraction = max_failed_fraction
        self.expected = int(catalogue.get("rows") or 0)  # 0: unknown, checked at the end only
        self.vectors: list[np.ndarray] = []
        self.rows: list[pa.Table] = []
        self.skipped: list[dict[str, str]] = []

    def write(self, batch: Embedded) -> None:
        if self.thumbnail_size:
            if batch.thumbnails is None or len(batch.thumbnails) != batch.rows.num_rows:
                given = "no" if batch.thumbnails is None else len(batch.thumbnails)
                raise ValueError(f"a batch of {batch.rows.num_rows} rows brings {given} thumbnails; "
                                 f"this index has {self.thumbnail_size} px thumbnails, one per row")
            self.thumbnails.append(pa.array(batch.thumbnails, pa.binary()))
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

    def close(self, extra: dict[str, Any] | None = None) -> None:
        """Build the index and write its files and manifest (with `skipped` and `extra`) into the folder."""
        kept = sum(len(v) for v in self.vectors)
        total = kept + len(self.skipped)
        self._check(total)
        failures = {"skipped_count": len(self.skipped), "images": total,
                    "max_failed_fraction": self.max_failed_fraction}
        build_index_directory(
            self.folder, np.concatenate(self.vectors), pa.concat_tables(self.rows), self.embedder,
            self.schema, self.catalogue, self.choice, extra={"skipped": self.skipped, **failures, **(extra or {})},
            options=self.options, thumbnails=pa.chunked_array(self.thumbnails, pa.binary()) if self.thumbnail_size else None,
            thumbnail_size=self.thumbnail_size,
        )
