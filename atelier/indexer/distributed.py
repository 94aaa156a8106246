"""The reindex job's embedding on Ray: catalogue shards -> Ray workers -> the driver's writer.

`atelier index --distributor ray` runs the same reader -> mapper -> writer job with the reading,
decoding and embedding spread over Ray workers; the writer, the index build and the publish stay
on the driver (the process that runs `reindex`), so the index, its manifest and its atomic
publish are the local job's:

- the catalogue is cut into shards (`reader.plan_shards`: row ranges of its Parquet files, at
  row-group boundaries, a multiple of the batch size each);
- each worker is a Ray actor holding one CPU per torch thread (`threads`, default 1): it opens
  the catalogue itself (checking its fingerprint against the driver's), builds the embedder
  once (the same name, input size and weights: the driver compares every worker's weights
  sha256 with its own before any shard is handed out), and embeds shard after shard with the
  local job's `EmbeddingMapper` (the same decoding, thumbnails and skip reasons);
- the driver hands a shard to each idle worker (at most `workers` at a time, and never more
  than REORDER_WINDOW shards per worker ahead of the next one to write), and gives the results
  to the `IndexWriter` in catalogue order, so the index rows come out in the local job's order
  and the failure fraction is checked as shards arrive;
- the writer builds the index from the gathered vectors (IVF training included) on the driver.

Without an address a local Ray is started (`ray.init(num_cpus=workers x threads)`) and stopped
at the end, also when the job fails; with one, the job connects to that cluster and only
disconnects. A process that already is a Ray driver uses its own connection and keeps it.
On a cluster, every node needs atelier installed and the catalogue (and a trained embedder's
folder) at the same path: the workers read the files themselves (shared storage, docs/scaling.md).

A worker that dies or raises fails the job: nothing is published, the previous index stays.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from atelier.catalog.catalogue import Catalogue
from atelier.indexer.embedders import Embedder, build_embedder
from atelier.indexer.mapper import Embedded, EmbeddingMapper
from atelier.indexer.reader import CatalogueReader, Shard, plan_shards
from atelier.indexer.writer import IndexWriter
from atelier.progress import progress_bar

log = logging.getLogger("atelier.indexer")
LOCAL, RAY = "local", "ray"
DISTRIBUTORS = (LOCAL, RAY)
INSTALL_HINT = "pip install 'atelier[ray]'"
SHARDS_PER_WORKER = 8  # by default: enough shards that the last ones even out the workers' finishing times
MAX_SHARD_ROWS = 4096  # a catalogue's row group, at most (atelier.catalog.catalogue writes 4096-row groups)
REORDER_WINDOW = 4  # shards per worker handed out beyond the next one to write: bounds what waits on the driver


class RayUnavailable(RuntimeError):
    """`--distributor ray` was asked for where Ray is not installed."""


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable(f"--distributor ray needs Ray, which is not installed here: {INSTALL_HINT}") from error
    return ray


def _whole_number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the Ray job runs. `address`: a running cluster (None: start a local
    Ray for the job); `workers`: Ray workers (None: the local machine's CPUs, or the cluster's,
    divided by `threads`); `threads`: torch threads and CPUs of each worker; `shard_rows`: rows
    per shard, a multiple of the batch size (None: about SHARDS_PER_WORKER shards per worker,
    at most MAX_SHARD_ROWS rows)."""
    address: str | None = None
    workers: int | None = None
    threads: int = 1
    shard_rows: int | None = None

    def check(self, batch_size: int) -> None:
        if self.workers is not None:
            _whole_number(self.workers, "the number of Ray workers")
        _whole_number(self.threads, "torch threads per Ray worker")
        if self.shard_rows is not None and (_whole_number(self.shard_rows, "rows per shard") % batch_size):
            raise ValueError(f"rows per shard must be a multiple of the batch size ({batch_size}), got {self.shard_rows}")
        if self.address is not None and not str(self.address).strip():
            raise ValueError("the Ray address is empty; leave it out to start a local Ray for the job")


