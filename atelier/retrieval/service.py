"""GenerateAndRetrieve, in process: attributes -> generated images -> vectors -> products.

Each stage is a function that returns its output (stage names: atelier.retrieval.stages):
    validate  RetrievalService.validate(request) -> ValidRequest: the model name, the
              attributes against that model's schema, the bounds, every default resolved
    generate  batching.generate -> `num_samples` images with the requested model, z drawn
              from the request seed
    embed     batching.embed -> their vectors, by the index's own embedder (same name, input
              size and weights hash)
    search    batching.search -> each sample's top_k nearest products in FAISS (with filters:
              among the products whose metadata matches them, IndexDirectory.rows_matching)
    (these three run in a batch shared with concurrent requests for the same model, after
    waiting for it, timed as queue: the batch worker calls them in order and returns each
    request its own rows of their outputs, `Drawn`)
    merge     merge(index, vectors, candidates, top_k) -> products: the union of those
              candidates, ranked by their MEAN similarity over all samples, with each one's
              image URI (where the catalogue has them) and, asked for, its thumbnail (both
              read from the index folder, never the catalogue)

Why the mean: each sample is one plausible drawing of the request. What the samples share is
what was asked (the attributes); what varies between them (pose, shade, a detail) is noise
from z. Averaging similarity over samples rewards products that match the shared part and
damps products that happen to sit next to one sample's idiosyncrasy, while taking candidates
from every sample's own top_k keeps a product close to any one drawing in the running.
Scores are cosines in [-1, 1]; ties break by product id so results are deterministic.

Reliability (the server's contract, kept here so it is testable without a network):
    limits     every bound is a `Limits` field, and a refusal names the field and its value
    deadline   the caller's remaining time is checked before each stage; once it has passed no
               further stage runs (`DeadlineExceeded`)
    admission  per model, a request is admitted when the wait it can expect (the rows admitted
               ahead of it x the model's measured batch time per row / its batch workers) fits
               its deadline (the caller's, else `default_deadline_seconds`), and refused at once
               (`Overloaded`) when it would not; a hard cap of `max_queue_per_model` requests
               running or waiting keeps the queue bounded whatever the estimate says
    batching   admitted requests for one model are gathered into shared generator + embedder
               batches (atelier.retrieval.batching), computed by `max_running_per_model` worker
               threads; a request returns exactly what it returns alone
    hot swap   the index and its embedder are one reference (`ServedIndex`) that a request reads
               once at its start; `reload_index` builds and checks the new one beside the old,
               then swaps that reference, so in-flight requests finish on the index they began on
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from atelier import artifacts
from atelier.catalog.schema import AttributeSchema, InvalidAttributes
from atelier.generator import ConditionalGenerator, load_generator
from atelier.generator.base import sample_seeds
from atelier.indexer.embedders import Embedder, embedder_of_index
from atelier.indexer.index_directory import IndexDirectory
from atelier.retrieval.batching import BatchPolicy, BatchRequest, Drawn, Expired, ModelBatcher
from atelier.retrieval.stages import GENERATE, MERGE, QUEUE, VALIDATE, WORK

log = logging.getLogger("atelier.retrieval")


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says what is allowed."""


class IncompatibleArtifacts(RuntimeError):
    """A model and an index (or an index and its embedder) cannot be combined."""


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed; the message says before which stage work stopped."""


class Overloaded(RuntimeError):
    """A model's queue is full; the message names the bound. Retry later or elsewhere."""


class IndexRefused(RuntimeError):
    """A new index version cannot replace the served one (which keeps serving); says why."""

    def __init__(self, reason: str, version: str | None = None):
        super().__init__(reason)
        self.version = version  # the refused version's name, when it got that far


