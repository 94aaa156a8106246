"""The gRPC face of RetrievalService: proto in, domain call, proto out. No logic of its own.

Every outcome has its status code, so a client can tell its own mistake from the server's:
    INVALID_ARGUMENT     the request breaks a rule or a limit (the message names it), or is not
                         a parseable message at all
    NOT_FOUND            RetrieveSimilar: no product of that id in the served index
    RESOURCE_EXHAUSTED   the model's queue is full (the message names the bound); retry later
    DEADLINE_EXCEEDED    the caller's deadline passed; the stages after it were not run
    UNAVAILABLE          still loading the models and index (health: NOT_SERVING)
    FAILED_PRECONDITION  ReloadIndex: the newly published index was refused (the message says why)
    INTERNAL             a bug: logged with its traceback, and the server goes on serving

Every call of a method is counted, timed and logged by the server's `Telemetry` (telemetry.py:
Prometheus metrics, the `atelier.requests` JSON line), under the request id the caller sent
(`x-request-id` metadata) or a fresh one, which goes back in the trailing metadata.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from atelier.catalog.images import encode_png
from atelier.retrieval.service import (
    DeadlineExceeded,
    IndexRefused,
    InvalidRequest,
    Overloaded,
    RetrievalRequest,
    RetrievalService,
)
from atelier.retrieval.similar import ProductNotFound, SimilarRequest, retrieve_similar
from atelier.retrieval.stages import ENCODE
from atelier.server.telemetry import CallRecord, Telemetry
from atelier.server.wire import pb, pb_grpc

log = logging.getLogger("atelier.server")
NO_DEADLINE = 1e8  # seconds; gRPC reports "no deadline" as a deadline years away


def _values(value) -> pb.AttributeValues:
    if value is None:
        return pb.AttributeValues(values=[])
    return pb.AttributeValues(values=[value] if isinstance(value, str) else list(value))


def _asked(values) -> dict[str, str | list[str]]:
    """A proto map<string, AttributeValues> of asked attributes: one value as itself, several as a list."""
    return {name: list(v.values) if len(v.values) != 1 else v.values[0] for name, v in values.items()}


def _groups(values) -> dict[str, list[str]]:
    """A proto map<string, AttributeValues> as group -> list of values."""
    return {name: list(v.values) for name, v in values.items()}


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE else remaining


@dataclass(frozen=True)
class Malformed:
    """What a request that is not a parseable message becomes, so it is refused as the
    caller's error (INVALID_ARGUMENT) rather than by gRPC as INTERNAL."""

    reason: str


def lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as error:  # DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(f"the request is not a valid {message_class.DESCRIPTOR.full_name}: {error}")
    return parse


