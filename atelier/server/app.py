"""Build and run the gRPC server: the Atelier service, grpc health, server reflection.

Life of a server: it binds its port and answers health checks (NOT_SERVING) before the models
and index load; it reports SERVING once they have; on shutdown it reports NOT_SERVING first,
then lets in-flight calls finish. With `watch_index` it swaps to a newly published index
(RetrievalService.reload_index) without a restart; ReloadIndex does the same on request. With
`http_address` the same servicer also answers HTTP/JSON and serves the web page (server/http.py),
from the same process, under the same limits and security; it stops with the gRPC server.
Each server has its own `Telemetry` (server/telemetry.py: Prometheus metrics in a registry of
its own, request ids, the request log), served at /metrics on the HTTP face and, with
`metrics_address`, on a port of their own.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from atelier.retrieval.batching import BatchPolicy
from atelier.retrieval.service import IndexRefused, Limits, RetrievalService
from atelier.server.http import HttpFace, split_address
from atelier.server.security import SecurityConfig
from atelier.server.servicer import AtelierServicer, add_atelier_servicer
from atelier.server.telemetry import Telemetry
from atelier.server.wire import pb

log = logging.getLogger("atelier.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Atelier"].full_name  # "atelier.v1.Atelier"
SPARE_WORKERS = 4  # threads beyond the admission bounds, so health and GetSchema always get one


def workers_needed(limits: Limits, n_models: int) -> int:
    """Threads for every request the per-model queues admit, plus spares: with fewer, admitted
    requests would wait unseen in gRPC's own unbounded queue, where no bound or deadline applies."""
    return n_models * limits.max_queue_per_model + SPARE_WORKERS


def start_metrics_server(address: str, telemetry: Telemetry, security=None):
    """`--metrics HOST:PORT`: the metrics alone on a port of their own (TLS as the gRPC port's,
    client certificates too). Returns (server, port); stop with server.shutdown()."""
    host, port, _ = split_address(address)
    tls = {}
    if security is not None and security.tls:
        tls = {"certfile": str(security.tls_cert), "keyfile": str(security.tls_key)}
        if security.mutual_tls:
            tls.update(client_cafile=str(security.client_ca), client_auth_required=True)
    try:
        server, _ = start_http_server(port, addr=host, registry=telemetry.registry, **tls)
    except OSError as error:
        raise OSError(f"cannot listen for metrics on {address}: {error.strerror or error}") from error
    return server, server.server_port