@dataclass(frozen=True)
class Limits:
    max_num_samples: int = 32
    max_top_k: int = 100
    max_candidates: int = 1024  # num_samples * top_k: bounds the merge work per request
    default_num_samples: int = 4
    default_top_k: int = 10
    # Request shape: names and values are looked up, never stored, but each costs work and
    # each may be echoed in an error message, so all are bounded.
    max_attributes: int = 32  # attribute groups named in one request
    max_values_per_attribute: int = 64
    max_string_length: int = 256  # characters of any model name, group name or value
    # Admission, per model: a request waits when its expected wait fits its deadline, and is
    # refused at once when it does not; a queue without bound would only turn overload into
    # latency for everybody, and memory, so the cap stays.
    max_queue_per_model: int = 256  # hard cap: requests running or waiting; the next is refused at once
    # batches of one model computed at once (its batch worker threads): with 2, one batch's search
    # and merge overlap the next one's forward (QPS at concurrency 32: 51.9 vs 38.6, docs/performance.md)
    max_running_per_model: int = 2
    # gRPC message sizes (the server's receive and send limits; images dominate responses).
    max_request_bytes: int = 1 << 20
    max_response_bytes: int = 64 << 20
    # The deadline admission assumes for a call that sets none (seconds): such a call is admitted
    # when its expected wait fits this. It is not cut off then: without a deadline, it runs to the end.
    default_deadline_seconds: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "default_deadline_seconds":
                if not self.default_deadline_seconds > 0:
                    raise ValueError(f"limit default_deadline_seconds must be positive, got {self.default_deadline_seconds}")
            elif getattr(self, f.name) < 1:
                raise ValueError(f"limit {f.name} must be at least 1, got {getattr(self, f.name)}")
        if self.default_num_samples > self.max_num_samples or self.default_top_k > self.max_top_k:
            raise ValueError(
                f"defaults (num_samples {self.default_num_samples}, top_k {self.default_top_k}) exceed the maxima "
                f"(max_num_samples {self.max_num_samples}, max_top_k {self.max_top_k})"
            )
        if self.default_num_samples * self.default_top_k > self.max_candidates:
            raise ValueError(f"default num_samples x top_k exceeds max_candidates {self.max_candidates}")

    def as_dict(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RetrievalRequest:
    attributes: Mapping[str, Any]
    model: str = ""  # "" = the service's default model
    num_samples: int = 0  # 0 = Limits.default_num_samples
    top_k: int = 0  # 0 = Limits.default_top_k
    seed: int | None = None  # None = a fresh random seed, returned in the result
    return_images: bool = False
    filters: Mapping[str, Any] = field(default_factory=dict)  # group -> allowed value(s) of the index's products
    return_thumbnails: bool = False  # each product's thumbnail from the index (one built with thumbnails)


@dataclass
class Product:
    id: str
    score: float
    attributes: dict[str, Any]  # the schema's groups only (never image_uri)
    thumbnail: bytes | None = None  # encoded PNG / JPEG, at most the index's thumbnail_size px; when asked
    image_uri: str | None = None  # the catalogue's http(s) address of the photo, where it has one


@dataclass
class RetrievalResult:
    products: list[Product]
    images: list[np.ndarray]  # uint8 (H, W, C), empty unless asked for
    timings_ms: dict[str, float]
    model: str
    model_version: str
    index_version: str
    seed: int
    num_samples: int


@dataclass(frozen=True)
class ServedIndex:
    """What a request searches: an index and the embedder that matches it, swapped as one."""

    index: IndexDirectory
    embedder: Embedder

    @property
    def version(self) -> str:
        return self.index.version


@dataclass
class LoadedModel:
    name: str
    generator: ConditionalGenerator
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return f"{self.generator.family}:{self.manifest['weights_sha256'][:12]}"


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed `validate`, as it will be served: every default resolved."""

    model: LoadedModel
    attributes: dict[str, tuple[str, ...]]  # normalised by the model's schema
    num_samples: int
    top_k: int
    seed: int  # the request's, or a fresh random one
    return_images: bool
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # canonical spellings where the schema has them
    return_thumbnails: bool = False


class RetrievalService:
    def __init__(self, index: IndexDirectory, embedder: Embedder, models: dict[str, LoadedModel],
                 limits: Limits | None = None, index_source: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, batching: BatchPolicy | None = None):
        if not models:
            raise ValueError("at least one model is needed (name -> checkpoint folder)")
        self.models = models
        self.limits = limits or Limits()
        self.batching = batching or BatchPolicy()
        self.batchers = {name: ModelBatcher(name, m.generator, self.batching, self.limits.max_running_per_model)
                         for name, m in models.items()}
        self.index_source = Path(index_source) if index_source is not None else index.path  # what reload re-resolves
        self.clock = clock
        self.admission = Admission(self.limits, self.batchers)
        self._served = ServedIndex(index, check_index(index, models, embedder))
        self._reload_lock = threading.Lock()  # one reload at a time; requests never take it

    @classmethod
    def open(cls, index_path: Path, model_paths: Mapping[str, Path], limits: Limits | None = None,
             batching: BatchPolicy | None = None,
             sampling: Mapping[str, Mapping[str, Any]] | None = None) -> RetrievalService:
        """Load the index, its embedder and the models, refusing any combination that disagrees.
        `sampling`: per model name, sampling options of its family to serve it with."""
        if not model_paths:
            raise ValueError("at least one model is needed (name -> checkpoint folder)")
        sampling = dict(sampling or {})
        unknown = sorted(set(sampling) - set(model_paths))
        if unknown:
            raise ValueError(f"sampling options for unknown model(s) {unknown}; models: {', '.join(model_paths)}")
        index = IndexDirectory.open(index_path)
        embedder = check_index(index, {})  # a wrong embedder fails before the slow model loading
        models = {name: LoadedModel(name, *load_generator(path, sampling=sampling.get(name)))
                  for name, path in model_paths.items()}
        return cls(index, embedder, models, limits, index_source=index_path, batching=batching)  # checks every model's schema

    # -- the served index, and swapping it ----------------------------------------------------
    @property
    def served(self) -> ServedIndex:
        return self._served

    @property
    def index(self) -> IndexDirectory:
        return self._served.index

    @property
    def embedder(self) -> Embedder:
        return self._served.embedder

    def published_version(self) -> str:
        """The version name `index_source` points at now (may be newer than the served one)."""
        return artifacts.resolve(self.index_source).name

    def reload_index(self) -> tuple[str, bool]:
        """Load the version published at `index_source` and serve it if it checks out.

        Returns (version now served, whether it changed). The new index is opened with every
        file's sha256 verified, its embedder matched (reused when identical) and every model's
        schema checked against it, all beside the old one; only then is the one reference
        swapped. On any failure the old index keeps serving and `IndexRefused` says why.
        """
        with self._reload_lock:
            old = self._served
            version = None
            try:
                folder = artifacts.resolve(self.index_source)  # resolved once: that version, and only it
                version = folder.name
                if version == old.version:
                    return old.version, False
                index = IndexDirectory.open(folder, verify=True)
                embedder = check_index(index, self.models, old.embedder)
            except Exception as error:  # whatever is wrong with the new one, the old one keeps serving
                reason = f"index version {version} at {self.index_source} refused: {error}; still serving {old.version}"
                log.error("%s", reason)
                raise IndexRefused(reason, version) from None
            self._served = ServedIndex(index, embedder)  # the swap: one reference assignment
            log.info("index swapped: %s -> %s (%d products)", old.version, index.version, len(index))
            return index.version, True

    @property
    def schema(self) -> AttributeSchema:
        """What can be asked: the default model's schema (models fit within the index's)."""
        return self.models[self.default_model].generator.schema

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    # -- the call -----------------------------------------------------------------------------
    def check_sizes(self, request: RetrievalRequest) -> None:
        """Bounds on the request's shape, checked before any name is looked up or echoed."""
        self.check_shape({"model name": request.model}, {"attribute": request.attributes, "filter": request.filters})

    def check_shape(self, strings: Mapping[str, str], mappings: Mapping[str, Mapping[str, Any]]) -> None:
        """The bounds of `Limits` on a request's strings (what -> text) and its group -> value(s)
        maps (what kind -> map); the refusal names the limit."""
        lim = self.limits

        def short(text: str) -> str:
            return repr(text[:40] + "...") if len(text) > 40 else repr(text)

        def check_string(what: str, text: str) -> None:
            if len(text) > lim.max_string_length:
                raise InvalidRequest(
                    f"{what} {short(text)} has {len(text)} characters; allowed at most {lim.max_string_length} (max_string_length)"
                )

        for what, text in strings.items():
            check_string(what, text)
        for kind, given in mappings.items():
            if len(given) > lim.max_attributes:
                raise InvalidRequest(f"{len(given)} {kind}s given; allowed at most {lim.max_attributes} (max_attributes)")
            for name, raw in given.items():
                check_string(f"{kind} name", name)
                values = (raw,) if isinstance(raw, str) else tuple(raw)
                if len(values) > lim.max_values_per_attribute:
                    raise InvalidRequest(
                        f"{kind} {short(name)} has {len(values)} values; allowed at most {lim.max_values_per_attribute} (max_values_per_attribute)"
                    )
                for value in values:
                    check_string(f"value of {kind} {short(name)}", value)

    def validate(self, request: RetrievalRequest, served: ServedIndex | None = None) -> ValidRequest:
        """The request checked against the limits, its model's schema and (its filters) the
        schema of `served` (default: the index served now); `InvalidRequest` says what is
        allowed where it breaks a rule."""
        self.check_sizes(request)
        served = served or self._served
        name = request.model or self.default_model
        if name not in self.models:
            raise InvalidRequest(f"unknown model {name!r}; available: {', '.join(self.models)}")
        lim = self.limits
        n = request.num_samples or lim.default_num_samples
        k = request.top_k or lim.default_top_k
        if not 1 <= n <= lim.max_num_samples:
            raise InvalidRequest(f"num_samples {n} out of range: allowed 1..{lim.max_num_samples} (max_num_samples; 0 = {lim.default_num_samples})")
        if not 1 <= k <= lim.max_top_k:
            raise InvalidRequest(f"top_k {k} out of range: allowed 1..{lim.max_top_k} (max_top_k; 0 = {lim.default_top_k})")
        if n * k > lim.max_candidates:
            raise InvalidRequest(f"num_samples x top_k = {n * k} exceeds the limit {lim.max_candidates} (max_candidates)")
        model = self.models[name]
        schema = model.generator.schema
        if not request.attributes:
            raise InvalidRequest("no attributes given; " + describe_allowed(schema))
        try:
            attributes = schema.normalise(request.attributes, require_all=not model.generator.accepts_partial)
        except InvalidAttributes as error:
            raise InvalidRequest(str(error)) from None
        filters = normalise_filters(served.index.schema, request.filters)
        if request.return_thumbnails and not served.index.has_thumbnails:
            raise InvalidRequest(
                f"return_thumbnails: index version {served.version} has no thumbnails; "
                "reindex with `atelier index --thumbnail-size PX` (default 64) to serve them"
            )
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        return ValidRequest(model, attributes, n, k, seed, request.return_images, filters, request.return_thumbnails)

    def generate_and_retrieve(self, request: RetrievalRequest, time_remaining: float | None = None) -> RetrievalResult:
        """Run the stages; `time_remaining` (seconds, None = no deadline) is checked before each."""
        served = self._served  # read once: a swap during this request does not touch it
        deadline = Deadline(time_remaining, self.clock)
        started = time.perf_counter()
        deadline.check(VALIDATE)
        valid = self.validate(request, served)
        timings = {VALIDATE: milliseconds_since(started)}
        with self.admission.slot(valid.model.name, valid.num_samples, deadline.remaining()):
            deadline.check(GENERATE)
            drawn = self.draw(valid, served, deadline)
            timings.update(drawn.timings_ms)  # queue, generate, embed, search: the batch's
            started = time.perf_counter()
            deadline.check(MERGE)
            products = merge(served.index, drawn.vectors, drawn.candidates, valid.top_k, valid.return_thumbnails)
            timings[MERGE] = milliseconds_since(started)
        return RetrievalResult(
            products=products, images=list(drawn.images) if valid.return_images else [], timings_ms=timings,
            model=valid.model.name, model_version=valid.model.version, index_version=served.version,
            seed=valid.seed, num_samples=valid.num_samples,
        )

    def draw(self, valid: ValidRequest, served: ServedIndex, deadline: Deadline) -> Drawn:
        """Generate, embed and search `valid`'s samples in its model's next batch; returns its rows."""
        model = valid.model
        condition = model.generator.schema.encode(valid.attributes, require_all=False)  # validate() applied the rules
        n = valid.num_samples
        allowed = served.index.rows_matching(valid.filters) if valid.filters else None
        rows = BatchRequest(np.repeat(condition[None], n, axis=0), sample_seeds(valid.seed, n),
                            served.embedder, served.index, valid.top_k, deadline.passed,
                            allowed, tuple(sorted(valid.filters.items())))
        try:
            return self.batchers[model.name].run(rows, deadline.remaining())
        except Expired as expired:
            deadline.refuse(expired.stage, f"model {model.name!r}'s batch queue "
                                           f"(max_running_per_model = {self.limits.max_running_per_model})")

    # -- description (GetSchema) -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        index = self.index  # one version for the whole description
        return {
            "schema": self.schema.to_dict(),
            "filter_groups": index.schema.to_dict()["groups"],
            "default_model": self.default_model,
            "models": [
                {"name": m.name, "family": m.generator.family, "version": m.version,
                 "image_size": m.generator.image_size, "channels": m.generator.channels,
                 "accepts_partial": bool(m.generator.accepts_partial), "can_edit": bool(m.generator.can_edit)}
                for m in self.models.values()
            ],
            "index": {
                "version": index.version, "count": len(index), "dimension": index.manifest["dimension"],
                "metric": index.manifest["metric"], "index_type": index.manifest["index_type"],
                "embedder": index.embedder, "catalogue": index.manifest["catalogue"],
                "thumbnail_size": index.thumbnail_size,
            },
            "limits": self.limits.as_dict(),
        }


