"""Inception features of a catalogue's real images, kept per row, computed once, resumable.

On a CPU the FID network is the slow part of `atelier eval` (about 0.4 s per image on one core
here), and the real images' features are the same every run. A store holds one feature row per
catalogue row, in a file per catalogue (name and fingerprint) and network (sha256):

    <folder>/<catalogue>-<fingerprint[:16]>-<network sha256[:12]>.features.npy   float32 (rows, dim)
    <folder>/<same>.done.npy                                                       bool (rows,)

Both are memory-mapped. A batch's features are flushed before its rows are marked done, so a run
killed midway keeps every batch it finished and the next run computes only the rest; any subset
of rows (1,000 or 10,000 test images, the train split's floor) reuses what is there. Features
are kept as float32: the Fréchet distance computed from them moves by far less than its own
sampling noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from atelier.progress import progress_bar

__all__ = ["FeatureStore"]


class FeatureStore:
    """Per-row features of one catalogue under one network; `get(rows)` computes what is missing."""

    def __init__(self, folder: str | os.PathLike, catalogue: str, fingerprint: str, network_sha256: str,
                 rows: int, dim: int):
        self.folder = Path(folder).expanduser()
        stem = f"{catalogue}-{fingerprint[:16]}-{network_sha256[:12]}"
        self.features_path = self.folder / f"{stem}.features.npy"
        self.done_path = self.folder / f"{stem}.done.npy"
        self.rows, self.dim = int(rows), int(dim)

    def _open(self) -> tuple[np.memmap, np.memmap]:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.features_path.is_file() and self.done_path.is_file():
            features = np.load(self.features_path, mmap_mode="r+")
            done = np.load(self.done_path, mmap_mode="r+")
            if features.shape == (self.rows, self.dim) and done.shape == (self.rows,):
                return features, done
        # new (or not this catalogue's shape): both files start empty; the done mask is written last
        features = np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32,
                                             shape=(self.rows, self.dim))
        done = np.lib.format.open_memmap(self.done_path, mode="w+", dtype=np.bool_, shape=(self.rows,))
        done.flush()
        return features, done

    def computed(self) -> int:
        """How many rows have their features."""
        if not self.done_path.is_file():
            return 0
        return int(np.load(self.done_path, mmap_mode="r").sum())

    def get(self, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray], batch_size: int = 50,
            progress: bool = False) -> np.ndarray:
        """float64 (len(rows), dim) features of catalogue `rows`, in that order. Missing rows are
        computed with `compute(row_numbers) -> (n, dim)` a batch at a time and saved as they come."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise ValueError(f"rows must lie in 0..{self.rows - 1}")
        features, done = self._open()
        missing = np.unique(rows[~done[rows]])
        with progress_bar(total=len(missing), desc="inception features (real)", unit="img",
                          disable=not progress or not len(missing)) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start:start + batch_size]
                out = np.asarray(compute(batch))
                if out.shape != (len(batch), self.dim):
                    raise ValueError(f"feature batch has shape {out.shape}, expected {(len(batch), self.dim)}")
                features[batch] = out.astype(np.float32)
                features.flush()  # the features reach the file before the rows are marked done
                done[batch] = True
                done.flush()
                bar.update(len(batch))
        return np.asarray(features[rows], dtype=np.float64)
