"""Dynamic batching: concurrent requests for one model share generator, embedder and FAISS runs.

On CPU a small forward is mostly per-layer overhead: the in-domain embedder does 104 images/s
at batch 1 and 530 at batch 32 (2 cores). So requests for the same model that arrive within
`max_wait_ms` of the first waiting one are gathered, up to `max_batch_rows` images, and run as
one batch by the model's worker thread: one generator run, one embedder run, one FAISS search
per distinct top_k and filter; each request then merges its own candidates on its own thread.

The stages are functions that return their output:
    generate(generator, conditions, seeds, chunk_rows) -> images
    edit(generator, images, sources, targets, chunk_rows) -> images (RetrieveSimilar's edits)
    embed(embedder, images, chunk_rows)                 -> vectors
    search(index, vectors, k, allowed)                  -> candidates (index rows; allowed:
                                                           the rows a metadata filter keeps)
A request hands `ModelBatcher.run` a `BatchRequest` (its rows and what to search them in) and
gets back its own `Drawn` (its rows of each stage's output, and the timings), through a future
that the worker resolves once the batch is done; nothing else passes between the two.

Batch-invariant by construction: both networks always run on slices of exactly `chunk_rows`
rows (the last one padded with copies of its first row), whether a batch holds one request or
many. oneDNN picks kernels by tensor shape and its results differ in the last bits between
shapes; with one shape, a row's output depends only on its own input. FAISS is searched
`SEARCH_CHUNK` queries at a time, below its BLAS threshold (20), where each query is scored on
its own. So a request returns bit for bit what it returns alone (tests/test_batching.py).

Deadlines: a request whose deadline passes while it waits is taken out of the queue and gets
`Expired('queue')`; inside a batch, each request's deadline is checked before the generate,
embed and search stages, and a request past it is left out of the rest of the batch and gets
`Expired(stage)`. The service turns either into DeadlineExceeded.

Measured: each computed batch updates `seconds_per_row`, an exponential moving average
(weight EMA_WEIGHT for the newest) of the batch's duration (generate to search) per row it ran
(its rows padded to whole chunks, up to max_batch_rows), which admission uses to tell how long a
request would wait (service.Admission); and each is handed,
as a `BatchStats`, to the callables in `observers` (the server's metrics), outside any lock.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np

from atelier.generator import ConditionalGenerator
from atelier.indexer.embedders import Embedder, fixed_chunks
from atelier.indexer.index_directory import IndexDirectory
from atelier.retrieval.stages import EMBED, GENERATE, QUEUE, SEARCH

log = logging.getLogger("atelier.retrieval")
SEARCH_CHUNK = 16  # queries per FAISS call: under faiss.cvar.distance_compute_blas_threshold
EMA_WEIGHT = 0.3  # the newest batch's weight in seconds_per_row: a few batches follow a change of load

# Workers are daemon threads so that an idle one never holds the process up. One still inside
# a batch when the interpreter finalizes aborts the process from torch's C++ thread pool
# ("terminate called without an active exception"), so at exit each batch in flight is let
# finish first. atexit runs after the interpreter has joined its non-daemon threads.
_LIVE: weakref.WeakSet[ModelBatcher] = weakref.WeakSet()


@atexit.register
def _finish_batches() -> None:
    for batcher in list(_LIVE):
        batcher.finish(timeout=60.0)


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
    """A request's deadline passed before `stage`, or while it waited (stage QUEUE); the service
    turns it into DeadlineExceeded."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


