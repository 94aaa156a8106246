"""The ImageNet backbone, its weights check, and the one image-to-network-input path."""

import numpy as np
import pytest
import torch

from atelier.indexer.backbone import network_input, normalise, square_rgb
from atelier.pretrained import MOBILENET_V2_FILE, WeightsUnavailable, mobilenet_v2_features, verify_mobilenet_v2_weights


def test_network_input_squares_pads_and_normalises():
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (40, 20, 1), dtype=np.uint8)
    tall[0] = 7  # the top row's median is the padding
    square = square_rgb(tall, 32)
    assert square.shape == (32, 32, 3) and np.all(square[:, 0] == 7) and np.array_equal(square[..., 0], square[..., 2])
    x = network_input(np.stack([tall, tall]), 32)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    expected = (square.astype(np.float32) - mean) / std
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert torch.equal(normalise(np.stack([square])), x[:1])


def test_attribute_net_and_its_embedder_read_images_the_same_way(tmp_path, mobilenet_weights):
    """An in-domain embedder serves through the very input path it was trained on."""
    from atelier.catalog.schema import AttributeGroup, AttributeSchema
    from atelier.indexer.attribute_net import AttributeNet, AttributeNetConfig, write_attribute_net_files
    from atelier.indexer.embedders import trained_embedder

    schema = AttributeSchema((AttributeGroup("category", ("a", "b")),))
    net = AttributeNet(schema, AttributeNetConfig("judge_cnn", input_size=32, feature_dim=16)).eval()
    write_attribute_net_files(net, tmp_path)
    embedder = trained_embedder(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    prepared = np.stack([embedder.prepare(im) for im in images])
    assert torch.equal(normalise(prepared), net.prepare(images))
    with torch.inference_mode():
        features = torch.nn.functional.normalize(net.features(net.prepare(images)), dim=1).numpy()
    assert np.allclose(embedder.embed(images), features, atol=1e-5)


def test_a_tampered_weights_file_is_refused_before_torch_reads_it(tmp_path, monkeypatch, mobilenet_weights):
    bad = tmp_path / "checkpoints" / MOBILENET_V2_FILE
    bad.parent.mkdir()
    bad.write_bytes(b"not the ImageNet weights")
    with pytest.raises(WeightsUnavailable, match="not torchvision's b0353104"):
        verify_mobilenet_v2_weights(bad)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="delete it and run `./dev.sh setup`"):
        mobilenet_v2_features()
    verify_mobilenet_v2_weights(mobilenet_weights)  # the real file passes


def test_a_tampered_fid_network_is_refused(tmp_path, monkeypatch):
    from atelier.artifacts import sha256_file
    from atelier.evaluation.fid_inception import FidInception, FidWeightsUnavailable

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"an impostor network")
    monkeypatch.setenv("ATELIER_FID_WEIGHTS", str(fake))
    with pytest.raises(FidWeightsUnavailable, match="has sha256 .* not the expected 7ff4a85c"):
        FidInception.load()
    # naming the other file's hash on purpose lets it through the check (and torch then reads it)
    monkeypatch.setenv("ATELIER_FID_WEIGHTS_SHA256", sha256_file(fake))
    with pytest.raises(RuntimeError):
        FidInception.load()