def merge(index: IndexDirectory, vectors: np.ndarray, candidates: np.ndarray, k: int,
          thumbnails: bool = False) -> list[Product]:
    """The merge stage: the k best of all samples' `candidates` (index rows) as products, with
    their image URIs and (`thumbnails`) their thumbnails."""
    ranked, scores = merge_by_mean_similarity(index, vectors, candidates, k)
    rows = ranked.tolist()
    chosen = index.product_rows(rows)
    uris = index.image_uris(rows)
    images = index.thumbnails(rows) if thumbnails else [None] * len(rows)
    return [Product(id=row.pop("id"), score=float(s), attributes=row, thumbnail=image, image_uri=uri)
            for row, s, uri, image in zip(chosen, scores, uris, images)]


def check_index(index: IndexDirectory, models: Mapping[str, LoadedModel], embedder: Embedder | None = None) -> Embedder:
    """The embedder that matches `index` (`embedder` reused when it is that one), after checking
    that the index's embedder weights are the ones here and that every model fits its schema."""
    spec = index.embedder
    if (embedder is None or (embedder.name, embedder.input_size) != (spec["name"], int(spec["input_size"]))
            or embedder.weights_sha256 != spec["weights_sha256"]):
        embedder = embedder_of_index(spec, index.path)
    if embedder.weights_sha256 != spec["weights_sha256"]:
        raise IncompatibleArtifacts(
            f"index {index.path} was built with {spec['name']} weights {spec['weights_sha256'][:12]}, "
            f"but the weights here hash to {embedder.weights_sha256[:12]}: reindex, or install the same weights"
        )
    if int(index.manifest["dimension"]) != embedder.dim:
        raise IncompatibleArtifacts(
            f"index {index.path} holds {index.manifest['dimension']}-d vectors but {spec['name']} gives {embedder.dim}-d"
        )
    for name, model in models.items():
        difference = model.generator.schema.fits_within(index.schema)
        if difference:
            raise IncompatibleArtifacts(f"model {name!r} does not fit index {index.path}: {difference}")
    return embedder


