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



def test_a_discriminator_on_frozen_pretrained_features(mobilenet_weights):
    import torch

    from atelier.catalog.schema import AttributeGroup, AttributeSchema
    from atelier.generator.mcgan import MCGAN, MCGANConfig

    schema = AttributeSchema((AttributeGroup("type", ("Shirt", "Dress")), AttributeGroup("colour", ("Red", "Blue"))))
    torch.manual_seed(0)
    model = MCGAN(schema, MCGANConfig(image_size=32, g_width=4, d_width=4, latent_dim=8, embed_dim=4,
                                      discriminator="pretrained")).train()
    trainer = MCGAN.Trainer(model)
    d = trainer.d
    assert all(k.split(".")[0] in {"heads", "logits", "embeds"} for k in d.state_dict())  # ImageNet's weights stay out
    frozen = [p.detach().clone() for stage in d.frozen for p in stage.parameters()]
    heads = [p.detach().clone() for p in d.heads.parameters()]
    g_before = [p.detach().clone() for p in model.parameters()]
    condition = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]] * 2)
    losses = trainer.step(torch.rand(4, 3, 32, 32) * 2 - 1, condition)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(torch.equal(a, p) for a, p in zip(frozen, (p for stage in d.frozen for p in stage.parameters())))
    assert any(not torch.equal(a, p) for a, p in zip(heads, d.heads.parameters()))  # the heads learn
    assert any(not torch.equal(a, p) for a, p in zip(g_before, model.parameters()))  # G's gradient went through
    logits = d(torch.zeros(2, 3, 32, 32), condition[:2])
    assert logits.shape == (2,)
