"""A small client for the Atelier service (what `atelier query` and the demo use)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier.server.security import open_channel
from atelier.server.wire import pb, pb_grpc


def values(given: Mapping[str, str | Sequence[str]] | None) -> dict[str, pb.AttributeValues]:
    """group -> value or values, as the proto's map<string, AttributeValues>."""
    return {k: pb.AttributeValues(values=[v] if isinstance(v, str) else list(v)) for k, v in (given or {}).items()}


class AtelierClient:
    def __init__(
        self,
        target: str,
        timeout: float = 60.0,
        *,
        tls: bool = False,
        root_ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        server_name: str | None = None,
        token: str | None = None,
    ):
        """`target`: one HOST:PORT, a comma-separated list IP:PORT,IP:PORT, or dns:///NAME:PORT; calls
        go round robin over every address it names, and a call that gets UNAVAILABLE (a server gone
        or still loading) is retried, on another where there is one (security.channel_target,
        channel_options). Plaintext by default; TLS with `tls` or any certificate file, mutual TLS
        with `client_cert` + `client_key`; `token` is sent as `authorization: Bearer <token>`
        (see atelier.server.security.open_channel)."""
        self.channel = open_channel(target, tls=tls, root_ca=root_ca, client_cert=client_cert, client_key=client_key,
                                    server_name=server_name, token=token)
        self.stub = pb_grpc.AtelierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> AtelierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def generate_and_retrieve(
        self,
        attributes: Mapping[str, str | Sequence[str]],
        model: str = "",
        num_samples: int = 0,
        top_k: int = 0,
        seed: int | None = None,
        return_images: bool = False,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        return_thumbnails: bool = False,
    ) -> pb.GenerateAndRetrieveResponse:
        """`filters`: group -> value(s) every returned product must have (see GetSchema's filter_groups);
        `return_thumbnails`: each product's thumbnail in `Product.thumbnail` (the index must have them)."""
        request = pb.GenerateAndRetrieveRequest(
            attributes=values(attributes), filters=values(filters),
            model=model, num_samples=num_samples, top_k=top_k, return_images=return_images,
            return_thumbnails=return_thumbnails,
        )
        if seed is not None:
            request.seed = seed
        return self.stub.GenerateAndRetrieve(request, timeout=self.timeout)

    def retrieve_similar(
        self,
        product_id: str = "",
        image: bytes = b"",
        changes: Mapping[str, str | Sequence[str]] | None = None,
        attributes: Mapping[str, str | Sequence[str]] | None = None,
        model: str = "",
        top_k: int = 0,
        return_images: bool = False,
        return_thumbnails: bool = False,
        filters: Mapping[str, str | Sequence[str]] | None = None,
    ) -> pb.GenerateAndRetrieveResponse:
        """Products like a product (`product_id`) or an image (`image`, encoded bytes), after
        `changes` to its attributes when given (see RetrieveSimilar in the proto)."""
        request = pb.RetrieveSimilarRequest(
            changes=values(changes), attributes=values(attributes), filters=values(filters), model=model,
            top_k=top_k, return_images=return_images, return_thumbnails=return_thumbnails,
        )
        if product_id:
            request.product_id = product_id
        if image:
            request.image = image
        return self.stub.RetrieveSimilar(request, timeout=self.timeout)

    def get_schema(self) -> pb.GetSchemaResponse:
        return self.stub.GetSchema(pb.GetSchemaRequest(), timeout=self.timeout)

    def reload_index(self) -> pb.ReloadIndexResponse:
        """Ask the server to serve the index version now published at its index path."""
        return self.stub.ReloadIndex(pb.ReloadIndexRequest(), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
