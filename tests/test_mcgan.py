"""Several attributes end to end: a real Fashion Product Images catalogue, the MCGAN, gRPC."""

import grpc
import pytest

from atelier.catalog.fashion_product_images import import_fashion_product_images
from atelier.generator.train import TrainConfig, train
from atelier.indexer.runner import reindex
from atelier.retrieval.service import RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

TINY = {"g_width": 4, "d_width": 8, "embed_dim": 8, "latent_dim": 16, "image_size": 32}


@pytest.fixture(scope="module")
def fpi_stack(tmp_path_factory, fpi_parquet, mobilenet_weights):
    root = tmp_path_factory.mktemp("fpi")
    train_cat = import_fashion_product_images(fpi_parquet, root / "apparel", "apparel-6x6", size=32, limit=200,
                                              progress=False)
    index_cat = import_fashion_product_images(fpi_parquet, root / "all", "apparel-6x6-all", size=32, limit=300,
                                              progress=False)
    train(TrainConfig(catalogue=root / "apparel", out=root / "mcgan", model="mcgan", epochs=1, batch_size=16,
                      max_steps=3, progress=False, split=None, model_overrides=TINY))
    reindex(root / "all", root / "index", input_size=32, progress=False)
    service = RetrievalService.open(root / "index", {"mcgan": root / "mcgan"})
    server = start_server(service)
    yield train_cat, index_cat, server
    server.stop(grace=1)


def test_a_model_of_the_selection_searches_the_whole_catalogue(fpi_stack):
    train_cat, index_cat, server = fpi_stack
    assert set(index_cat.schema.group("colour").values) == {*train_cat.schema.group("colour").values, "other"}
    with AtelierClient(server.target) as client:
        schema = client.get_schema()
        groups = {g.name: list(g.values) for g in schema.groups}
        assert groups == {g.name: list(g.values) for g in train_cat.schema.groups}  # what can be asked
        assert schema.index.count == 300 and schema.models[0].family == "mcgan"
        both = client.generate_and_retrieve({"type": "Topwear", "colour": "Blue"}, num_samples=2, top_k=5, seed=1)
        assert len(both.products) == 5
        assert all(set(p.attributes) == {"type", "colour"} for p in both.products)
        partial = client.generate_and_retrieve({"colour": "Red"}, num_samples=2, top_k=5, seed=1)  # type: "any"
        assert len(partial.products) == 5
        with pytest.raises(grpc.RpcError) as error:
            client.generate_and_retrieve({"type": "Topwear", "colour": "other"})
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "allowed: Blue, Black, White, Grey, Green, Red" in error.value.details()

