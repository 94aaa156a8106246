"""Reader: a catalogue's rows in batches of (id + attributes [+ image_uri], encoded image bytes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from atelier.catalog.catalogue import IMAGE_URI, Catalogue


@dataclass
class Batch:
    rows: pa.Table  # id + attribute columns, and image_uri where the catalogue has it
    images: list[bytes | None]


class CatalogueReader:
    def __init__(self, catalogue: Catalogue, batch_size: int):
        self.catalogue, self.batch_size = catalogue, batch_size

    def __len__(self) -> int:
        return len(self.catalogue)

    def __iter__(self) -> Iterator[Batch]:
        columns = ["id", *self.catalogue.schema.names, *([IMAGE_URI] if self.catalogue.has_image_uri else []), "image"]
        for record_batch in self.catalogue.iter_batches(columns, self.batch_size):
            table = pa.Table.from_batches([record_batch])
            yield Batch(table.drop_columns(["image"]), table.column("image").to_pylist())