class Deadline:
    """The caller's deadline on `clock`; `check(stage)` stops the request before that stage."""

    def __init__(self, seconds: float | None, clock: Callable[[], float]):
        self.seconds, self.clock = seconds, clock
        self.at = None if seconds is None else clock() + seconds

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - self.clock())

    def passed(self) -> bool:
        return self.at is not None and self.clock() >= self.at

    def check(self, stage: str) -> None:
        if self.passed():
            self.refuse(stage)

    def refuse(self, stage: str, queue: str = "the batch queue") -> NoReturn:
        """Raise DeadlineExceeded naming where the request stopped (stage QUEUE: while it waited in `queue`)."""
        if stage == QUEUE:  # waiting is no work: what was not run starts at generate
            where, stage = f"while it waited in {queue}", GENERATE
        else:
            where = f"before stage {stage!r}"
        raise DeadlineExceeded(
            f"the request's deadline ({self.seconds * 1000:.0f} ms) passed {where}; "
            f"not run: {', '.join(WORK[WORK.index(stage):])}"
        )


class Admission:
    """Per model, admission by expected wait, under a hard cap.

    A request of `rows` rows is admitted when the wait it can expect, the rows already admitted
    for its model (running or waiting) x the model's measured batch time per row
    (`ModelBatcher.seconds_per_row`) / the model's batch workers, fits within its deadline (the
    caller's; else `default_deadline_seconds`). Before the model's first batch is measured,
    every request is admitted. Beyond that, `Overloaded` at once, naming the expected wait, the
    deadline and the bound; and at `max_queue_per_model` requests admitted, whatever the
    estimate, `Overloaded` naming the cap, so the queue never grows without bound."""

    def __init__(self, limits: Limits, batchers: Mapping[str, ModelBatcher] | None = None):
        self.max_queue = limits.max_queue_per_model
        self.default_deadline = limits.default_deadline_seconds
        self.batchers = batchers or {}
        self._lock = threading.Lock()
        self._admitted: Counter[str] = Counter()
        self._rows: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()

    def admitted(self, model: str) -> int:
        """Requests of `model` admitted now (running or waiting)."""
        with self._lock:
            return self._admitted[model]

    def rows(self, model: str) -> int:
        """Rows of the requests of `model` admitted now."""
        with self._lock:
            return self._rows[model]

    def peak(self, model: str) -> int:
        """The most requests of `model` ever admitted at once."""
        with self._lock:
            return self._peak[model]

    def expected_wait(self, model: str) -> float | None:
        """Seconds a request of `model` arriving now can expect to wait; None before any measurement."""
        with self._lock:
            return self._expected_wait(model)

    def _expected_wait(self, model: str) -> float | None:
        batcher = self.batchers.get(model)
        per_row = batcher.seconds_per_row if batcher is not None else None
        return None if per_row is None else self._rows[model] * per_row / batcher.max_workers

    @contextlib.contextmanager
    def slot(self, model: str, rows: int = 1, deadline: float | None = None) -> Iterator[None]:
        """Hold a place in `model`'s queue for a request of `rows` rows with `deadline` seconds
        left (None: it set none), or raise Overloaded at once."""
        with self._lock:
            self._admit(model, deadline)
            self._admitted[model] += 1
            self._rows[model] += rows
            self._peak[model] = max(self._peak[model], self._admitted[model])
        try:
            yield
        finally:
            with self._lock:
                self._admitted[model] -= 1
                self._rows[model] -= rows

    def _admit(self, model: str, deadline: float | None) -> None:
        """Raise Overloaded when the request cannot be admitted; the lock is held."""
        count = self._admitted[model]
        if count >= self.max_queue:
            raise Overloaded(
                f"model {model!r} has {count} requests running or waiting, its queue bound "
                f"(max_queue_per_model = {self.max_queue}); retry later"
            )
        wait = self._expected_wait(model)
        budget, whose = ((deadline, "the caller's") if deadline is not None
                         else (self.default_deadline, "none given: the server's default_deadline_seconds"))
        if wait is not None and wait > budget:
            batcher = self.batchers[model]
            raise Overloaded(
                f"model {model!r} is too busy to start this request within its deadline: expected wait "
                f"{wait:.2f} s ({self._rows[model]} rows ahead x {batcher.seconds_per_row * 1000:.1f} ms per row / "
                f"{batcher.max_workers} batch workers) exceeds the deadline of {budget:.2f} s ({whose}); "
                f"{count} requests running or waiting (bound max_queue_per_model = {self.max_queue}); "
                "retry later or with a longer deadline"
            )


