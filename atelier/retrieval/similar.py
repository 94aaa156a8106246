"""RetrieveSimilar, in process: "like this one", or "like this one, but in red".

The item is an indexed product (by id) or an image (encoded bytes). Without changes the item
itself is the query: a product's stored vector, or the image embedded by the index's own
embedder. With changes the item is edited first: a model that can edit (the flow runs its ODE
backwards to the image's noise, the CVAE encodes it) redraws it under its attributes with the
changes applied, and that drawing is the query. What the item shows is a product's metadata,
or for an image the `attributes` the request gives (a model that takes partial attributes
may do without: the missing groups are inverted as "any").

Same bounds, validation, admission, deadlines and batching as GenerateAndRetrieve: an edit is
one row in its model's batch (RetrievalService's batchers), edited in fixed-shape chunks, so it
gets what it gets alone. A product asked by id is never among its own results.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atelier.catalog.images import ImageDecodeError, decode_image
from atelier.catalog.schema import InvalidAttributes
from atelier.generator.base import fit_images
from atelier.retrieval.batching import BatchRequest, Expired
from atelier.retrieval.service import (
    Deadline,
    InvalidRequest,
    LoadedModel,
    RetrievalResult,
    RetrievalService,
    ServedIndex,
    merge,
    milliseconds_since,
    normalise_filters,
)
from atelier.retrieval.stages import GENERATE, MERGE, SEARCH, VALIDATE


class ProductNotFound(InvalidRequest):
    """The request names a product id the served index does not hold (gRPC NOT_FOUND)."""


@dataclass
class SimilarRequest:
    product_id: str = ""  # an indexed product, or
    image: bytes = b""  # an encoded image (PNG, JPEG, ...): exactly one of the two
    changes: Mapping[str, Any] = field(default_factory=dict)  # attributes to change; none: the item is the query
    attributes: Mapping[str, Any] = field(default_factory=dict)  # what `image` shows (edits of an image only)
    model: str = ""  # the model that edits: "" = the first served model that can
    top_k: int = 0  # 0 = Limits.default_top_k
    return_images: bool = False  # the edited drawing, as GenerateAndRetrieve returns its drawings
    return_thumbnails: bool = False
    filters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidSimilar:
    row: int | None  # the product's index row; None for an image
    image: np.ndarray | None  # the item's pixels where they are needed (an edit, or an image query)
    model: LoadedModel | None  # the editing model (None: a product's own vector is the query)
    source: np.ndarray | None  # condition vectors: what the item shows, and what is asked
    target: np.ndarray | None
    top_k: int
    filters: dict[str, tuple[str, ...]]
    return_images: bool
    return_thumbnails: bool


def retrieve_similar(service: RetrievalService, request: SimilarRequest,
                     time_remaining: float | None = None) -> RetrievalResult:
    """The products most like the item (edited by `changes`); `time_remaining` as in GenerateAndRetrieve."""
    served = service.served  # read once, as GenerateAndRetrieve does
    deadline = Deadline(time_remaining, service.clock)
    started = time.perf_counter()
    deadline.check(VALIDATE)
    valid = validate_similar(service, request, served)
    timings = {VALIDATE: milliseconds_since(started)}
    k = valid.top_k + (valid.row is not None)  # one more: the product itself is dropped
    allowed = served.index.rows_matching(valid.filters) if valid.filters else None
    images: list[np.ndarray] = []
    if valid.model is None:  # a product as it is: its stored vector, no model
        deadline.check(SEARCH)
        started = time.perf_counter()
        vectors = served.index.vectors(np.array([valid.row]))
        candidates = served.index.search(vectors, k, allowed)[1]
        timings[SEARCH] = milliseconds_since(started)
    else:
        with service.admission.slot(valid.model.name, 1, deadline.remaining()):  # one row: the edit or the image
            deadline.check(GENERATE)
            drawn = draw_similar(service, valid, served, deadline, k, allowed)
        timings.update(drawn.timings_ms)
        vectors, candidates = drawn.vectors, drawn.candidates
        images = list(drawn.images) if valid.return_images and valid.target is not None else []
    if valid.row is not None:
        candidates = np.where(candidates == valid.row, -1, candidates)
    deadline.check(MERGE)
    started = time.perf_counter()
    products = merge(served.index, vectors, candidates, valid.top_k, valid.return_thumbnails)
    timings[MERGE] = milliseconds_since(started)
    model = valid.model
    return RetrievalResult(products=products, images=images, timings_ms=timings,
                           model=model.name if model else "", model_version=model.version if model else "",
                           index_version=served.version, seed=0, num_samples=int(valid.target is not None))


def draw_similar(service: RetrievalService, valid: ValidSimilar, served: ServedIndex, deadline: Deadline,
                 k: int, allowed: np.ndarray | None):
    """The edit (or the given image) through its model's batch: drawn, embedded, searched."""
    model = valid.model
    image = fit_images(valid.image[None], model.generator.image_size, model.generator.channels)
    edit = valid.target is not None
    rows = BatchRequest(
        conditions=valid.target[None] if edit else np.zeros((1, model.generator.schema.condition_dim), np.float32),
        seeds=[0], embedder=served.embedder, index=served.index, top_k=k, expired=deadline.passed,
        allowed=allowed, filter_key=tuple(sorted(valid.filters.items())),
        edit_from=image if edit else None, edit_sources=valid.source[None] if edit else None,
        given=None if edit else image,
    )
    try:
        return service.batchers[model.name].run(rows, deadline.remaining())
    except Expired as expired:
        deadline.refuse(expired.stage, f"model {model.name!r}'s batch queue")