class IndexWatcher:
    """Polls the served index path every `interval` seconds and swaps to a new version.

    A version that fails its checks is logged once (by reload_index) and not retried; the next
    version published is tried as usual.
    """

    def __init__(self, service: RetrievalService, interval: float):
        if interval <= 0:
            raise ValueError(f"index watch interval must be positive, got {interval}")
        self.service, self.interval = service, interval
        self.refused: dict[str, str] = {}  # version -> why
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-watcher", daemon=True)

    def start(self) -> IndexWatcher:
        self._thread.start()
        return self

    def poll(self) -> None:
        try:
            published = self.service.published_version()
        except Exception as error:  # e.g. the link is missing for a moment: keep serving, look again
            log.warning("index watcher: cannot resolve %s: %s", self.service.index_source, error)
            return
        if published == self.service.index.version or published in self.refused:
            return
        try:
            self.service.reload_index()
        except IndexRefused as error:
            self.refused[error.version or published] = str(error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("index watcher: poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: AtelierServicer
    watch_index: float | None = None  # seconds between looks at the index path; None: no watcher
    http: HttpFace | None = None  # the HTTP/JSON face and web page, when started with http_address
    metrics_server: Any = None  # the metrics' own HTTP server, when started with metrics_address
    metrics_port: int | None = None
    watcher: IndexWatcher | None = field(default=None, init=False)

    @property
    def telemetry(self) -> Telemetry:
        return self.servicer.telemetry

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service(self) -> RetrievalService | None:
        return self.servicer.service

    def attach(self, service: RetrievalService) -> None:
        """Serve `service` from now on: calls stop getting UNAVAILABLE, health turns SERVING."""
        self.telemetry.attach(service)
        self.servicer.service = service
        if self.watch_index is not None:
            self.watcher = IndexWatcher(service, self.watch_index).start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)  # ignored once shutting down

    def load(self, open_service: Callable[[], RetrievalService]) -> RetrievalService:
        """Run the (slow) loader while the port already answers health with NOT_SERVING."""
        service = open_service()
        self.attach(service)
        return service

    def begin_shutdown(self) -> None:
        """Report NOT_SERVING (for good) while still accepting calls, so balancers move away."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = 5.0, drain: float = 0.0) -> None:
        """Report NOT_SERVING, keep serving `drain` seconds, then refuse new calls and let
        in-flight ones finish for up to `grace` seconds, and stop."""
        self.begin_shutdown()
        if self.watcher is not None:
            self.watcher.stop()
        if drain > 0:
            time.sleep(drain)
        stopped = self.server.stop(grace)
        if self.http is not None:
            self.http.stop(grace)  # its in-flight calls finish alongside the gRPC ones
        stopped.wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.telemetry.detach()


def start_server(service: RetrievalService | None, address: str = "127.0.0.1:0", max_workers: int = 8,
                 security: SecurityConfig | None = None, *, limits: Limits | None = None,
                 watch_index: float | None = None, http_address: str | None = None,
                 metrics_address: str | None = None, max_connection_age: float | None = None) -> RunningServer:
    """Start serving `service` on `address` (port 0 = a free port); returns once listening.

    `service` None: listen now, health NOT_SERVING and calls UNAVAILABLE until `RunningServer.load`
    or `attach` gives it one (`limits` then sets the message sizes; else the service's do).
    `security`: TLS / mutual TLS and bearer tokens (None: plaintext, no checks).
    `watch_index`: poll the index path this often (seconds) and swap to a new published version.
    `http_address`: also serve HTTP/JSON and the web page there (HOST:PORT; port 0 = a free port).
    `metrics_address`: also serve the Prometheus metrics alone there (HOST:PORT; port 0 = a free port).
    `max_connection_age`: close each client connection (GOAWAY) after this many seconds, so clients
    balancing over a DNS name resolve it again and find replicas added since they connected.
    """
    limits = service.limits if service is not None else (limits or Limits())
    if service is not None:
        max_workers = max(max_workers, workers_needed(limits, len(service.models)))
    # The token check goes first among the interceptors: a refused call costs nothing else.
    interceptors = security.interceptors() if security else []
    options = [("grpc.max_receive_message_length", limits.max_request_bytes),
               ("grpc.max_send_message_length", limits.max_response_bytes)]
    if max_connection_age is not None:
        if max_connection_age <= 0:
            raise ValueError(f"max_connection_age must be a positive number of seconds, not {max_connection_age}")
        # calls in flight when the age is reached get this long to finish on the old connection
        options += [("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", 30_000)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=options)
    servicer = AtelierServicer(None, Telemetry())
    add_atelier_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = security.add_port(server, address) if security else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    http, metrics = None, (None, None)
    try:
        if http_address is not None:
            http = HttpFace(servicer, http_address, limits, security).start()
        if metrics_address is not None:
            metrics = start_metrics_server(metrics_address, servicer.telemetry, security)
    except BaseException:
        server.stop(0)
        if http is not None:
            http.stop(0)
        raise
    running = RunningServer(server, port, health_servicer, servicer, watch_index, http, *metrics)
    if service is not None:
        running.attach(service)
    return running


def serve(index: Path, models: Mapping[str, Path], address: str, max_workers: int = 8, limits: Limits | None = None,
          security: SecurityConfig | None = None, *, watch_index: float | None = None, grace: float = 5.0,
          drain: float = 0.0, batching: BatchPolicy | None = None,
          sampling: Mapping[str, Mapping[str, Any]] | None = None, http_address: str | None = None,
          metrics_address: str | None = None, max_connection_age: float | None = None) -> None:
    """`atelier serve`: listen (NOT_SERVING), load, serve until SIGINT/SIGTERM, shut down gracefully.
    `sampling`: per model name, sampling options to serve it with (RetrievalService.open).
    `http_address`: also serve HTTP/JSON and the web page there; `metrics_address`: the metrics alone."""
    limits = limits or Limits()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running = start_server(None, address, max(max_workers, workers_needed(limits, len(models))), security=security,
                           limits=limits, watch_index=watch_index, http_address=http_address,
                           metrics_address=metrics_address, max_connection_age=max_connection_age)
    log.info("security: %s", security.describe() if security else "plaintext, no tokens")
    log.info("port %d bound (health NOT_SERVING); loading models and index", running.port)
    try:
        service = running.load(lambda: RetrievalService.open(index, models, limits, batching, sampling))
    except BaseException:
        running.stop(grace=0)
        raise
    log.info("serving %s (models: %s; index %s, %d products) on port %d%s",
             SERVICE_NAME, ", ".join(service.models), service.index.version, len(service.index), running.port,
             f"; watching the index every {watch_index:g} s" if watch_index else "")
    print(f"atelier: listening on {address.rsplit(':', 1)[0]}:{running.port}", flush=True)
    if running.http is not None:
        print(f"atelier: web page and HTTP/JSON on {running.http.url}", flush=True)
    if running.metrics_port is not None:
        print(f"atelier: metrics on {metrics_address.rsplit(':', 1)[0]}:{running.metrics_port}/metrics", flush=True)
    stop.wait()
    log.info("shutting down: NOT_SERVING, %g s drain, up to %g s for in-flight calls", drain, grace)
    running.stop(grace, drain)