def merge_by_mean_similarity(index: IndexDirectory, queries: np.ndarray, rows: np.ndarray, k: int):
    """Union of per-sample candidates `rows`, ranked by mean similarity over all `queries`.

    Returns (index rows, scores) of the best k, ties broken by product id.
    """
    candidates = np.unique(rows[rows >= 0])
    mean_similarity = (index.vectors(candidates) @ queries.T).mean(axis=1)
    ids = index.products.column("id").take(candidates).to_pylist()
    order = sorted(range(len(candidates)), key=lambda i: (-mean_similarity[i], ids[i]))[:k]
    return candidates[order], mean_similarity[order]


def milliseconds_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def normalise_filters(schema: AttributeSchema, filters: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """`filters` checked against the index's schema: known groups, at least one value each;
    values in the schema's canonical spelling (case-insensitive). A value outside the schema
    is kept as given: no product has it, so it matches nothing, which is an answer, not an error;
    "" (IndexDirectory's MISSING) matches the products with no value in that group."""
    result: dict[str, tuple[str, ...]] = {}
    for name, raw in filters.items():
        if name not in schema.names:
            raise InvalidRequest(f"unknown filter group {name!r}; filterable groups: {', '.join(schema.names)}")
        group = schema.group(name)
        values = (raw,) if isinstance(raw, str) else tuple(raw)
        if not values:
            raise InvalidRequest(f"filter {name!r} has no value; give one or more of: {', '.join(group.values)}")
        canonical = []
        for value in values:
            try:
                canonical.append(group.values[group.index_of(value)])
            except InvalidAttributes:
                canonical.append(value)
        result[name] = tuple(dict.fromkeys(canonical))
    return result


def describe_allowed(schema: AttributeSchema) -> str:
    return "attributes: " + "; ".join(f"{g.name}: {', '.join(g.values)}" for g in schema.groups)
