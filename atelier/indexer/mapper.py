"""Mapper: decode + prepare a batch in worker threads, then one batched embedder forward.

Decoding (OpenCV releases the GIL) for the next batches runs while the current batch is in
the forward pass. Undecodable images are dropped from the batch and reported with their
product id and a reason, not fatal (the writer decides how many failures a job tolerates).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import cv2
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
                    raise ImageDecodeError("no image bytes" if data is None else "empty image (0 bytes)")
                prepared.append(self.embedder.prepare(decode_image(data, self.channels)))
                keep.append(i)
            except (ImageDecodeError, cv2.error) as error:
                skipped.append({"id": ids[i], "reason": failure_reason(data, error)})
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


SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP"}


def failure_reason(data: bytes | None, error: Exception) -> str:
    """What went wrong with one image, for the manifest: the error and what the bytes look like."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not data:
        return message
    kind = next((name for sig, name in SIGNATURES.items() if data.startswith(sig)), None)
    return f"{message}: " + (f"{kind} signature, truncated or corrupt" if kind else "no known image signature")
