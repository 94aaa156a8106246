"""The generated protobuf / gRPC modules, generated first if missing or stale."""

from atelier.server import protogen

if protogen.is_stale():
    protogen.generate()

from atelier.v1 import atelier_pb2 as pb  # noqa: E402
from atelier.v1 import atelier_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