def settings_for(distributor: str, address: str | None, workers: int | None, threads: int | None,
                 shard_rows: int | None, batch_size: int) -> RaySettings | None:
    """The Ray settings of a reindex call, checked (None: the local job); refuses Ray options
    without `distributor='ray'`, and Ray itself where it is not installed, before any work."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"unknown distributor {distributor!r}; available: {', '.join(DISTRIBUTORS)}")
    if distributor == LOCAL:
        given = [name for name, value in (("ray address", address), ("workers", workers),
                                          ("shard rows", shard_rows)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with the ray distributor (--distributor ray)")
        return None
    settings = RaySettings(address, workers, threads or 1, shard_rows)
    settings.check(batch_size)
    import_ray()
    return settings


def default_shard_rows(rows: int, workers: int, batch_size: int) -> int:
    """About SHARDS_PER_WORKER shards per worker, a multiple of the batch size, at most MAX_SHARD_ROWS
    (rounded down to a multiple of the batch size) and at least one batch."""
    want = math.ceil(rows / (SHARDS_PER_WORKER * workers) / batch_size) * batch_size
    return max(batch_size, min(want, MAX_SHARD_ROWS // batch_size * batch_size))


class ShardWorker:
    """One Ray worker (an actor): opens the catalogue and builds the embedder once, then embeds
    shard after shard with the local job's mapper."""

    def __init__(self, catalogue_path: str, fingerprint: str, embedder_name: str, input_size: int,
                 batch_size: int, thumbnail_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.catalogue = Catalogue.open(Path(catalogue_path))
        if self.catalogue.fingerprint != fingerprint:
            raise ValueError(f"the catalogue at {catalogue_path} on this Ray node is not the driver's "
                             f"(fingerprint {self.catalogue.fingerprint[:12]}, expected {fingerprint[:12]})")
        self.embedder = build_embedder(embedder_name, input_size)
        self.batch_size, self.thumbnail_size = batch_size, thumbnail_size

    def describe(self) -> dict[str, Any]:
        import socket

        return {"embedder": self.embedder.describe(), "host": socket.gethostname(), "pid": os.getpid()}

    def embed(self, shard: Shard) -> tuple[Embedded, dict[str, float]]:
        """The shard's rows, vectors, skipped images and thumbnails, with the seconds it took."""
        start = time.perf_counter()
        mapper = EmbeddingMapper(self.embedder, self.catalogue.image_channels, thumbnail_size=self.thumbnail_size)
        try:
            parts = list(mapper.map(CatalogueReader(self.catalogue, self.batch_size, shard)))
        finally:
            mapper.close()
        embedded = concatenate(parts, self.embedder.dim, self.thumbnail_size > 0)
        return embedded, {"seconds": time.perf_counter() - start, **mapper.timings}


def concatenate(parts: list[Embedded], dim: int, thumbnails: bool) -> Embedded:
    """One batch of several, in order."""
    rows = pa.concat_tables([p.rows for p in parts])
    vectors = np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, dim), np.float32)
    return Embedded(rows, vectors, [s for p in parts for s in p.skipped],
                    [t for p in parts for t in p.thumbnails] if thumbnails else None)


def owned(batch: Embedded) -> Embedded:
    """A copy in the driver's own memory: what Ray hands back may be a view of its object store,
    which would stay pinned there for as long as the writer holds the batch."""
    rows = batch.rows.take(pa.array(np.arange(batch.rows.num_rows, dtype=np.int64)))
    return Embedded(rows, np.array(batch.vectors, dtype=np.float32, copy=True), list(batch.skipped),
                    list(batch.thumbnails) if batch.thumbnails is not None else None)


def embed_on_ray(catalogue: Catalogue, embedder: Embedder, writer: IndexWriter, settings: RaySettings,
                 batch_size: int, thumbnail_size: int, progress: bool = True) -> dict[str, Any]:
    """Embed the whole catalogue on Ray into `writer` (which the caller then publishes); returns
    the manifest's `build` record. Starts (and stops) a local Ray without an address."""
    ray = import_ray()
    start = time.perf_counter()
    disconnect = connect(ray, settings)
    try:
        workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.threads)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers * settings.threads:
            raise ValueError(f"the Ray cluster has {cpus:g} CPUs; {workers} workers x {settings.threads} threads "
                             f"need {workers * settings.threads}")
        shard_rows = settings.shard_rows or default_shard_rows(len(catalogue), workers, batch_size)
        shards = plan_shards(catalogue, shard_rows)
        if len(shards) < workers:
            log.info("ray: %d shards of %d rows: %d workers instead of %d", len(shards), shard_rows, len(shards), workers)
            workers = len(shards)
        job = RayJob(ray, catalogue, embedder, writer, settings.threads, batch_size, thumbnail_size, workers)
        try:
            build = job.run(shards, progress, start)
        finally:
            job.stop()
        return {"distributor": RAY, "ray_version": ray.__version__,
                "ray_address": settings.address or "local (started by the job)", "workers": workers,
                "threads_per_worker": settings.threads, "shards": len(shards), "shard_rows": shard_rows,
                "batch_size": batch_size, "torch_threads": settings.threads, **build}
    finally:
        if disconnect:
            ray.shutdown()


