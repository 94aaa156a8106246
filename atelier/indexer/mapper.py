"""Mapper: read + decode + prepare batches in a worker thread, then one batched embedder forward.

The worker reads the next batches from the reader and decodes them (Parquet decompression and
OpenCV release the GIL) while the calling thread runs the forward of the current batch, so the
forward, the job's limit, waits only when decoding falls behind. Undecodable images are dropped
from the batch and reported with their product id and a reason, not fatal (the writer decides
how many failures a job tolerates).

With a `thumbnail_size`, the worker also makes each kept image's thumbnail, for the index's
thumbnails.arrow (`thumbnail`): the catalogue's own bytes where the image is no larger, else
the image squared to that size, JPEG for colour and PNG for grey.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from atelier.catalog.images import ImageDecodeError, decode_image, encode_png, to_square
from atelier.indexer.embedders import Embedder
from atelier.indexer.reader import Batch

# rows, pixels, skipped, thumbnails (None without a thumbnail size)
Prepared = tuple[pa.Table, np.ndarray | None, list[dict[str, str]], list[bytes] | None]
JPEG_QUALITY = 85


@dataclass
class Embedded:
    rows: pa.Table
    vectors: np.ndarray
    skipped: list[dict[str, str]]  # {"id", "reason"}
    thumbnails: list[bytes] | None = None  # one per row, when the mapper was given a thumbnail size


def thumbnail(data: bytes, image: np.ndarray, size: int) -> bytes:
    """An encoded thumbnail of at most size x size px: `data` itself (no re-encoding) when the
    decoded `image` is no larger, else the image squared to `size`, JPEG (colour) or PNG (grey)."""
    if max(image.shape[:2]) <= size:
        return bytes(data)
    small = to_square(image, size)
    if small.shape[2] == 1:
        return encode_png(small)
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"could not encode a {size} px thumbnail as JPEG")
    return buffer.tobytes()


class EmbeddingMapper:
    def __init__(self, embedder: Embedder, channels: int, prefetch: int = 2, thumbnail_size: int = 0):
        """`thumbnail_size`: px of the thumbnails to make of each kept image (0: none)."""
        self.embedder, self.channels, self.prefetch = embedder, channels, prefetch
        self.thumbnail_size = thumbnail_size
        # one worker: it advances the reader, so batches come out in catalogue order
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        # where the time went, for the index manifest (wait: the forward idle, decoding behind)
        self.timings = {"read_seconds": 0.0, "decode_seconds": 0.0, "forward_seconds": 0.0, "wait_seconds": 0.0}

    def _read_and_prepare(self, source: Iterator[Batch]) -> Prepared | None:
        start = time.perf_counter()
        batch = next(source, None)
        self.timings["read_seconds"] += time.perf_counter() - start
        if batch is None:
            return None
        start = time.perf_counter()
        prepared = self._prepare(batch)
        self.timings["decode_seconds"] += time.perf_counter() - start
        return prepared

    def _prepare(self, batch: Batch) -> Prepared:
        keep, prepared, skipped, thumbnails = [], [], [], []
        ids = batch.rows.column("id").to_pylist()
        for i, data in enumerate(batch.images):
            try:
                if not data:
                    raise ImageDecodeError("no image bytes" if data is None else "empty image (0 bytes)")
                image = decode_image(data, self.channels)
                pixels = self.embedder.prepare(image)
                if self.thumbnail_size:
                    thumbnails.append(thumbnail(data, image, self.thumbnail_size))
                prepared.append(pixels)
                keep.append(i)
            except (ImageDecodeError, cv2.error) as error:
                skipped.append({"id": ids[i], "reason": failure_reason(data, error)})
        rows = batch.rows.take(pa.array(keep, type=pa.int64()))
        return rows, (np.stack(prepared) if prepared else None), skipped, (thumbnails if self.thumbnail_size else None)

    def map(self, batches: Iterable[Batch]) -> Iterator[Embedded]:
        source = iter(batches)
        pending = deque(self.pool.submit(self._read_and_prepare, source) for _ in range(self.prefetch + 1))
        try:
            while True:
                start = time.perf_counter()
                prepared = pending.popleft().result()
                self.timings["wait_seconds"] += time.perf_counter() - start
                if prepared is None:  # the reader is done (the tasks queued behind it find it done too)
                    return
                pending.append(self.pool.submit(self._read_and_prepare, source))
                yield self._forward(*prepared)
        finally:
            for future in pending:
                future.cancel()

    def _forward(self, rows: pa.Table, pixels: np.ndarray | None, skipped: list[dict[str, str]],
                 thumbnails: list[bytes] | None = None) -> Embedded:
        start = time.perf_counter()
        vectors = self.embedder.forward(pixels) if pixels is not None else np.zeros((0, self.embedder.dim), np.float32)
        self.timings["forward_seconds"] += time.perf_counter() - start
        return Embedded(rows, vectors, skipped, thumbnails)

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
