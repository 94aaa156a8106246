"""Dynamic batching: concurrent requests for one model share generator, embedder and FAISS runs.

On CPU a small forward is mostly per-layer overhead: the in-domain embedder does 104 images/s
at batch 1 and 530 at batch 32 (2 cores). So requests for the same model that arrive within
`max_wait_ms` of the first waiting one are gathered, up to `max_batch_rows` images, and run as
one batch by the model's worker thread: one generator run, one embedder run, one FAISS search
per distinct top_k; each request then merges its own candidates on its own thread.

Batch-invariant by construction: both networks always run on slices of exactly `chunk_rows`
rows (the last one padded with copies of its first row), whether a batch holds one request or
many. oneDNN picks kernels by tensor shape and its results differ in the last bits between
shapes; with one shape, a row's output depends only on its own input. FAISS is searched
`SEARCH_CHUNK` queries at a time, below its BLAS threshold (20), where each query is scored on
its own. So a request returns bit for bit what it returns alone (tests/test_batching.py).

Deadlines: a request whose deadline passes while it waits is taken out of the queue and gets
`DeadlineExceeded`; inside a batch, each request's deadline is checked before the generate and
the embed stage, and a request past it is dropped from the rest of the batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from atelier.generator import ConditionalGenerator
from atelier.indexer.embedders import Embedder, fixed_chunks
from atelier.indexer.index_directory import IndexDirectory

SEARCH_CHUNK = 16  # queries per FAISS call: under faiss.cvar.distance_compute_blas_threshold


@dataclass(frozen=True)
class BatchPolicy:
    """How requests for one model are gathered. `max_wait_ms=0` adds no wait but still batches
    what queued while the worker was busy; a request's rows are never split between batches."""

    max_wait_ms: float = 2.0  # how long a batch waits for more requests after its first arrived
    max_batch_rows: int = 64  # images per batch; one larger request still runs, alone
    chunk_rows: int = 8  # the one shape both networks run at (chosen by measurement, docs/performance.md)
    idle_seconds: float = 30.0  # a model's worker thread ends after this long without work

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0:
            raise ValueError(f"batch max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("max_batch_rows", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"batch {name} must be at least 1, got {getattr(self, name)}")
        if self.idle_seconds <= 0:
            raise ValueError(f"batch idle_seconds must be positive, got {self.idle_seconds}")


class Expired(Exception):
    """A job's deadline passed before `stage`, or while it waited ("queue"); the caller turns
    it into DeadlineExceeded."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


@dataclass(eq=False)
class Job:
    """One request's rows: conditions (n, cond_dim) and per-image seeds, plus what came back."""

    conditions: np.ndarray
    seeds: list[int]
    embedder: Embedder  # the served index and its embedder, as the request read them at its start
    index: IndexDirectory
    top_k: int
    expired: Callable[[], bool]  # has the request's deadline passed?
    state: str = "queued"  # queued -> running -> done; queued -> cancelled
    images: np.ndarray | None = None
    vectors: np.ndarray | None = None
    neighbours: np.ndarray | None = None  # (rows, top_k) index rows, -1 where fewer exist
    error: BaseException | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_requests: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return len(self.seeds)


class ModelBatcher:
    """The queue and worker of one model. `run(job, wait)` blocks until the job is done."""

    def __init__(self, name: str, generator: ConditionalGenerator, policy: BatchPolicy, workers: int = 1):
        if workers < 1:
            raise ValueError(f"a model needs at least one batch worker, got {workers}")
        self.name, self.generator, self.policy, self.max_workers = name, generator, policy, workers
        self._lock = threading.Condition()
        self._gathering = threading.Lock()  # one worker gathers at a time; the others compute
        self._queue: list[Job] = []
        self._workers = 0
        self.batches = 0  # counters for benchmarks and logs
        self.batched_requests = 0

    def run(self, job: Job, timeout: float | None) -> Job:
        """Queue `job` and wait for it. `timeout` (seconds, None = none): if it passes while the
        job still waits, the job is withdrawn and `Expired('queue')` raised; once its batch
        has started, the batch's own deadline checks apply."""
        with self._lock:
            self._queue.append(job)
            if self._workers < self.max_workers:
                self._workers += 1
                threading.Thread(target=self._serve, name=f"batch-{self.name}", daemon=True).start()
            self._lock.notify_all()
        if not job.done.wait(timeout):
            with self._lock:
                if job.state == "queued":
                    job.state = "cancelled"
                    self._queue.remove(job)
                    raise Expired("queue")
            job.done.wait()  # running: it finishes (or is dropped) at the batch's next check
        if job.error is not None:
            raise job.error
        return job

    # -- the worker ----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """Wait for work; then gather same-embedder jobs for up to max_wait_ms. None: idle, quit."""
        policy = self.policy
        with self._gathering, self._lock:
            if not self._queue:
                self._lock.wait(policy.idle_seconds)
                if not self._queue:
                    self._workers -= 1  # a later run() starts a new worker
                    return None
            first = self._queue[0]
            wait_until = first.queued_at + policy.max_wait_ms / 1000
            while True:
                batch = self._gather(first)
                left = wait_until - time.perf_counter()
                if sum(j.rows for j in batch) >= policy.max_batch_rows or left <= 0:
                    break
                self._lock.wait(left)
            for job in batch:
                self._queue.remove(job)
                job.state = "running"
            return batch

    def _gather(self, first: Job) -> list[Job]:
        """Queued jobs in arrival order that share `first`'s index and embedder (an index swap
        changes them), up to max_batch_rows; `first` always goes, however many rows it has."""
        batch, rows = [], 0
        for job in self._queue:
            if job.embedder is not first.embedder or job.index is not first.index:
                continue
            if batch and rows + job.rows > self.policy.max_batch_rows:
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._compute(batch)
            except BaseException as error:  # a failing batch fails its requests, not the worker
                for job in batch:
                    if not job.done.is_set():
                        job.error = error
            finally:
                for job in batch:
                    job.state = "done"
                    job.done.set()

    def _compute(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        live = self._drop_expired(batch, "generate")
        if not live:
            return
        for job in live:
            job.timings_ms["queue"] = (start - job.queued_at) * 1000
            job.batch_requests = len(live)
        self.batches += 1
        self.batched_requests += len(live)
        chunk = self.policy.chunk_rows
        conditions = np.concatenate([j.conditions for j in live])
        seeds = np.array([s for j in live for s in j.seeds], dtype=np.int64)
        images = np.concatenate([
            self.generator.sample_conditions(c, s.tolist())
            for c, s in zip(fixed_chunks(conditions, chunk, True), fixed_chunks(seeds, chunk, True))
        ])[: len(seeds)]
        generated = time.perf_counter()
        kept = self._drop_expired(live, "embed")
        positions = np.cumsum([0] + [j.rows for j in live])
        if kept:
            rows = np.concatenate([np.arange(positions[i], positions[i + 1]) for i, j in enumerate(live) if j in kept])
            vectors = live[0].embedder.embed(images[rows], batch_size=chunk, fixed_shape=True)
        embedded = time.perf_counter()
        offset = 0
        for i, job in enumerate(live):
            job.timings_ms["generate"] = (generated - start) * 1000
            if job in kept:
                job.images = images[positions[i] : positions[i + 1]]
                job.vectors = vectors[offset : offset + job.rows]
                offset += job.rows
                job.timings_ms["embed"] = (embedded - generated) * 1000
        searching = self._drop_expired(kept, "search")
        for k in sorted({job.top_k for job in searching}):  # one k per call: ties cut the same way as alone
            same_k = [job for job in searching if job.top_k == k]
            queries = np.concatenate([job.vectors for job in same_k])
            found = np.concatenate([same_k[0].index.search(queries[i : i + SEARCH_CHUNK], k)[1]
                                    for i in range(0, len(queries), SEARCH_CHUNK)])
            offset = 0
            for job in same_k:
                job.neighbours = found[offset : offset + job.rows]
                offset += job.rows
        searched = time.perf_counter()
        for job in searching:
            job.timings_ms["search"] = (searched - embedded) * 1000

    @staticmethod
    def _drop_expired(jobs: list[Job], stage: str) -> list[Job]:
        live = []
        for job in jobs:
            if job.expired():
                job.error = Expired(stage)
            else:
                live.append(job)
        return live
