"""Attribute networks: the eval judge and the in-domain embedder, trained on real Fashion-MNIST rows."""

import json

import numpy as np
import pytest
import torch

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.cli import main
from atelier.indexer.attribute_net import (
    AttributeTrainConfig,
    accuracy,
    load_attribute_net,
    loss_of,
    targets,
    train_attribute_net,
)
from atelier.indexer.embedders import build_embedder, embedder_of_index
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.runner import reindex
from atelier.retrieval.service import RetrievalRequest, RetrievalService
from tests.conftest import write_fashion_mnist_subset


@pytest.fixture(scope="module")
def judge(tmp_path_factory, small_catalogue):
    out = tmp_path_factory.mktemp("judge") / "judge"
    train_attribute_net(AttributeTrainConfig(small_catalogue, out, architecture="judge_cnn", input_size=32, epochs=4,
                                             batch_size=32, learning_rate=3e-3, progress=False))
    return out


@pytest.fixture(scope="module")
def trained_embedder(tmp_path_factory, small_catalogue, mobilenet_weights):
    out = tmp_path_factory.mktemp("embedder") / "embedder"
    train_attribute_net(AttributeTrainConfig(small_catalogue, out, architecture="mobilenet_v2", input_size=32,
                                             feature_dim=64, epochs=1, batch_size=32, progress=False))
    return out


def test_the_judge_learns_the_classes_and_records_its_held_out_accuracy(judge, small_catalogue):
    net, manifest = load_attribute_net(judge)
    recorded = manifest["training"]["test_accuracy"]["category"]
    assert recorded > 0.3  # 10 classes: chance is 0.1
    images, rows = Catalogue.open(small_catalogue).load_images(split="test")
    assert accuracy(net, images, rows.select(["category"]).to_pylist())["category"] == pytest.approx(recorded)
    assert manifest["training"]["test_rows"] == 200 and manifest["training"]["train_rows"] == 256


def test_a_saved_network_gives_the_same_features_and_probabilities(judge, small_catalogue):
    images, _ = Catalogue.open(small_catalogue).load_images(split="test", limit=16)
    first, _ = load_attribute_net(judge)
    second, _ = load_attribute_net(judge)
    f1, p1 = first.run(images)
    f2, p2 = second.run(images)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_allclose(p1["category"].sum(axis=1), 1.0, rtol=1e-5)
    assert f1.shape == (16, 256)


def test_targets_and_loss_cover_missing_values_and_multi_label_groups():
    schema = AttributeSchema((AttributeGroup("type", ("a", "b")), AttributeGroup("fabric", ("x", "y", "z"), multi_label=True)))
    y = targets(schema, [{"type": "b", "fabric": ("x", "z")}, {"type": None, "fabric": ()}])
    assert y["type"].tolist() == [1, -1]
    assert y["fabric"].tolist() == [[1, 0, 1], [0, 0, 0]]

    class Stub:  # loss_of reads only the schema
        pass

    stub = Stub()
    stub.schema = schema
    logits = {"type": torch.tensor([[0.0, 0.0], [5.0, -5.0]]), "fabric": torch.zeros(2, 3)}
    expected = torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(2.0))  # CE on row 0 only + BCE of logit 0
    assert float(loss_of(stub, logits, y)) == pytest.approx(float(expected), rel=1e-5)


def test_an_in_domain_embedder_indexes_and_serves_from_the_index_copy(tmp_path, trained_embedder, small_catalogue,
                                                                      tiny_model):
    index_path = tmp_path / "index"
    reindex(small_catalogue, index_path, embedder_name=str(trained_embedder), progress=False)
    index = IndexDirectory.open(index_path)
    spec = index.embedder
    assert spec["name"] == "attribute-net" and spec["dim"] == 64 and spec["input_size"] == 32
    assert {"embedder/config.json", "embedder/weights.safetensors"} <= set(index.manifest["files"])
    # the index alone rebuilds the embedder, and its vectors are that embedder's
    embedder = embedder_of_index(spec, index.path)
    assert embedder.weights_sha256 == build_embedder(str(trained_embedder)).weights_sha256
    images, _ = Catalogue.open(small_catalogue).load_images(limit=8)
    np.testing.assert_allclose(embedder.embed(images), index.vectors(np.arange(8)), atol=1e-5)
    service = RetrievalService.open(index_path, {"cgan": tiny_model})
    result = service.generate_and_retrieve(RetrievalRequest(attributes={"category": ("Trouser",)}, num_samples=2,
                                                            top_k=5, seed=1))
    assert len(result.products) == 5
    # a changed copy of the weights inside the index is refused, naming the file
    (artifacts.resolve(index_path) / "embedder" / "weights.safetensors").write_bytes(b"not weights")
    with pytest.raises(artifacts.ArtifactError, match="embedder/weights.safetensors"):
        IndexDirectory.open(index_path)


def test_cli_trains_and_reports_held_out_accuracy_and_refuses_a_catalogue_without_test_split(
        tmp_path, small_catalogue, idx_dir, capsys):
    main(["train-attributes", "--catalogue", str(small_catalogue), "--out", str(tmp_path / "judge"),
          "--input-size", "32", "--epochs", "1", "--limit", "64", "--quiet"])
    out = capsys.readouterr().out
    assert "held-out accuracy: category" in out
    manifest = json.loads((artifacts.resolve(tmp_path / "judge") / "manifest.json").read_text())
    assert set(manifest["training"]["test_accuracy"]) == {"category"} and manifest["training"]["train_rows"] == 64
    write_fashion_mnist_subset(tmp_path / "only-train", idx_dir, {"train": 64})
    with pytest.raises(ValueError, match="needs 'train' and 'test' splits"):
        train_attribute_net(AttributeTrainConfig(tmp_path / "only-train", tmp_path / "x", progress=False))
    assert not (tmp_path / "x").exists()


def test_an_unknown_embedder_names_what_is_allowed():
    with pytest.raises(ValueError, match="mobilenet_v2.*train-attributes"):
        build_embedder("resnet9000")


def test_auto_picks_the_committed_in_domain_embedder_measured_best_for_a_catalogue():
    from atelier.artifacts import COMMITTED_CHECKPOINTS
    from atelier.indexer.embedders import embedder_for_catalogue

    assert embedder_for_catalogue("fashion-mnist") == str(COMMITTED_CHECKPOINTS / "embedder-fashion-mnist")
    assert embedder_for_catalogue("fashion-product-images-apparel-6x6-all") == str(
        COMMITTED_CHECKPOINTS / "embedder-fpi-apparel")
    assert embedder_for_catalogue("fashion-mnist-subset") == "mobilenet_v2"  # no measurement, no in-domain default
    net = build_embedder(embedder_for_catalogue("fashion-mnist"))
    assert (net.name, net.input_size, net.dim) == ("attribute-net", 32, 256)
