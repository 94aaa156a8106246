"""Build and run the gRPC server: the Atelier service, grpc health, server reflection."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atelier.retrieval.service import Limits, RetrievalService
from atelier.server.servicer import AtelierServicer
from atelier.server.wire import pb, pb_grpc

log = logging.getLogger("atelier.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Atelier"].full_name  # "atelier.v1.Atelier"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish for up to `grace` seconds, stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(service: RetrievalService, address: str = "127.0.0.1:0", max_workers: int = 8) -> RunningServer:
    """Start serving `service` on `address` (port 0 = a free port); returns once listening."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"))
    pb_grpc.add_AtelierServicer_to_server(AtelierServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer)


def serve(index: Path, models: Mapping[str, Path], address: str, max_workers: int = 8, limits: Limits | None = None) -> None:
    """`atelier serve`: load, listen, and run until SIGINT/SIGTERM, then shut down gracefully."""
    service = RetrievalService.open(index, models, limits)
    running = start_server(service, address, max_workers)
    log.info("serving %s (models: %s; index %s, %d products) on port %d",
             SERVICE_NAME, ", ".join(service.models), service.index.version, len(service.index), running.port)
    print(f"atelier: listening on {address.rsplit(':', 1)[0]}:{running.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()
