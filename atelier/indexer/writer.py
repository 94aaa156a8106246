"""Writer: collects embedded batches, then writes the index files into the folder it is given.

The folder is the job's staging folder; claiming it and publishing it are the runner's
(atelier.indexer.runner), so the writer knows no destination. The index type comes chosen
(index_choice.choose_index, by the runner before embedding) and is built as given.

Images that could not be decoded are counted and listed (product id + reason) in the
manifest's `skipped`; the job fails, writing no index, once more than `max_failed_fraction`
of the catalogue has failed (as soon as that is certain, not only at the end).

With a `thumbnail_size`, every batch brings one thumbnail per kept row (the mapper makes them)
and the index folder gets thumbnails.arrow beside products.arrow.

Nothing per product stays in memory while the catalogue is embedded: each batch's rows and
thumbnails are appended to products.arrow and thumbnails.arrow as they come, and its vectors to
a scratch file in the folder, which the index build reads memory-mapped (in chunks, and samples
for training and the recall check) and which is removed before the manifest is written. What
the build itself holds is the index's: full vectors for Flat and HNSW, codes for IVF kinds, and
for IVF with `on_disk_lists` not even those (index.ivfdata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_choice import IndexOptions, IndexSpec
from atelier.indexer.index_directory import RowFiles, finish_index_directory
from atelier.indexer.mapper import Embedded

SCRATCH_VECTORS = "vectors.scratch"  # float32 rows, removed before the manifest


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
        self.folder, self.schema, self.embedder, self.catalogue = folder, schema, embedder, catalogue
        self.choice, self.options = choice, options
        self.max_failed_fraction = max_failed_fraction
        self.expected = int(catalogue.get("rows") or 0)  # 0: unknown, checked at the end only
        self.kept, self.dimension = 0, None
        self.skipped: list[dict[str, str]] = []
        self.row_files = RowFiles(folder, with_thumbnails=bool(thumbnail_size))
        self.scratch = open(folder / SCRATCH_VECTORS, "wb")  # noqa: SIM115  (closed by close())

    def write(self, batch: Embedded) -> None:
        if self.thumbnail_size:
            if batch.thumbnails is None or len(batch.thumbnails) != batch.rows.num_rows:
                given = "no" if batch.thumbnails is None else len(batch.thumbnails)
                raise ValueError(f"a batch of {batch.rows.num_rows} rows brings {given} thumbnails; "
                                 f"this index has {self.thumbnail_size} px thumbnails, one per row")
        vectors = np.ascontiguousarray(batch.vectors, dtype=np.float32)
        if len(vectors) != batch.rows.num_rows:
            raise ValueError(f"a batch of {batch.rows.num_rows} rows brings {len(vectors)} vectors")
        if len(vectors):
            if self.dimension is None:
                self.dimension = vectors.shape[1]
            elif vectors.shape[1] != self.dimension:
                raise ValueError(f"a batch of {vectors.shape[1]}-d vectors in a {self.dimension}-d index")
            self.row_files.write(batch.rows, pa.array(batch.thumbnails, pa.binary()) if self.thumbnail_size else None)
            self.scratch.write(vectors.tobytes())
            self.kept += len(vectors)
        self.skipped.extend(batch.skipped)
        if self.expected:
            seen = self.kept + len(self.skipped)
            self._check(self.expected, "" if seen >= self.expected else "at least ")

    def _check(self, total: int, prefix: str = "") -> None:
        if total and len(self.skipped) / total > self.max_failed_fraction:
            raise TooManyFailures(
                f"{prefix}{len(self.skipped)} of {total} images could not be decoded (allowed fraction "
                f"{self.max_failed_fraction}); first: {self.skipped[:3]}; the previous index is untouched"
            )

    def close(self, extra: dict[str, Any] | None = None) -> None:
        """Build the index and write its files and manifest (with `skipped` and `extra`) into the folder."""
        total = self.kept + len(self.skipped)
        self._check(total)
        self.row_files.close()
        self.scratch.close()
        failures = {"skipped_count": len(self.skipped), "images": total,
                    "max_failed_fraction": self.max_failed_fraction}
        scratch = self.folder / SCRATCH_VECTORS
        vectors = (np.memmap(scratch, dtype=np.float32, mode="r", shape=(self.kept, self.dimension)) if self.kept
                   else np.zeros((0, 1), np.float32))
        finish_index_directory(
            self.folder, vectors, self.row_files.rows, self.embedder, self.schema, self.catalogue, self.choice,
            extra={"skipped": self.skipped, **failures, **(extra or {})}, options=self.options,
            thumbnail_size=self.thumbnail_size, scratch=[scratch],
        )
