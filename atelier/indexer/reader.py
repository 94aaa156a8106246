"""Reader: a catalogue's rows in batches of (id + attributes [+ image_uri], encoded image bytes).

The whole catalogue, or one `Shard` of it: a row range of one of its Parquet files, the unit of
work of a distributed job (atelier.indexer.distributed). `plan_shards` cuts a catalogue into
shards at row-group boundaries (a row group larger than a shard is cut in whole shards from its
start), so the shards, read in order, are the catalogue's rows in catalogue order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from atelier.catalog.catalogue import IMAGE_URI, Catalogue


@dataclass
class Batch:
    rows: pa.Table  # id + attribute columns, and image_uri where the catalogue has it
    images: list[bytes | None]


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the catalogue's Parquet file `file` (its name in the catalogue folder)."""
    file: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(catalogue: Catalogue, rows_per_shard: int) -> list[Shard]:
    """The catalogue as consecutive shards of at most `rows_per_shard` rows, in catalogue order.

    Whole row groups are put together up to `rows_per_shard`; a larger row group is cut into
    pieces of `rows_per_shard` from its start. With `rows_per_shard` a multiple of the batch
    size, a shard's batches start where the whole-catalogue reader's do (within a row group)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows per shard must be >= 1, got {rows_per_shard}")
    shards = []
    for path in catalogue.files:
        metadata, offset, start = pq.ParquetFile(path).metadata, 0, 0
        for group in range(metadata.num_row_groups):
            end = offset + metadata.row_group(group).num_rows
            for cut in range(offset, end, rows_per_shard):  # the pieces of this row group
                piece_end = min(cut + rows_per_shard, end)
                if piece_end - start > rows_per_shard:  # the shard so far cannot take this piece
                    shards.append(Shard(path.name, start, cut))
                    start = cut
            offset = end
        if offset > start:
            shards.append(Shard(path.name, start, offset))
    return shards


class CatalogueReader:
    """The catalogue's rows in batches of `batch_size`, in catalogue order; with a `shard`, only its rows."""

    def __init__(self, catalogue: Catalogue, batch_size: int, shard: Shard | None = None):
        self.catalogue, self.batch_size, self.shard = catalogue, batch_size, shard

    def __len__(self) -> int:
        return len(self.catalogue) if self.shard is None else len(self.shard)

    def __iter__(self) -> Iterator[Batch]:
        columns = ["id", *self.catalogue.schema.names, *([IMAGE_URI] if self.catalogue.has_image_uri else []), "image"]
        batches = self.catalogue.iter_batches(columns, self.batch_size) if self.shard is None else \
            self._shard_batches(columns)
        for record_batch in batches:
            table = pa.Table.from_batches([record_batch])
            yield Batch(table.drop_columns(["image"]), table.column("image").to_pylist())

    def _shard_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The shard's rows, read from the row groups it overlaps only."""
        shard = self.shard
        parquet = pq.ParquetFile(self.catalogue.path / shard.file)
        groups, offset, position = [], 0, None
        for group in range(parquet.metadata.num_row_groups):
            end = offset + parquet.metadata.row_group(group).num_rows
            if offset < shard.stop and end > shard.start:
                groups.append(group)
                position = offset if position is None else position
            offset = end
        if position is None:
            raise ValueError(f"{shard} lies outside {shard.file}'s {offset} rows")
        for record_batch in parquet.iter_batches(self.batch_size, row_groups=groups, columns=columns):
            low, high = max(shard.start - position, 0), min(shard.stop - position, record_batch.num_rows)
            if high > low:
                yield record_batch.slice(low, high - low)
            position += record_batch.num_rows
            if position >= shard.stop:
                return
