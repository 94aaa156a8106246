"""GenerateAndRetrieve, in process: attributes -> generated images -> vectors -> products.

    validate  the model name, the attributes against that model's schema, the bounds
    generate  `num_samples` images with the requested model, z drawn from the request seed
    embed     them with the index's own embedder (same name, input size and weights hash)
    search    each sample's top_k nearest products in FAISS (one batched search)
    merge     the union of those candidates, ranked by their MEAN similarity over all samples

Why the mean: each sample is one plausible drawing of the request. What the samples share is
what was asked (the attributes); what varies between them (pose, shade, a detail) is noise
from z. Averaging similarity over samples rewards products that match the shared part and
damps products that happen to sit next to one sample's idiosyncrasy, while taking candidates
from every sample's own top_k keeps a product close to any one drawing in the running.
Scores are cosines in [-1, 1]; ties break by product id so results are deterministic.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atelier.catalog.schema import AttributeSchema, InvalidAttributes
from atelier.generator import ConditionalGenerator, load_generator
from atelier.generator.base import sample_seeds
from atelier.indexer.embedders import Embedder, build_embedder
from atelier.indexer.index_directory import IndexDirectory


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says what is allowed."""


class IncompatibleArtifacts(RuntimeError):
    """A model and an index (or an index and its embedder) cannot be combined."""


@dataclass(frozen=True)
class Limits:
    max_num_samples: int = 32
    max_top_k: int = 100
    max_candidates: int = 1024  # num_samples * top_k: bounds the merge work per request
    default_num_samples: int = 4
    default_top_k: int = 10


@dataclass
class RetrievalRequest:
    attributes: Mapping[str, Any]
    model: str = ""  # "" = the service's default model
    num_samples: int = 0  # 0 = Limits.default_num_samples
    top_k: int = 0  # 0 = Limits.default_top_k
    seed: int | None = None  # None = a fresh random seed, returned in the result
    return_images: bool = False


@dataclass
class Product:
    id: str
    score: float
    attributes: dict[str, Any]


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


@dataclass
class LoadedModel:
    name: str
    generator: ConditionalGenerator
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return f"{self.generator.family}:{self.manifest['weights_sha256'][:12]}"


@dataclass
class RetrievalService:
    index: IndexDirectory
    embedder: Embedder
    models: dict[str, LoadedModel]
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def open(cls, index_path: Path, model_paths: Mapping[str, Path], limits: Limits | None = None) -> "RetrievalService":
        """Load the index, its embedder and the models, refusing any combination that disagrees."""
        if not model_paths:
            raise ValueError("at least one model is needed (name -> checkpoint folder)")
        index = IndexDirectory.open(index_path)
        spec = index.embedder
        embedder = build_embedder(spec["name"], int(spec["input_size"]))
        if embedder.weights_sha256 != spec["weights_sha256"]:
            raise IncompatibleArtifacts(
                f"index {index.path} was built with {spec['name']} weights {spec['weights_sha256'][:12]}, "
                f"but the weights here hash to {embedder.weights_sha256[:12]}: reindex, or install the same weights"
            )
        models = {}
        for name, path in model_paths.items():
            generator, manifest = load_generator(path)
            difference = generator.schema.fits_within(index.schema)
            if difference:
                raise IncompatibleArtifacts(f"model {name!r} ({path}) does not fit index {index.path}: {difference}")
            models[name] = LoadedModel(name, generator, manifest)
        return cls(index, embedder, models, limits or Limits())

    @property
    def schema(self) -> AttributeSchema:
        """What can be asked: the default model's schema (models fit within the index's)."""
        return self.models[self.default_model].generator.schema

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    # -- the call -----------------------------------------------------------------------------
    def validate(self, request: RetrievalRequest) -> tuple[LoadedModel, dict[str, tuple[str, ...]], int, int]:
        name = request.model or self.default_model
        if name not in self.models:
            raise InvalidRequest(f"unknown model {name!r}; available: {', '.join(self.models)}")
        lim = self.limits
        n = request.num_samples or lim.default_num_samples
        k = request.top_k or lim.default_top_k
        if not 1 <= n <= lim.max_num_samples:
            raise InvalidRequest(f"num_samples {n} out of range: allowed 1..{lim.max_num_samples} (0 = {lim.default_num_samples})")
        if not 1 <= k <= lim.max_top_k:
            raise InvalidRequest(f"top_k {k} out of range: allowed 1..{lim.max_top_k} (0 = {lim.default_top_k})")
        if n * k > lim.max_candidates:
            raise InvalidRequest(f"num_samples x top_k = {n * k} exceeds the limit {lim.max_candidates}")
        model = self.models[name]
        schema = model.generator.schema
        if not request.attributes:
            raise InvalidRequest("no attributes given; " + describe_allowed(schema))
        try:
            attributes = schema.normalise(request.attributes, require_all=not model.generator.accepts_partial)
        except InvalidAttributes as error:
            raise InvalidRequest(str(error)) from None
        return model, attributes, n, k

    def generate_and_retrieve(self, request: RetrievalRequest) -> RetrievalResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = (now - clock) * 1000
            clock = now

        model, attributes, n, k = self.validate(request)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        lap("validate")
        condition = model.generator.schema.encode(attributes, require_all=False)  # validate() applied the rules
        images = model.generator.sample_conditions(np.repeat(condition[None], n, axis=0), sample_seeds(seed, n))
        lap("generate")
        queries = self.embedder.embed(images)
        lap("embed")
        _, rows = self.index.search(queries, k)
        lap("search")
        products = self.merge(queries, rows, k)
        lap("merge")
        return RetrievalResult(
            products=products, images=list(images) if request.return_images else [], timings_ms=timings,
            model=model.name, model_version=model.version, index_version=self.index.version, seed=seed,
            num_samples=n,
        )

    def merge(self, queries: np.ndarray, rows: np.ndarray, k: int) -> list[Product]:
        ranked, scores = merge_by_mean_similarity(self.index, queries, rows, k)
        chosen = self.index.product_rows(ranked.tolist())
        return [Product(id=row.pop("id"), score=float(s), attributes=row) for row, s in zip(chosen, scores)]

    # -- description (GetSchema) -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "schema": self.schema.to_dict(),
            "default_model": self.default_model,
            "models": [
                {"name": m.name, "family": m.generator.family, "version": m.version,
                 "image_size": m.generator.image_size, "channels": m.generator.channels}
                for m in self.models.values()
            ],
            "index": {
                "version": self.index.version, "count": len(self.index), "dimension": self.index.manifest["dimension"],
                "metric": self.index.manifest["metric"], "index_type": self.index.manifest["index_type"],
                "embedder": self.index.embedder, "catalogue": self.index.manifest["catalogue"],
            },
            "limits": self.limits.__dict__,
        }


def merge_by_mean_similarity(index: IndexDirectory, queries: np.ndarray, rows: np.ndarray, k: int):
    """Union of per-sample candidates `rows`, ranked by mean similarity over all `queries`.

    Returns (index rows, scores) of the best k, ties broken by product id.
    """
    candidates = np.unique(rows[rows >= 0])
    mean_similarity = (index.vectors(candidates) @ queries.T).mean(axis=1)
    ids = index.products.column("id").take(candidates).to_pylist()
    order = sorted(range(len(candidates)), key=lambda i: (-mean_similarity[i], ids[i]))[:k]
    return candidates[order], mean_similarity[order]


def describe_allowed(schema: AttributeSchema) -> str:
    return "attributes: " + "; ".join(f"{g.name}: {', '.join(g.values)}" for g in schema.groups)
