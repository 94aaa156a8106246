"""Metadata filters: exact constraints applied inside the search. Checked against brute force
over the matching products: on synthetic vectors for every index kind and both search paths,
and over the real gRPC server on Fashion-MNIST and on the whole Fashion Product Images
catalogue (44,441 products)."""

from __future__ import annotations

import grpc
import numpy as np
import pyarrow as pa
import pytest

from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.indexer import index_directory
from atelier.indexer.index_choice import IndexOptions
from atelier.indexer.index_directory import IndexDirectory
from atelier.retrieval.batching import embed
from atelier.retrieval.service import RetrievalRequest
from atelier.server.client import AtelierClient
from tests.conftest import publish_vectors, random_unit_vectors

WAIT = 60  # seconds: an upper bound on waiting, never a measured duration

COLOURS = ("Red", "Blue", "Green")
TAGS = ("cotton", "wool", "silk")
SCHEMA = AttributeSchema((AttributeGroup("colour", COLOURS), AttributeGroup("tags", TAGS, multi_label=True)))
EMBEDDER = {"name": "synthetic", "input_size": 8, "weights_sha256": "0" * 64}


def synthetic_products(n: int) -> pa.Table:
    """Colours cycle (every 7th missing); tags: row i has tag j when bit j of i is set."""
    colours = [None if i % 7 == 6 else COLOURS[i % 3] for i in range(n)]
    tags = [[t for j, t in enumerate(TAGS) if i >> j & 1] for i in range(n)]
    return pa.table({"id": [f"p{i:05d}" for i in range(n)], "colour": colours,
                     "tags": pa.array(tags, type=pa.list_(pa.string()))})


