"""What operators watch: Prometheus metrics, request ids and the request log of one server.

Metrics live in a registry of the server's own (`Telemetry.registry`, never prometheus_client's
global one, so several servers in one process never clash), served at `GET /metrics` on the
HTTP face and, with `atelier serve --metrics HOST:PORT`, on a port of their own:

    atelier_requests_total{face,method,code}     calls of an Atelier method by gRPC status name;
                                                 face grpc, or http for the HTTP face's calls
    atelier_request_seconds{face,method,code}    their latency (histogram)
    atelier_stage_seconds{method,model,stage}    an answered call's time in each stage
                                                 (atelier.retrieval.stages; histogram)
    atelier_http_requests_total{route,code}      HTTP requests by route (a known path, else
                                                 "other") and HTTP status
    atelier_batch_rows{model}, atelier_batch_requests{model}, atelier_batch_seconds{model}
                                                 each computed batch: its rows, its requests and
                                                 its duration (histograms)
    atelier_queue_depth{model}                   requests admitted now, running or waiting (gauge)
    atelier_queue_rows{model}                    their rows (gauge)
    atelier_batch_seconds_per_row{model}         the moving average admission estimates with (gauge)
    atelier_expected_wait_seconds{model}         the wait a request arriving now can expect (gauge)
    atelier_model_info{model,family,version}, atelier_index_info{version,index_type,...}
                                                 read from the service at each scrape, so an index
                                                 hot swap shows at the next one

A call's request id is the `x-request-id` metadata it sent (HTTP: the X-Request-Id header) when
that is 1 to 128 printable ASCII characters without spaces, else a fresh uuid4 hex; it goes back
as trailing metadata `x-request-id` (HTTP: the X-Request-Id header), answer or error.

The request log: one line per call on the `atelier.requests` logger, at INFO, whose message is
a JSON object: request_id, face, method, code, model, what was asked (attributes, filters,
changes, product_id, num_samples, top_k, seed; strings cut to 100 characters), stages_ms,
total_ms, and on an answer products and index_version, on an error details. `atelier serve`
turns it on (`configure_logging`); `--log-format json` (its default) also writes every other log
record as one JSON object per line, `text` as `LEVEL logger: message`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import exposition as prometheus_exposition
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from atelier.retrieval.batching import BatchStats

REQUEST_LOG = logging.getLogger("atelier.requests")
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata key; HTTP header X-Request-Id
MAX_REQUEST_ID = 128
LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
CONTENT_TYPE = prometheus_exposition.CONTENT_TYPE_LATEST
# seconds: from a sub-millisecond validate to a flow's many-second drawings
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_LOGGED_STRING = 100
MAX_LOGGED_ITEMS = 32


def accept_request_id(given: str | None) -> str:
    """The client's request id when it is a sane one (1-128 printable ASCII, no spaces), else a new uuid4 hex."""
    if given and len(given) <= MAX_REQUEST_ID and all("!" <= c <= "~" for c in given):
        return given
    return uuid.uuid4().hex


def request_id_of(context) -> str:
    """The request id of a gRPC call (or of the HTTP face's context), from its metadata."""
    metadata = getattr(context, "invocation_metadata", None)
    for key, value in (metadata() if metadata is not None else None) or ():
        if key == REQUEST_ID_KEY:
            return accept_request_id(value if isinstance(value, str) else None)
    return accept_request_id(None)


def brief(value: Any, depth: int = 0) -> Any:
    """`value` made small enough to log: strings cut, at most MAX_LOGGED_ITEMS items per level."""
    if isinstance(value, str):
        return value if len(value) <= MAX_LOGGED_STRING else value[:MAX_LOGGED_STRING] + "..."
    if isinstance(value, Mapping) and depth < 2:
        return {brief(str(k)): brief(v, depth + 1) for k, v in list(value.items())[:MAX_LOGGED_ITEMS]}
    if isinstance(value, list | tuple) and depth < 3:
        return [brief(v, depth + 1) for v in list(value)[:MAX_LOGGED_ITEMS]]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return brief(str(value))


@dataclass
class CallRecord:
    """One call of an Atelier method, as it is counted and logged."""

    method: str
    face: str  # "grpc", or "http" for the HTTP face's calls
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    code: str = "OK"  # the gRPC status name
    details: str = ""
    model: str = ""  # as asked; once answered, the model that answered
    asked: dict[str, Any] = field(default_factory=dict)
    stages_ms: dict[str, float] = field(default_factory=dict)  # an answer's timings
    answer: dict[str, Any] = field(default_factory=dict)  # products, index_version
    total_ms: float = 0.0

    def ask(self, model: str = "", **asked: Any) -> None:
        """What the request asked (logged, cut to size); empty values are left out."""
        self.model = brief(model)
        self.asked.update({k: brief(v) for k, v in asked.items() if v not in (None, "", {}, [], ())})

    def answered(self, model: str, stages_ms: Mapping[str, float], **answer: Any) -> None:
        self.model, self.stages_ms, self.answer = model, dict(stages_ms), answer

    def abort(self, context, code: grpc.StatusCode, details: str) -> NoReturn:
        """Record the outcome, then abort the call with it (which raises)."""
        self.code, self.details = code.name, details
        context.abort(code, details)
        raise AssertionError("context.abort returned")  # a context's abort always raises

    def log_fields(self) -> dict[str, Any]:
        fields = {"request_id": self.request_id, "face": self.face, "method": self.method, "code": self.code,
                  "model": self.model, **self.asked, "stages_ms": {s: round(ms, 3) for s, ms in self.stages_ms.items()},
                  "total_ms": round(self.total_ms, 3), **self.answer}
        if self.details:
            fields["details"] = brief(self.details)
        return fields


