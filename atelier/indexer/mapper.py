"""Mapper: decode + prepare a batch in worker threads, then one batched embedder forward.

Decoding (OpenCV releases the GIL) for the next batches runs while the current batch is in
the forward pass. Undecodable images are dropped from the batch and reported, not fatal.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from atelier.catalog.images import ImageDecodeError, decode_image
from atelier.indexer.embedders import Embedder
from atelier.indexer.reader import Batch


@dataclass
class Embedded:
    rows: pa.Table
    vectors: np.ndarray
    skipped: list[dict[str, str]]  # {"id", "reason"}


class EmbeddingMapper:
    def __init__(self, embedder: Embedder, channels: int, workers: int = 1, prefetch: int = 2):
        self.embedder, self.channels = embedder, channels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self.prefetch = prefetch

    def _prepare(self, batch: Batch) -> tuple[pa.Table, np.ndarray | None, list[dict[str, str]]]:
        keep, prepared, skipped = [], [], []
        ids = batch.rows.column("id").to_pylist()
        for i, data in enumerate(batch.images):
            try:
                if not data:
                    raise ImageDecodeError("no image bytes")
                prepared.append(self.embedder.prepare(decode_image(data, self.channels)))
                keep.append(i)
            except ImageDecodeError as error:
                skipped.append({"id": ids[i], "reason": str(error)})
        rows = batch.rows.take(pa.array(keep, type=pa.int64()))
        return rows, (np.stack(prepared) if prepared else None), skipped

    def map(self, batches: Iterable[Batch]) -> Iterator[Embedded]:
        pending = []
        source = iter(batches)
        try:
            for batch in source:
                pending.append(self.pool.submit(self._prepare, batch))
                if len(pending) > self.prefetch:
                    yield self._finish(pending.pop(0))
            while pending:
                yield self._finish(pending.pop(0))
        finally:
            for future in pending:
                future.cancel()

    def _finish(self, future) -> Embedded:
        rows, pixels, skipped = future.result()
        vectors = self.embedder.forward(pixels) if pixels is not None else np.zeros((0, self.embedder.dim), np.float32)
        return Embedded(rows, vectors, skipped)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
