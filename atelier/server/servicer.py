"""The gRPC face of RetrievalService: proto in, domain call, proto out. No logic of its own."""

from __future__ import annotations

import logging
import time

import grpc

from atelier.catalog.images import encode_png
from atelier.retrieval.service import InvalidRequest, RetrievalRequest, RetrievalService
from atelier.server.wire import pb, pb_grpc

log = logging.getLogger("atelier.server")


def _values(value) -> "pb.AttributeValues":
    if value is None:
        return pb.AttributeValues(values=[])
    return pb.AttributeValues(values=[value] if isinstance(value, str) else list(value))


class AtelierServicer(pb_grpc.AtelierServicer):
    def __init__(self, service: RetrievalService):
        self.service = service

    def GenerateAndRetrieve(self, request, context):
        domain_request = RetrievalRequest(
            attributes={name: list(v.values) if len(v.values) != 1 else v.values[0] for name, v in request.attributes.items()},
            model=request.model,
            num_samples=request.num_samples,
            top_k=request.top_k,
            seed=request.seed if request.HasField("seed") else None,
            return_images=request.return_images,
        )
        try:
            result = self.service.generate_and_retrieve(domain_request)
        except InvalidRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception:  # a bug, not the caller's fault: log it, keep serving
            log.exception("GenerateAndRetrieve failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        start = time.perf_counter()
        images = [
            pb.GeneratedImage(png=encode_png(im), width=im.shape[1], height=im.shape[0]) for im in result.images
        ]
        timings = {**result.timings_ms, "encode": (time.perf_counter() - start) * 1000}
        return pb.GenerateAndRetrieveResponse(
            products=[
                pb.Product(id=p.id, score=p.score, attributes={k: _values(v) for k, v in p.attributes.items()})
                for p in result.products
            ],
            images=images,
            timings=[pb.StageTiming(stage=s, milliseconds=ms) for s, ms in timings.items()],
            model=result.model, model_version=result.model_version, index_version=result.index_version,
            seed=result.seed, num_samples=result.num_samples,
        )

    def GetSchema(self, request, context):
        info = self.service.describe()
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
                catalogue_fingerprint=index["catalogue"]["fingerprint"],
            ),
            limits=pb.Limits(**info["limits"]),
        )