class AtelierServicer(pb_grpc.AtelierServicer):
    def __init__(self, service: RetrievalService | None = None, telemetry: Telemetry | None = None):
        self.service = service  # None while the server loads: calls get UNAVAILABLE
        self.telemetry = telemetry or Telemetry()  # the server's metrics and request log

    def _ready(self, request, context, call: CallRecord) -> RetrievalService:
        if isinstance(request, Malformed):
            call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        service = self.service
        if service is None:
            call.abort(context, grpc.StatusCode.UNAVAILABLE,
                       "the server is loading its models and index (health: NOT_SERVING); retry shortly")
        return service

    def GenerateAndRetrieve(self, request, context):
        with self.telemetry.call("GenerateAndRetrieve", context) as call:
            service = self._ready(request, context, call)
            domain_request = RetrievalRequest(
                attributes=_asked(request.attributes),
                model=request.model,
                num_samples=request.num_samples,
                top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else None,
                return_images=request.return_images,
                filters=_groups(request.filters),
                return_thumbnails=request.return_thumbnails,
            )
            call.ask(request.model, attributes=_groups(request.attributes), filters=domain_request.filters,
                     num_samples=request.num_samples, top_k=request.top_k, seed=domain_request.seed)
            return self._answer(call, context, lambda: service.generate_and_retrieve(
                domain_request, time_remaining=time_remaining(context)))

    def RetrieveSimilar(self, request, context):
        with self.telemetry.call("RetrieveSimilar", context) as call:
            service = self._ready(request, context, call)
            domain_request = SimilarRequest(
                product_id=request.product_id, image=request.image,
                changes=_asked(request.changes),
                attributes=_asked(request.attributes),
                model=request.model, top_k=request.top_k, return_images=request.return_images,
                return_thumbnails=request.return_thumbnails, filters=_groups(request.filters),
            )
            call.ask(request.model, product_id=request.product_id, image_bytes=len(request.image) or None,
                     changes=_groups(request.changes), attributes=_groups(request.attributes),
                     filters=domain_request.filters, top_k=request.top_k)
            return self._answer(call, context, lambda: retrieve_similar(
                service, domain_request, time_remaining=time_remaining(context)))

    def _answer(self, call: CallRecord, context, run) -> pb.GenerateAndRetrieveResponse:
        """Run `run` (-> RetrievalResult) with each outcome's status code, then encode the response."""
        try:
            result = run()
        except ProductNotFound as error:
            call.abort(context, grpc.StatusCode.NOT_FOUND, str(error))
        except InvalidRequest as error:
            call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Overloaded as error:
            call.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except DeadlineExceeded as error:
            call.abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        except Exception:  # a bug, not the caller's fault: log it, keep serving
            log.exception("%s failed (request %s)", call.method, call.request_id)
            call.abort(context, grpc.StatusCode.INTERNAL, "internal error; see the server log")
        if time_remaining(context) == 0:
            call.abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"the request's deadline passed before stage {ENCODE!r}")
        start = time.perf_counter()
        images = [
            pb.GeneratedImage(png=encode_png(im), width=im.shape[1], height=im.shape[0]) for im in result.images
        ]
        timings = {**result.timings_ms, ENCODE: (time.perf_counter() - start) * 1000}
        call.answered(result.model, timings, products=len(result.products), index_version=result.index_version)
        return pb.GenerateAndRetrieveResponse(
            products=[
                pb.Product(id=p.id, score=p.score, attributes={k: _values(v) for k, v in p.attributes.items()},
                           thumbnail=p.thumbnail or b"", image_uri=p.image_uri or "")
                for p in result.products
            ],
            images=images,
            timings=[pb.StageTiming(stage=s, milliseconds=ms) for s, ms in timings.items()],
            model=result.model, model_version=result.model_version, index_version=result.index_version,
            seed=result.seed, num_samples=result.num_samples,
        )

    def GetSchema(self, request, context):
        with self.telemetry.call("GetSchema", context) as call:
            return self._schema(self._ready(request, context, call).describe())

    @staticmethod
    def _schema(info) -> pb.GetSchemaResponse:
        index = info["index"]
        return pb.GetSchemaResponse(
            groups=[pb.AttributeGroup(name=g["name"], values=g["values"], multi_label=g["multi_label"])
                    for g in info["schema"]["groups"]],
            models=[pb.ModelInfo(**m) for m in info["models"]],
            default_model=info["default_model"],
            index=pb.IndexInfo(
                version=index["version"], count=index["count"], dimension=index["dimension"], metric=index["metric"],
                index_type=index["index_type"], embedder=index["embedder"]["name"],
                embedder_input_size=index["embedder"]["input_size"], catalogue=index["catalogue"]["name"],
                catalogue_fingerprint=index["catalogue"]["fingerprint"], thumbnail_size=index["thumbnail_size"],
            ),
            limits=pb.Limits(**info["limits"]),
            filter_groups=[pb.AttributeGroup(name=g["name"], values=g["values"], multi_label=g["multi_label"])
                           for g in info["filter_groups"]],
        )

    def ReloadIndex(self, request, context):
        with self.telemetry.call("ReloadIndex", context) as call:
            service = self._ready(request, context, call)
            previous = service.index.version
            try:
                version, swapped = service.reload_index()
            except IndexRefused as error:
                call.abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
            except Exception:
                log.exception("ReloadIndex failed (request %s)", call.request_id)
                call.abort(context, grpc.StatusCode.INTERNAL, "internal error; see the server log")
            call.answer = {"index_version": version, "previous_version": previous, "swapped": swapped}
            return pb.ReloadIndexResponse(index_version=version, previous_version=previous, swapped=swapped)


def add_atelier_servicer(servicer: AtelierServicer, server: grpc.Server) -> None:
    """Like the generated add_AtelierServicer_to_server, but with request parsers that never
    raise: gRPC answers a parser's exception with INTERNAL, which would blame the server for
    the caller's bytes."""
    methods = pb.DESCRIPTOR.services_by_name["Atelier"].methods
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in methods
    }
    service_name = pb.DESCRIPTOR.services_by_name["Atelier"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: the faster lookup path
        server.add_registered_method_handlers(service_name, handlers)