def connect(ray, settings: RaySettings) -> bool:
    """Connect this process to Ray; True when the caller is to call ray.shutdown() at the end
    (which stops a Ray this started, and only disconnects from a cluster given by address)."""
    if ray.is_initialized():
        log.info("ray: this process is already connected to Ray; the job uses that connection")
        return False
    if settings.address is None:
        workers = settings.workers or max(1, (os.cpu_count() or 1) // settings.threads)
        ray.init(num_cpus=workers * settings.threads, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=settings.address, logging_level=logging.WARNING)
    return True


class RayJob:
    """The driver's side: the workers, the shards handed out, the results written in order."""

    def __init__(self, ray, catalogue: Catalogue, embedder: Embedder, writer: IndexWriter, threads: int,
                 batch_size: int, thumbnail_size: int, workers: int):
        self.ray, self.writer, self.total = ray, writer, len(catalogue)
        name = str(embedder.files) if embedder.files is not None else embedder.name  # a trained one: its folder
        remote = ray.remote(num_cpus=threads)(ShardWorker)
        self.actors = [remote.remote(str(catalogue.path), catalogue.fingerprint, name, embedder.input_size,
                                     batch_size, thumbnail_size, threads) for _ in range(workers)]
        self.weights = embedder.weights_sha256
        self.stats = [{"worker": i, "shards": 0, "images": 0, "seconds": 0.0} for i in range(workers)]

    def start_workers(self) -> None:
        """Wait for every worker to be built; refuse one whose embedder is not the driver's."""
        for i, described in enumerate(self.ray.get([a.describe.remote() for a in self.actors])):
            if described["embedder"]["weights_sha256"] != self.weights:
                raise ValueError(f"Ray worker {i} on {described['host']} built an embedder with other weights "
                                 f"({described['embedder']['weights_sha256'][:12]}, the driver's {self.weights[:12]})")
            self.stats[i].update(host=described["host"], pid=described["pid"])

    def run(self, shards: list[Shard], progress: bool, start: float) -> dict[str, Any]:
        """Hand out the shards, write the results in catalogue order; the build record's timings."""
        self.start_workers()
        started = time.perf_counter()
        pending: dict[Any, tuple[int, int]] = {}  # object ref -> (shard, worker)
        done: dict[int, tuple[Embedded, dict[str, float], int]] = {}
        idle, handed, written = list(range(len(self.actors))), 0, 0
        window = REORDER_WINDOW * len(self.actors)
        with progress_bar(total=self.total, desc=f"embedding on {len(self.actors)} Ray workers", unit="img",
                          disable=not progress) as bar:
            while written < len(shards):
                while idle and handed < len(shards) and handed < written + window:
                    worker = idle.pop(0)
                    pending[self.actors[worker].embed.remote(shards[handed])] = (handed, worker)
                    handed += 1
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    shard, worker = pending.pop(ref)
                    idle.append(worker)
                    batch, timings = self.ray.get(ref)
                    done[shard] = (owned(batch), timings, worker)
                while written in done:
                    batch, timings, worker = done.pop(written)
                    self.writer.write(batch)  # raises TooManyFailures once the failures are too many
                    self._count(worker, len(shards[written]), timings)
                    bar.update(len(shards[written]))
                    written += 1
                    log.info("ray: shard %d of %d written (%d images, worker %d)", written, len(shards),
                             len(shards[written - 1]), worker)
        return self._record(start, started)

    def _count(self, worker: int, images: int, timings: dict[str, float]) -> None:
        stats = self.stats[worker]
        stats["shards"] += 1
        stats["images"] += images
        for key, value in timings.items():
            stats[key] = stats.get(key, 0.0) + value

    def _record(self, start: float, started: float) -> dict[str, Any]:
        end = time.perf_counter()
        seconds, embedding = end - start, end - started
        if self.writer.skipped:
            log.warning("%d of %d images could not be decoded and were skipped (listed in the manifest's "
                        "'skipped'), e.g. %s", len(self.writer.skipped), self.total, self.writer.skipped[0])
        per_worker = [{**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()},
                       "images_per_second": round(s["images"] / s["seconds"], 1) if s["seconds"] else 0.0}
                      for s in self.stats]
        return {"seconds": round(seconds, 2), "images_per_second": round(self.total / seconds, 1),
                "startup_seconds": round(started - start, 2), "embedding_seconds": round(embedding, 2),
                "embedding_images_per_second": round(self.total / embedding, 1), "per_worker": per_worker}

    def stop(self) -> None:
        """End the workers (on a cluster given by address they would otherwise stay until it stops)."""
        for actor in self.actors:
            self.ray.kill(actor)