@dataclass(frozen=True, eq=False)
class BatchRequest:
    """What one request asks of its model's batch: its rows, and what to embed and search them with."""

    conditions: np.ndarray  # (rows, cond_dim)
    seeds: list[int]  # one per row
    embedder: Embedder  # the served index and its embedder, as the request read them at its start
    index: IndexDirectory
    top_k: int
    expired: Callable[[], bool]  # has the request's deadline passed?
    # a metadata filter: the index rows it allows (None: all), and a key naming the filter, so
    # requests with the same filter and top_k share one search
    allowed: np.ndarray | None = None
    filter_key: tuple = ()
    # an edit (RetrieveSimilar): these uint8 images at the model's size, inverted under their
    # source conditions and redrawn under `conditions`; the seeds are then unused
    edit_from: np.ndarray | None = None
    edit_sources: np.ndarray | None = None
    given: np.ndarray | None = None  # an image query: these images are embedded as they are, nothing drawn

    @property
    def rows(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class BatchStats:
    """One computed batch, as observers get it."""

    model: str
    rows: int  # rows generated (or edited, or given) in the batch
    requests: int
    seconds: float  # generate + embed + search


@dataclass(frozen=True, eq=False)
class Drawn:
    """What a batch returns to one request: its own rows of each stage's output."""

    images: np.ndarray  # (rows, H, W, C) uint8
    vectors: np.ndarray  # (rows, dim)
    candidates: np.ndarray  # (rows, top_k) index rows, -1 where fewer exist
    timings_ms: dict[str, float]  # queue, generate, embed, search (the batch's), in that order
    batch_requests: int  # how many requests shared the batch


# -- the stages --------------------------------------------------------------------------------


def generate(generator: ConditionalGenerator, conditions: np.ndarray, seeds: Sequence[int],
             chunk_rows: int) -> np.ndarray:
    """One image per row of `conditions` and its seed, `chunk_rows` rows per generator run (the
    last chunk padded), so a row's image depends on its own condition and seed alone."""
    seeds = np.asarray(seeds, dtype=np.int64)
    return np.concatenate([
        generator.sample_conditions(c, s.tolist())
        for c, s in zip(fixed_chunks(conditions, chunk_rows, True), fixed_chunks(seeds, chunk_rows, True))
    ])[: len(seeds)]


def edit(generator: ConditionalGenerator, images: np.ndarray, sources: np.ndarray, targets: np.ndarray,
         chunk_rows: int) -> np.ndarray:
    """Each image redrawn under its target condition (ConditionalGenerator.edit_conditions),
    `chunk_rows` rows per run (the last chunk padded), as in generate."""
    return np.concatenate([
        generator.edit_conditions(i, s, t)
        for i, s, t in zip(fixed_chunks(images, chunk_rows, True), fixed_chunks(sources, chunk_rows, True),
                           fixed_chunks(targets, chunk_rows, True))
    ])[: len(images)]


def embed(embedder: Embedder, images: np.ndarray, chunk_rows: int) -> np.ndarray:
    """One vector per image, `chunk_rows` images per embedder run (padded, as in generate)."""
    return embedder.embed(images, batch_size=chunk_rows, fixed_shape=True)


def search(index: IndexDirectory, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Each vector's k nearest index rows (-1 where fewer exist), SEARCH_CHUNK queries per FAISS
    call; `allowed`: only among these rows (IndexDirectory.rows_matching)."""
    return np.concatenate([index.search(vectors[i : i + SEARCH_CHUNK], k, allowed)[1]
                           for i in range(0, len(vectors), SEARCH_CHUNK)])


# -- the queue and worker of one model -----------------------------------------------------------


@dataclass(eq=False)  # compared and hashed by identity: the queue removes this one, not an equal one
class _Pending:
    request: BatchRequest
    future: futures.Future = field(default_factory=futures.Future)  # -> Drawn, or Expired / the batch's error
    queued_at: float = field(default_factory=time.perf_counter)


class ModelBatcher:
    """The queue and worker of one model. `run(request, timeout)` blocks until its batch is done."""

    def __init__(self, name: str, generator: ConditionalGenerator, policy: BatchPolicy, workers: int = 1):
        if workers < 1:
            raise ValueError(f"a model needs at least one batch worker, got {workers}")
        self.name, self.generator, self.policy, self.max_workers = name, generator, policy, workers
        self._lock = threading.Condition()  # guards the queue, and taking a request out of it
        self._gathering = threading.Lock()  # one worker gathers at a time; the others compute
        self._queue: list[_Pending] = []
        self._workers = 0
        self._threads: list[threading.Thread] = []
        self._closing = False  # set at interpreter exit: idle workers quit at once
        _LIVE.add(self)
        self.batches = 0  # counters for benchmarks and logs
        self.batched_requests = 0
        self._seconds_per_row: float | None = None  # the moving average; None until a batch is measured
        self.observers: list[Callable[[BatchStats], None]] = []  # called with each computed batch

    @property
    def seconds_per_row(self) -> float | None:
        """Recent batches' duration per row (moving average, seconds); None before the first batch."""
        return self._seconds_per_row

    def queued(self) -> int:
        """Requests waiting for a batch (not those in one)."""
        with self._lock:
            return len(self._queue)

    def _measured(self, rows: int, requests: int, seconds: float, chunk: int) -> None:
        """Update seconds_per_row with a batch of `rows` rows that took `seconds`, and tell the observers.

        Per row of what the batch cost: the networks ran its rows padded to whole chunks, so a
        lone request of 4 rows costs what 8 would (and, batched, 8 queued rows cost that too);
        capped at max_batch_rows, for a batch can never hold more (when batches hold one request, a
        request's own rows are what it costs)."""
        capacity = max(rows, min(-(-rows // chunk) * chunk, self.policy.max_batch_rows))
        with self._lock:
            per_row = seconds / max(capacity, 1)
            previous = self._seconds_per_row
            self._seconds_per_row = per_row if previous is None else EMA_WEIGHT * per_row + (1 - EMA_WEIGHT) * previous
        stats = BatchStats(self.name, rows, requests, seconds)
        for observe in list(self.observers):
            try:
                observe(stats)
            except Exception:  # an observer (metrics) never fails a batch
                log.exception("batch observer failed for model %r", self.name)

    def run(self, request: BatchRequest, timeout: float | None) -> Drawn:
        """Queue `request` and return its rows of the batch it ran in. `timeout` (seconds, None
        = none): if it passes while the request still waits, the request is withdrawn and
        `Expired('queue')` raised; once its batch has started, the batch's own deadline checks apply."""
        pending = _Pending(request)
        with self._lock:
            self._queue.append(pending)
            if self._workers < self.max_workers:
                self._workers += 1
                worker = threading.Thread(target=self._serve, name=f"batch-{self.name}", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [worker]
                worker.start()
            self._lock.notify_all()
        futures.wait([pending.future], timeout)
        if not pending.future.done():
            with self._lock:
                # cancel() succeeds only while the future is pending, i.e. the request is still
                # queued: a worker marks it running under this lock as it takes it out
                if pending.future.cancel():
                    self._queue.remove(pending)
                    raise Expired(QUEUE)
        return pending.future.result()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for work; then gather same-embedder requests for up to max_wait_ms. None: idle, quit."""
        policy = self.policy
        with self._gathering, self._lock:
            if not self._queue and not self._closing:
                self._lock.wait(policy.idle_seconds)
            if not self._queue:
                self._workers -= 1  # a later run() starts a new worker
                return None
            first = self._queue[0]
            wait_until = first.queued_at + policy.max_wait_ms / 1000
            while True:
                batch = self._gather(first)
                left = wait_until - time.perf_counter()
                if sum(p.request.rows for p in batch) >= policy.max_batch_rows or left <= 0:
                    break
                self._lock.wait(left)
            for pending in batch:
                self._queue.remove(pending)
                pending.future.set_running_or_notify_cancel()  # never cancelled: run() cancels only what is queued
            return batch

    def finish(self, timeout: float) -> None:
        """Let the workers end their batches and quit, waiting up to `timeout` seconds for them."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            threads = list(self._threads)
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))

    def _gather(self, first: _Pending) -> list[_Pending]:
        """Queued requests in arrival order that share `first`'s index and embedder (an index swap
        changes them), up to max_batch_rows; `first` always goes, however many rows it has."""
        batch, rows = [], 0
        for pending in self._queue:
            request = pending.request
            if request.embedder is not first.request.embedder or request.index is not first.request.index:
                continue
            if batch and rows + request.rows > self.policy.max_batch_rows:
                break
            batch.append(pending)
            rows += request.rows
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                outcomes = self._compute(batch)
            except BaseException as error:  # a failing batch fails its requests, not the worker
                outcomes = [error] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    def _compute(self, batch: list[_Pending]) -> list[Drawn | Expired]:
        """The stages in order on `batch`; returns each request's outcome, in batch order."""
        outcomes: dict[_Pending, Drawn | Expired] = {}

        def still_live(pendings: list[_Pending], stage: str) -> list[_Pending]:
            for pending in pendings:
                if pending.request.expired():
                    outcomes[pending] = Expired(stage)
            return [p for p in pendings if p not in outcomes]

        start = time.perf_counter()
        live = still_live(batch, GENERATE)
        if not live:
            return [outcomes[p] for p in batch]
        requests = len(live)
        self.batches += 1
        self.batched_requests += requests
        chunk = self.policy.chunk_rows
        images = self._draw(live, chunk)
        generated = time.perf_counter()
        live = still_live(live, EMBED)
        vectors = {}
        if live:  # one embedder per batch: _gather keeps to the first request's
            vectors = split(embed(live[0].request.embedder, np.concatenate([images[p] for p in live]), chunk), live)
        embedded = time.perf_counter()
        live = still_live(live, SEARCH)
        candidates: dict[_Pending, np.ndarray] = {}
        # one k and one filter per call: ties cut the same way as alone
        for k, key in sorted({(p.request.top_k, p.request.filter_key) for p in live}):
            same = [p for p in live if (p.request.top_k, p.request.filter_key) == (k, key)]
            found = search(same[0].request.index, np.concatenate([vectors[p] for p in same]), k, same[0].request.allowed)
            candidates.update(split(found, same))
        searched = time.perf_counter()
        self._measured(sum(p.request.rows for p in images), requests, searched - start, chunk)
        for p in live:
            timings = {QUEUE: start - p.queued_at, GENERATE: generated - start, EMBED: embedded - generated,
                       SEARCH: searched - embedded}
            outcomes[p] = Drawn(images[p], vectors[p], candidates[p], {s: t * 1000 for s, t in timings.items()},
                                requests)
        return [outcomes[p] for p in batch]


    def _draw(self, live: list[_Pending], chunk: int) -> dict[_Pending, np.ndarray]:
        """The generate stage: drawings from seeds and edits, each kind in its own fixed chunks,
        and the given images of image queries as they are."""
        sampled = [p for p in live if p.request.edit_from is None and p.request.given is None]
        edited = [p for p in live if p.request.edit_from is not None]
        images = {p: p.request.given for p in live if p.request.given is not None}
        if sampled:
            conditions = np.concatenate([p.request.conditions for p in sampled])
            seeds = [s for p in sampled for s in p.request.seeds]
            images.update(split(generate(self.generator, conditions, seeds, chunk), sampled))
        if edited:
            drawn = edit(self.generator, np.concatenate([p.request.edit_from for p in edited]),
                         np.concatenate([p.request.edit_sources for p in edited]),
                         np.concatenate([p.request.conditions for p in edited]), chunk)
            images.update(split(drawn, edited))
        return images


def split(rows: np.ndarray, owners: list[_Pending]) -> dict[_Pending, np.ndarray]:
    """`rows` cut into each owner's consecutive share, in order."""
    ends = np.cumsum([p.request.rows for p in owners])
    return {p: rows[end - p.request.rows : end] for p, end in zip(owners, ends)}
