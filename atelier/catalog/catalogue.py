"""A catalogue: a Parquet dataset, one row per product, published as an artifact directory.

Columns: `id` (string), `split` (string or null), one column per attribute group (string for a
single-label group, list<string> for a multi-label one), `image` (the encoded PNG/JPEG
bytes) and, in a catalogue written with `image_uri=True`, `image_uri` (string or null: the
photo's public http(s) address, for clients to show; older catalogues lack it). `manifest.json` carries the AttributeSchema, the image channels, the row count and the
sha256 of each Parquet file; the catalogue's fingerprint is derived from those hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from atelier import artifacts
from atelier.catalog.images import decode_image
from atelier.catalog.schema import AttributeSchema

KIND = "catalogue"
ROWS_PER_FILE = 20_000
IMAGE_URI = "image_uri"  # the optional column of each product photo's public address


def arrow_schema(schema: AttributeSchema, image_uri: bool = False) -> pa.Schema:
    """The catalogue's columns; `image_uri`: with the nullable `image_uri` string column."""
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("split", pa.string())]
    for g in schema.groups:
        fields.append(pa.field(g.name, pa.list_(pa.string()) if g.multi_label else pa.string()))
    fields.append(pa.field("image", pa.binary()))
    if image_uri:
        fields.append(pa.field(IMAGE_URI, pa.string()))
    return pa.schema(fields)


def write_catalogue(
    dest: Path,
    name: str,
    schema: AttributeSchema,
    batches: Iterable[pa.RecordBatch | pa.Table],
    image_channels: int,
    source: dict[str, Any] | None = None,
    image_uri: bool = False,
) -> Catalogue:
    """Write record batches (columns as `arrow_schema`) and publish the catalogue atomically.
    `image_uri`: the batches carry an `image_uri` column (null where a product has none)."""
    target = arrow_schema(schema, image_uri)
    with artifacts.staging(dest) as stage:
        rows, part, writer = 0, 0, None
        seen: set[str] = set()
        try:
            for batch in batches:
                table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                table = table.select(target.names).cast(target)
                ids = table.column("id").to_pylist()
                if len(set(ids)) != len(ids) or seen.intersection(ids):
                    raise ValueError(f"catalogue {name!r}: product ids must be unique")
                seen.update(ids)
                for offset in range(0, table.num_rows, ROWS_PER_FILE):
                    chunk = table.slice(offset, ROWS_PER_FILE)
                    if writer is None:
                        writer = pq.ParquetWriter(stage / f"part-{part:05d}.parquet", target, compression="zstd")
                    writer.write_table(chunk, row_group_size=4096)
                    rows += chunk.num_rows
                    if rows >= (part + 1) * ROWS_PER_FILE:
                        writer.close()
                        writer, part = None, part + 1
        finally:
            if writer is not None:
                writer.close()
        if rows == 0:
            raise ValueError(f"catalogue {name!r} would be empty")
        artifacts.write_manifest(
            stage, KIND, name=name, schema=schema.to_dict(), rows=rows,
            image_channels=image_channels, source=source or {},
        )
        artifacts.publish(stage, dest)
    return Catalogue.open(dest)


@dataclass
class Catalogue:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> Catalogue:
        folder = artifacts.resolve(path)
        return cls(folder, artifacts.read_manifest(folder, KIND, verify=verify))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def schema(self) -> AttributeSchema:
        return AttributeSchema.from_dict(self.manifest["schema"])

    @property
    def image_channels(self) -> int:
        return int(self.manifest["image_channels"])

    @property
    def has_image_uri(self) -> bool:
        """Whether the products carry an `image_uri` column (catalogues written before it do not)."""
        files = self.files
        return bool(files) and IMAGE_URI in pq.read_schema(files[0]).names

    @property
    def fingerprint(self) -> str:
        """Content hash: equal for catalogues with byte-identical Parquet files."""
        digest = hashlib.sha256()
        for fname, sha in sorted(self.manifest["files"].items()):
            digest.update(f"{fname}:{sha}\n".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def files(self) -> list[Path]:
        return [self.path / f for f in sorted(self.manifest["files"]) if f.endswith(".parquet")]

    def read(self, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
        return _read(self.files, columns, split)

    def iter_batches(self, columns: list[str], batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        for f in self.files:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def attributes(self, split: str | None = None) -> pa.Table:
        """id + attribute columns (no images)."""
        return self.read(["id", "split", *self.schema.names], split=split)

    def load_images(self, split: str | None = None, limit: int | None = None) -> tuple[np.ndarray, pa.Table]:
        """Decode images into one uint8 (N, H, W, C) array, with their id/attribute rows.

        All images of a catalogue must share a size here (importers make them square).
        """
        table = self.read(None, split=split)
        if limit is not None:
            table = table.slice(0, limit)
        images = [decode_image(b, self.image_channels) for b in table.column("image").to_pylist()]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"catalogue {self.name!r} mixes image sizes {sorted(shapes)[:3]}...; resize on import")
        return np.stack(images), table.drop_columns(["image"])


def _read(files: list[Path], columns: list[str] | None, split: str | None) -> pa.Table:
    wanted = columns if columns is None or split is None or "split" in columns else [*columns, "split"]
    table = pa.concat_tables(pq.read_table(f, columns=wanted) for f in files)
    if split is not None:
        mask = pc.equal(table.column("split"), split)
        table = table.filter(mask)
        if not table.num_rows:
            raise ValueError(f"catalogue has no rows in split {split!r}")
        if columns is not None and "split" not in columns:
            table = table.drop_columns(["split"])
    return table
