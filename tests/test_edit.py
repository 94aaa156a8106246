"""Editing an image: a family that can invert its sampler (the flow) or encode (the CVAE)
redraws a given image under other attributes. Real tiny checkpoints trained on real data."""

from __future__ import annotations

import numpy as np
import pytest

from atelier.catalog.catalogue import Catalogue
from atelier.generator import load_generator
from atelier.generator.base import fit_images
from atelier.generator.train import TrainConfig, train


@pytest.fixture(scope="module")
def real_images(small_catalogue):
    images, rows = Catalogue.open(small_catalogue).load_images(split="test", limit=6)
    return images, rows.column("category").to_pylist()


@pytest.fixture(scope="module")
def cvae_checkpoint(tmp_path_factory, small_catalogue):
    out = tmp_path_factory.mktemp("cvae-edit") / "model"
    train(TrainConfig(catalogue=small_catalogue, out=out, model="cvae", epochs=1, batch_size=32, max_steps=2,
                      progress=False, model_overrides={"width": 8, "latent_dim": 8, "embed_dim": 8}))
    return out


def conditions(model, categories):
    return np.stack([model.schema.encode({"category": c}) for c in categories])


def test_a_flow_inverted_and_redrawn_under_the_same_condition_gives_the_image_back(flow_checkpoint, real_images):
    import torch

    images, categories = real_images
    model, _ = load_generator(flow_checkpoint, sampling={"sample_steps": 24, "guidance": 1.0})
    torch.manual_seed(0)
    with torch.no_grad():  # two training steps leave the zero-initialised output layers near zero:
        for p in model.parameters():  # give the velocity field some shape, condition included
            p.add_(torch.randn_like(p) * 0.05)
    same, bags = conditions(model, categories), conditions(model, ["Bag"] * len(images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        z = model.invert(x, torch.from_numpy(same))
        back = model(z, torch.from_numpy(same))
        edited = model(z, torch.from_numpy(bags))
    roundtrip = (back - x).abs().mean()
    # the ODE run backwards then forwards: the image again, though the noise is far from it
    assert roundtrip < 0.1 * (z.view_as(x) - x).abs().mean()
    assert (edited - back).abs().mean() > 10 * roundtrip  # another condition draws another image
    # edit_conditions is that, in uint8, and deterministic
    np.testing.assert_array_equal(model.edit_conditions(images, same, bags),
                                  ((edited + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_a_cvae_edit_is_its_reconstruction_redrawn_and_deterministic(cvae_checkpoint, real_images):
    import torch

    images, categories = real_images
    model, _ = load_generator(cvae_checkpoint)
    same = conditions(model, categories)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        reconstruction = model.reconstruct(x, torch.from_numpy(same))
    expected = ((reconstruction.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(model.edit_conditions(images, same, same), expected)
    other = conditions(model, ["Sneaker"] * len(images))
    assert not np.array_equal(model.edit_conditions(images, same, other), expected)


def test_a_family_without_an_encoder_says_it_cannot_edit(tiny_model, real_images):
    images, categories = real_images
    model, _ = load_generator(tiny_model)
    assert not model.can_edit
    with pytest.raises(NotImplementedError, match="the cgan family cannot edit an image"):
        model.edit_conditions(images, conditions(model, categories), conditions(model, categories))


def test_fit_images_squares_and_converts_channels():
    wide_rgb = np.zeros((2, 10, 20, 3), dtype=np.uint8)
    wide_rgb[:, :, :, 0] = 90
    grey = fit_images(wide_rgb, 8, 1)
    assert grey.shape == (2, 8, 8, 1)
    assert grey[0, 4, 4, 0] == 30 and grey[0, 0, 0, 0] == 255  # the mean of (90, 0, 0); white padding
    assert fit_images(grey, 16, 3).shape == (2, 16, 16, 3)


# -- RetrieveSimilar: the service, and over the real gRPC server ------------------------------


@pytest.fixture(scope="module")
def edit_service(small_index, flow_checkpoint, tiny_model):
    from atelier.retrieval.service import RetrievalService

    return RetrievalService.open(small_index, {"cgan": tiny_model, "flow": flow_checkpoint})


@pytest.fixture(scope="module")
def edit_server(edit_service):
    from atelier.server.app import start_server

    server = start_server(edit_service, "127.0.0.1:0")
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def edit_client(edit_server):
    from atelier.server.client import AtelierClient

    with AtelierClient(edit_server.target, timeout=120) as client:
        yield client


def product_image(index, row: int) -> np.ndarray:
    from atelier.catalog.images import decode_image

    return decode_image(index.thumbnails([row])[0], 3)


def test_like_a_product_is_its_stored_vector_searched_without_itself(edit_client, edit_service):
    index = edit_service.index
    row = 7
    product = index.product_rows([row])[0]["id"]
    response = edit_client.retrieve_similar(product_id=product, top_k=6)
    stored = index.vectors(np.arange(len(index)))
    order = [r for r in np.argsort(-(stored @ stored[row]), kind="stable") if r != row][:6]
    assert [p.id for p in response.products] == index.products.column("id").take(order).to_pylist()
    assert response.model == "" and response.num_samples == 0 and not response.images


def test_like_a_product_but_changed_searches_its_edit(edit_client, edit_service):
    from atelier.retrieval.batching import embed

    index, flow = edit_service.index, edit_service.models["flow"].generator
    row = 3
    product = index.product_rows([row])[0]
    response = edit_client.retrieve_similar(product_id=product["id"], changes={"category": "Bag"}, top_k=5,
                                            return_images=True)
    assert response.model == "flow" and response.num_samples == 1 and len(response.images) == 1
    source = flow.schema.encode({"category": product["category"]})[None]
    target = flow.schema.encode({"category": "Bag"})[None]
    expected = flow.edit_conditions(fit_images(product_image(index, row)[None], 28, 1), source, target)
    from atelier.catalog.images import decode_image

    np.testing.assert_array_equal(decode_image(response.images[0].png, 1), expected[0])
    vector = embed(edit_service.embedder, expected, edit_service.batching.chunk_rows)
    rows = [r for r in index.search(vector, 6)[1][0] if r != row][:5]
    assert [p.id for p in response.products] == index.products.column("id").take(rows).to_pylist()
    assert product["id"] not in [p.id for p in response.products]


def test_like_an_image_finds_that_product_first(edit_client, edit_service):
    from atelier.catalog.images import encode_png

    index = edit_service.index
    image = product_image(edit_service.index, 11)
    response = edit_client.retrieve_similar(image=encode_png(image), top_k=3, filters={"category": index.product_rows([11])[0]["category"]})
    assert response.products[0].id == index.product_rows([11])[0]["id"]
    assert response.products[0].score == pytest.approx(1.0, abs=1e-3)


def test_retrieve_similar_refuses_what_it_cannot_do_by_name(edit_client, edit_service):
    import grpc

    from atelier.catalog.images import encode_png

    def code(**kwargs):
        with pytest.raises(grpc.RpcError) as error:
            edit_client.retrieve_similar(**kwargs)
        return error.value.code(), error.value.details()

    assert code() == (grpc.StatusCode.INVALID_ARGUMENT,
                      "give exactly one of product_id (an indexed product) or image (encoded bytes)")
    assert code(product_id="nope")[0] == grpc.StatusCode.NOT_FOUND
    assert code(product_id="train_00000", changes={"category": "Bag"}, model="cgan") == (
        grpc.StatusCode.INVALID_ARGUMENT, "model 'cgan' (cgan) cannot edit an image; models here that can: flow")
    status, message = code(product_id="train_00000", changes={"category": "Tuxedo"})
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "unknown value 'Tuxedo'" in message
    status, message = code(image=b"not an image", changes={"category": "Bag"})
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "image could not be decoded" in message
    image = encode_png(product_image(edit_service.index, 0))
    status, message = code(image=image, changes={"category": "Bag"}, attributes={"colour": "Red"})
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "unknown attribute 'colour'" in message


def test_an_edit_batched_with_drawings_gets_what_it_gets_alone(edit_service):
    from atelier.retrieval.batching import BatchPolicy
    from atelier.retrieval.service import LoadedModel, RetrievalRequest, RetrievalService
    from atelier.retrieval.similar import SimilarRequest, retrieve_similar
    from tests.test_batching import all_at_once

    flow = edit_service.models["flow"]

    def service(**policy):
        return RetrievalService(edit_service.index, edit_service.embedder,
                                {"flow": LoadedModel("flow", flow.generator, flow.manifest)}, batching=BatchPolicy(**policy))

    edit = SimilarRequest(product_id="train_00004", changes={"category": "Sneaker"}, top_k=4, return_images=True)
    draw = RetrievalRequest({"category": "Coat"}, num_samples=3, top_k=4, seed=2, return_images=True)
    lone = service(max_wait_ms=0)
    alone = [retrieve_similar(lone, edit), lone.generate_and_retrieve(draw)]
    together_service = service(max_wait_ms=60_000, max_batch_rows=4)
    together = all_at_once(lambda r: retrieve_similar(together_service, r) if isinstance(r, SimilarRequest)
                           else together_service.generate_and_retrieve(r), [edit, draw])
    assert together_service.batchers["flow"].batches == 1
    for a, t in zip(alone, together):
        assert [p.id for p in a.products] == [p.id for p in t.products]
        assert all(np.array_equal(x, y) for x, y in zip(a.images, t.images)) and len(a.images) == len(t.images)


def test_cli_query_like_with_a_change(edit_server, capsys, tmp_path):
    import json

    from atelier.cli import main

    target = edit_server.target
    assert main(["query", "--target", target, "--like", "train_00002", "--change", "category=Bag", "--top-k", "3",
                 "--images-out", str(tmp_path / "edit"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "flow" and len(data["products"]) == 3
    assert len(list((tmp_path / "edit").glob("*.png"))) == 1
    assert main(["query", "--target", target, "--change", "category=Bag"]) == 2
    assert "--change edits the item of --like or --like-image" in capsys.readouterr().err