def brute_force(vectors: np.ndarray, stored: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Each query's k best rows among `allowed`, by exact inner product."""
    similarity = vectors @ stored[allowed].T
    return allowed[np.argsort(-similarity, axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    n, d = 3000, 16
    stored = random_unit_vectors(n, d, seed=1)
    products = synthetic_products(n)
    root = tmp_path_factory.mktemp("filters")
    indexes = {factory: IndexDirectory.open(publish_vectors(root / factory.replace(",", "_"), stored, products,
                                                            EMBEDDER, SCHEMA, {"name": "synthetic", "fingerprint": "0"},
                                                            IndexOptions(factory=factory)))
               for factory in ("Flat", "HNSW32,Flat", "IVF16,Flat", "PCA16,Flat")}
    return stored, products, indexes


def test_rows_matching_takes_any_listed_value_every_group_and_no_missing_value(synthetic):
    _, products, indexes = synthetic
    index = indexes["Flat"]
    colours = products.column("colour").to_pylist()
    tags = products.column("tags").to_pylist()
    expected = [i for i in range(len(colours)) if colours[i] in ("Red", "Green") and ("wool" in tags[i] or "silk" in tags[i])]
    assert index.rows_matching({"colour": ("Red", "Green"), "tags": ("wool", "silk")}).tolist() == expected
    assert index.rows_matching({"colour": ("Blue",)}).tolist() == [i for i, c in enumerate(colours) if c == "Blue"]
    assert len(index.rows_matching({"colour": ("Purple",)})) == 0  # no product has it: no row, no error
    # "" asks for products without a value: a null colour, an empty tag list
    assert index.rows_matching({"colour": ("Blue", "")}).tolist() == [i for i, c in enumerate(colours) if c in ("Blue", None)]
    assert index.rows_matching({"tags": ("",)}).tolist() == [i for i, t in enumerate(tags) if not t]
    assert len(index.rows_matching({})) == len(colours)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat", "PCA16,Flat"])
@pytest.mark.parametrize("path", ["exact", "selector"])
def test_filtered_search_keeps_to_the_rows_and_equals_brute_force(synthetic, factory, path, monkeypatch):
    stored, _, indexes = synthetic
    index = indexes[factory]
    if path == "selector":  # the index's own search with an ID selector, as for large selections
        monkeypatch.setattr(index_directory, "EXACT_FILTER_ROWS", 0)
    queries = random_unit_vectors(12, stored.shape[1], seed=2)
    allowed = index.rows_matching({"colour": ("Red",), "tags": ("cotton",)})
    scores, rows = index.search(queries, 10, allowed)
    assert set(rows.ravel().tolist()) <= set(allowed.tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    if factory == "Flat" or path == "exact":  # exact either way: the brute-force rows, in order
        # PCA's exact path scores the stored (decoded) vectors, so its brute force uses those too
        reference = index.vectors(np.arange(len(index))) if factory.startswith("PCA") else stored
        np.testing.assert_array_equal(rows, brute_force(queries, reference, allowed, 10))
    else:  # approximate kinds with the selector: most of the true neighbours
        truth = brute_force(queries, stored, allowed, 10)
        recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
        assert recall >= 0.5
    # a query gives the same rows alone as among the others
    for q in (0, 7):
        np.testing.assert_array_equal(index.search(queries[q : q + 1], 10, allowed)[1][0], rows[q])


def test_fewer_matches_than_k_pad_with_minus_one_and_none_give_no_rows(synthetic):
    stored, _, indexes = synthetic
    index = indexes["Flat"]
    queries = random_unit_vectors(3, stored.shape[1], seed=3)
    scores, rows = index.search(queries, 5, np.array([11, 40], dtype=np.int64))
    assert (np.sort(rows[:, :2], axis=1) == [11, 40]).all() and (rows[:, 2:] == -1).all()
    assert (index.search(queries, 5, np.array([], dtype=np.int64))[1] == -1).all()


# -- over the real gRPC server, Fashion-MNIST (small index) --------------------------------------


def brute_force_response(service, response, filters: dict, top_k: int) -> list[str]:
    """The products a filtered request must return: its own drawings embedded as the server
    embeds them, each drawing's top_k among the matching products by exact similarity, then
    ranked by mean similarity over the drawings (ties by id), as the merge does."""
    from atelier.catalog.images import decode_image

    index = service.index
    channels = next(iter(service.models.values())).generator.channels
    images = np.stack([decode_image(im.png, channels) for im in response.images])
    vectors = embed(service.embedder, images, service.batching.chunk_rows)
    allowed = index.rows_matching(filters)
    stored = index.vectors(np.arange(len(index)))
    candidates = np.unique(brute_force(vectors, stored, allowed, top_k))
    mean = (stored[candidates] @ vectors.T).mean(axis=1)
    ids = index.products.column("id").take(candidates).to_pylist()
    order = sorted(range(len(candidates)), key=lambda i: (-mean[i], ids[i]))[:top_k]
    return [ids[i] for i in order]


def test_filters_over_grpc_keep_to_the_metadata_and_equal_brute_force(client, service):
    response = client.generate_and_retrieve({"category": "Dress"}, num_samples=3, top_k=8, seed=5,
                                            return_images=True, filters={"category": ["Bag", "sandal"]})
    assert len(response.products) == 8
    assert {p.attributes["category"].values[0] for p in response.products} <= {"Bag", "Sandal"}
    assert [p.id for p in response.products] == brute_force_response(
        service, response, {"category": ("Bag", "Sandal")}, 8)
    unfiltered = client.generate_and_retrieve({"category": "Dress"}, num_samples=3, top_k=8, seed=5)
    assert [p.id for p in unfiltered.products] != [p.id for p in response.products]


def test_a_filter_no_product_matches_is_ok_and_empty_and_an_unknown_group_is_refused(client):
    response = client.generate_and_retrieve({"category": "Dress"}, num_samples=2, top_k=5, seed=1,
                                            filters={"category": "Tuxedo"})
    assert list(response.products) == [] and response.num_samples == 2
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve({"category": "Dress"}, filters={"colour": "Red"})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown filter group 'colour'; filterable groups: category" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve({"category": "Dress"}, filters={"category": []})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter 'category' has no value; give one or more of: T-shirt/top" in error.value.details()


def test_get_schema_lists_the_filterable_groups(client, service):
    schema = client.get_schema()
    assert [(g.name, tuple(g.values)) for g in schema.filter_groups] == [
        (g.name, g.values) for g in service.index.schema.groups]


def test_batched_requests_with_different_filters_each_get_what_they_get_alone(service):
    from tests.test_batching import all_at_once, batched_service, same

    requests = [RetrievalRequest({"category": "Coat"}, num_samples=2, top_k=5, seed=s, return_images=True,
                                 filters=f)
                for s, f in ((1, {"category": "Bag"}), (2, {}), (3, {"category": ["Bag", "Coat"]}),
                             (1, {"category": "Bag"}))]
    alone = [batched_service(service, max_wait_ms=0).generate_and_retrieve(r) for r in requests]
    svc = batched_service(service, max_wait_ms=WAIT * 1000, max_batch_rows=8)
    together = all_at_once(svc.generate_and_retrieve, requests)
    assert svc.batchers["cgan"].batches == 1
    for a, t in zip(alone, together):
        same(a, t)


def test_cli_query_takes_filters(server, capsys):
    from atelier.cli import main

    assert main(["query", "--target", server.target, "--attr", "category=Dress", "--filter", "category=Bag",
                 "--filter", "category=Coat", "--top-k", "6", "--seed", "2", "--json"]) == 0
    import json

    products = json.loads(capsys.readouterr().out)["products"]
    assert len(products) == 6 and {p["attributes"]["category"]["values"][0] for p in products} <= {"Bag", "Coat"}


# -- over the real gRPC server, the whole Fashion Product Images catalogue -----------------------


@pytest.fixture(scope="module")
def full_catalogue_server(tmp_path_factory, fpi_parquet, mobilenet_weights):
    """All 44,441 products at 32 px, indexed with the ImageNet embedder at 32 px (filters do not
    depend on the embedder's quality), and a flow trained two steps on the full schema (a flow
    takes requests that name only some of the seven groups)."""
    from atelier.catalog.fashion_product_images import import_fashion_product_images
    from atelier.generator.train import TrainConfig, train
    from atelier.indexer.runner import reindex
    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server

    root = tmp_path_factory.mktemp("fpi-full")
    import_fashion_product_images(fpi_parquet, root / "catalogue", "full", size=32, progress=False)
    reindex(root / "catalogue", root / "index", input_size=32, batch_size=128, progress=False)
    train(TrainConfig(catalogue=root / "catalogue", out=root / "model", model="flow", epochs=1, batch_size=16,
                      max_steps=2, progress=False, model_overrides={"width": 8, "sample_steps": 2}))
    service = RetrievalService.open(root / "index", {"flow": root / "model"})
    server = start_server(service, "127.0.0.1:0")
    yield service, server
    server.stop(grace=1)


def test_filters_on_the_whole_catalogue_over_grpc(full_catalogue_server):
    service, server = full_catalogue_server
    assert len(service.index) == 44_441
    ask = {"articleType": "Tshirts", "baseColour": "Blue"}
    with AtelierClient(server.target, timeout=WAIT) as client:
        schema = client.get_schema()
        assert [g.name for g in schema.filter_groups] == ["gender", "masterCategory", "subCategory", "articleType",
                                                           "baseColour", "season", "usage"]
        # a small selection (scored exactly) and a large one (the index's own search, selector)
        for filters in ({"gender": "Women", "articleType": "Handbags"}, {"gender": ["Men", "Boys"]}):
            allowed = service.index.rows_matching({k: (v,) if isinstance(v, str) else tuple(v) for k, v in filters.items()})
            assert (len(allowed) > index_directory.EXACT_FILTER_ROWS) == ("Men" in str(filters))
            response = client.generate_and_retrieve(ask, num_samples=2, top_k=10, seed=3, return_images=True,
                                                    filters=filters)
            assert len(response.products) == 10
            for product in response.products:
                for group, values in filters.items():
                    assert product.attributes[group].values[0] in ((values,) if isinstance(values, str) else values)
            normal = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in filters.items()}
            assert [p.id for p in response.products] == brute_force_response(service, response, normal, 10)
        # both values exist, but no product has the two together
        nothing = client.generate_and_retrieve(ask, num_samples=2, top_k=10, seed=3,
                                               filters={"articleType": "Handbags", "gender": "Boys"})
        assert service.index.rows_matching({"articleType": ("Handbags",), "gender": ("Boys",)}).size == 0
        assert list(nothing.products) == []