class Telemetry:
    """The metrics and request log of one server (its servicer and HTTP face share it)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("atelier_requests", "Calls of an Atelier method, by face, method and gRPC status",
                                ["face", "method", "code"], registry=r)
        self.latency = Histogram("atelier_request_seconds", "Latency of calls of an Atelier method",
                                 ["face", "method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("atelier_stage_seconds", "Time of each serving stage of an answered call",
                                ["method", "model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter("atelier_http_requests", "HTTP requests by route and HTTP status",
                                     ["route", "code"], registry=r)
        self.batch_rows = Histogram("atelier_batch_rows", "Rows in each computed batch", ["model"],
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("atelier_batch_requests", "Requests in each computed batch", ["model"],
                                        buckets=REQUEST_BUCKETS, registry=r)
        self.batch_seconds = Histogram("atelier_batch_seconds", "Duration of each computed batch (generate to search)",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.service = None  # what the live gauges and info read; set by attach
        self._observed: list = []  # the batchers this telemetry observes
        r.register(_ServiceCollector(self))

    # -- the service ------------------------------------------------------------------------
    def attach(self, service) -> None:
        """Read `service` from now on: its queues and versions at each scrape, each of its batches."""
        self.detach()
        self.service = service
        for batcher in getattr(service, "batchers", {}).values():
            batcher.observers.append(self.observe_batch)
            self._observed.append(batcher)

    def detach(self) -> None:
        for batcher in self._observed:
            with contextlib.suppress(ValueError):
                batcher.observers.remove(self.observe_batch)
        self._observed = []

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_rows.labels(stats.model).observe(stats.rows)
        self.batch_requests.labels(stats.model).observe(stats.requests)
        self.batch_seconds.labels(stats.model).observe(stats.seconds)

    # -- calls ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self, method: str, context) -> Iterator[CallRecord]:
        """Count, time and log one call; its request id goes back in the trailing metadata."""
        record = CallRecord(method, getattr(context, "face", "grpc"), request_id_of(context))
        send = getattr(context, "set_trailing_metadata", None)
        if send is not None:
            send(((REQUEST_ID_KEY, record.request_id),))
        try:
            yield record
        except BaseException:
            if record.code == "OK":  # raised without an abort: gRPC answers UNKNOWN
                record.code = grpc.StatusCode.UNKNOWN.name
            raise
        finally:
            record.total_ms = (time.perf_counter() - record.started) * 1000
            self.finished(record)

    def finished(self, record: CallRecord) -> None:
        self.requests.labels(record.face, record.method, record.code).inc()
        self.latency.labels(record.face, record.method, record.code).observe(record.total_ms / 1000)
        for stage, ms in record.stages_ms.items():
            self.stages.labels(record.method, record.model, stage).observe(ms / 1000)
        if REQUEST_LOG.isEnabledFor(logging.INFO):
            fields = record.log_fields()
            REQUEST_LOG.info("%s", json.dumps(fields, ensure_ascii=False), extra={"atelier_request": fields})

    def http_request(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)


class _ServiceCollector:
    """The gauges and info read from the attached service at each scrape."""

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry

    def describe(self):
        return []  # names are known only once a service is attached

    def collect(self):
        service = self.telemetry.service
        depth = GaugeMetricFamily("atelier_queue_depth", "Requests admitted per model, running or waiting", labels=["model"])
        rows = GaugeMetricFamily("atelier_queue_rows", "Rows of the requests admitted per model", labels=["model"])
        per_row = GaugeMetricFamily("atelier_batch_seconds_per_row",
                                    "Moving average of batch duration per row, per model (admission's estimate)",
                                    labels=["model"])
        wait = GaugeMetricFamily("atelier_expected_wait_seconds", "Wait a request arriving now can expect, per model",
                                 labels=["model"])
        models = InfoMetricFamily("atelier_model", "Served models", labels=["model"])
        index = InfoMetricFamily("atelier_index", "The index version served now")
        if service is not None:
            admission = service.admission
            for name, model in service.models.items():
                depth.add_metric([name], admission.admitted(name))
                rows.add_metric([name], admission.rows(name))
                seconds = service.batchers[name].seconds_per_row
                if seconds is not None:
                    per_row.add_metric([name], seconds)
                    wait.add_metric([name], admission.expected_wait(name) or 0.0)
                models.add_metric([name], {"family": model.generator.family, "version": model.version})
            served = service.index
            index.add_metric([], {"version": served.version, "index_type": str(served.manifest.get("index_type", "")),
                                  "products": str(len(served)), "embedder": str(served.embedder.get("name", ""))})
        yield from (depth, rows, per_row, wait, models, index)


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: time, level, logger, and the message; a request record's
    fields instead of its message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name,
        }
        fields = getattr(record, "atelier_request", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    """`atelier serve --log-format`: the request log on (INFO on `atelier.requests`, whatever the
    level of the rest); `json`: every line written to the root handlers a JSON object."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: allowed {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=TEXT_FORMAT)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:  # basicConfig's own; a test runner's handlers are left alone
            handler.setFormatter(formatter)
    REQUEST_LOG.setLevel(logging.INFO)