def validate_similar(service: RetrievalService, request: SimilarRequest, served: ServedIndex) -> ValidSimilar:
    """The request checked against the limits, the index and the editing model's schema."""
    service.check_shape({"model name": request.model, "product id": request.product_id},
                        {"change": request.changes, "attribute": request.attributes, "filter": request.filters})
    if bool(request.product_id) == bool(request.image):
        raise InvalidRequest("give exactly one of product_id (an indexed product) or image (encoded bytes)")
    lim = service.limits
    k = request.top_k or lim.default_top_k
    if not 1 <= k <= lim.max_top_k:
        raise InvalidRequest(f"top_k {k} out of range: allowed 1..{lim.max_top_k} (max_top_k; 0 = {lim.default_top_k})")
    index = served.index
    filters = normalise_filters(index.schema, request.filters)
    if request.return_thumbnails and not index.has_thumbnails:
        raise InvalidRequest(f"return_thumbnails: index version {served.version} has no thumbnails; "
                             "reindex with `atelier index --thumbnail-size PX` (default 64) to serve them")
    row = None
    if request.product_id:
        row = index.row_of(request.product_id)
        if row is None:
            raise ProductNotFound(f"product {request.product_id!r} is not in index version {served.version}")
        if request.attributes:
            raise InvalidRequest("attributes describe a given image; a product's own metadata describes it")
    common = dict(row=row, top_k=k, filters=filters, return_images=request.return_images,
                  return_thumbnails=request.return_thumbnails)
    if not request.changes and row is not None:
        return ValidSimilar(image=None, model=None, source=None, target=None, **common)
    model = editing_model(service, request.model, needs_edit=bool(request.changes))
    image = item_image(index, row, request.image, served.version)
    if not request.changes:
        return ValidSimilar(image=image, model=model, source=None, target=None, **common)
    source, target = source_and_target(model, index.product_rows([row])[0] if row is not None else None,
                                     request.attributes, request.changes)
    return ValidSimilar(image=image, model=model, source=source, target=target, **common)


def editing_model(service: RetrievalService, name: str, needs_edit: bool) -> LoadedModel:
    """The named model (it must be able to edit, when an edit is asked), else the first that can."""
    models = service.models
    able = [m.name for m in models.values() if m.generator.can_edit]
    if name:
        if name not in models:
            raise InvalidRequest(f"unknown model {name!r}; available: {', '.join(models)}")
        if needs_edit and name not in able:
            raise InvalidRequest(f"model {name!r} ({models[name].generator.family}) cannot edit an image; "
                                 f"models here that can: {', '.join(able) or 'none'}")
        return models[name]
    if not needs_edit:
        return models[service.default_model]
    if not able:
        raise InvalidRequest("no model served here can edit an image (the flow and cvae families can); "
                             f"served: {', '.join(f'{m.name} ({m.generator.family})' for m in models.values())}")
    return models[able[0]]


def item_image(index, row: int | None, data: bytes, version: str) -> np.ndarray:
    """The item's pixels: a product's thumbnail from the index, or the given image decoded."""
    if row is not None:
        if not index.has_thumbnails:
            raise InvalidRequest(f"editing a product needs its image, and index version {version} has no "
                                 "thumbnails; reindex with `atelier index --thumbnail-size PX`, or send the image")
        data = index.thumbnails([row])[0]
    try:
        return decode_image(data, 3)
    except ImageDecodeError as error:
        raise InvalidRequest(f"image could not be decoded ({error}); send PNG, JPEG, WebP or BMP bytes") from None


def source_and_target(model: LoadedModel, product: dict[str, Any] | None, attributes: Mapping[str, Any],
                    changes: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) condition vectors: what the item shows, and that with `changes` applied."""
    schema, partial = model.generator.schema, model.generator.accepts_partial
    if product is not None:  # its metadata, where the model knows the group and the value
        shown = {g.name: product[g.name] for g in schema.groups
                 if product.get(g.name) not in (None, []) and _known(g, product[g.name])}
    else:
        shown = dict(attributes)
    try:
        source = schema.normalise(shown, require_all=not partial)
        changed = schema.normalise(changes, require_all=False)
        target = schema.normalise({**source, **changed}, require_all=not partial)
    except InvalidAttributes as error:
        raise InvalidRequest(f"{error} (model {model.name!r})") from None
    return schema.encode(source, require_all=False), schema.encode(target, require_all=False)


def _known(group, value) -> bool:
    values = (value,) if isinstance(value, str) else tuple(value)
    try:
        for v in values:
            group.index_of(v)
    except InvalidAttributes:
        return False
    return True
