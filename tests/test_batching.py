"""Dynamic batching: concurrent requests for one model share generator and embedder runs, and
each still gets exactly (bit for bit) what it gets alone. Real model, real embedder, real FAISS,
and the real gRPC server over a socket for the served check."""

import threading

import numpy as np
import pytest

from atelier.catalog.images import encode_png
from atelier.retrieval.batching import BatchPolicy
from atelier.retrieval.service import LoadedModel, RetrievalRequest, RetrievalService
from atelier.retrieval.stages import QUEUE
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

WAIT = 60  # seconds: an upper bound on waiting, never a measured duration

# Different attributes, seeds and sizes: 1 + 3 + 5 + 8 + 2 = 19 rows cross the 8-row chunk
# boundaries in the middle of requests, and pad the last chunk.
REQUESTS = [
    RetrievalRequest({"category": "Coat"}, num_samples=1, top_k=5, seed=1, return_images=True),
    RetrievalRequest({"category": "Bag"}, num_samples=3, top_k=7, seed=2, return_images=True),
    RetrievalRequest({"category": "Sneaker"}, num_samples=5, top_k=4, seed=3, return_images=True),
    RetrievalRequest({"category": "Coat"}, num_samples=8, top_k=10, seed=4, return_images=True),
    RetrievalRequest({"category": "Trouser"}, num_samples=2, top_k=3, seed=1, return_images=True),
]
ROWS = sum(r.num_samples for r in REQUESTS)


def batched_service(service, **policy) -> RetrievalService:
    model = service.models["cgan"]
    return RetrievalService(service.index, service.embedder, {"cgan": LoadedModel("cgan", model.generator, model.manifest)},
                            service.limits, batching=BatchPolicy(**policy))


def all_at_once(call, requests):
    """Start every call together (a barrier), return their results in request order."""
    barrier = threading.Barrier(len(requests))
    results, errors = [None] * len(requests), []

    def run(i):
        try:
            barrier.wait(WAIT)
            results[i] = call(requests[i])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    return results


def same(a, b) -> None:
    assert [(p.id, p.score, p.attributes) for p in a.products] == [(p.id, p.score, p.attributes) for p in b.products]
    assert len(a.images) == len(b.images) and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert (a.seed, a.num_samples, a.model_version, a.index_version) == (b.seed, b.num_samples, b.model_version, b.index_version)


def test_concurrent_requests_share_one_batch_and_each_gets_what_it_gets_alone(service):
    lone = batched_service(service, max_wait_ms=0, chunk_rows=8)
    alone = [lone.generate_and_retrieve(r) for r in REQUESTS]
    assert (lone.batchers["cgan"].batches, lone.batchers["cgan"].batched_requests) == (len(REQUESTS), len(REQUESTS))
    # the batch closes as soon as all 19 rows are in; the long wait only covers slow thread starts
    svc = batched_service(service, max_wait_ms=WAIT * 1000, max_batch_rows=ROWS, chunk_rows=8)
    together = all_at_once(svc.generate_and_retrieve, REQUESTS)
    assert (svc.batchers["cgan"].batches, svc.batchers["cgan"].batched_requests) == (1, len(REQUESTS))
    for a, t in zip(alone, together):
        same(a, t)
    assert all(t.timings_ms[QUEUE] >= 0 for t in together)


def test_batches_split_at_max_batch_rows_and_results_do_not_change(service):
    alone = [batched_service(service, max_wait_ms=0, chunk_rows=4).generate_and_retrieve(r) for r in REQUESTS]
    svc = batched_service(service, max_wait_ms=200, max_batch_rows=9, chunk_rows=4)
    together = all_at_once(svc.generate_and_retrieve, REQUESTS)
    assert svc.batchers["cgan"].batches >= 3  # 19 rows, at most 9 per batch (a request of 8 fills one alone)
    for a, t in zip(alone, together):
        same(a, t)


def test_over_grpc_concurrent_responses_equal_the_lone_ones(service):
    alone = [batched_service(service, max_wait_ms=0).generate_and_retrieve(r) for r in REQUESTS]  # in process
    svc = batched_service(service, max_wait_ms=WAIT * 1000, max_batch_rows=ROWS)
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client:
            def call(r):
                return client.generate_and_retrieve(r.attributes, num_samples=r.num_samples, top_k=r.top_k,
                                                    seed=r.seed, return_images=True)

            together = all_at_once(call, REQUESTS)
        assert svc.batchers["cgan"].batches == 1
        for a, t in zip(alone, together):  # float32 on the wire, PNG-encoded images
            assert [(p.id, np.float32(p.score)) for p in a.products] == [(p.id, p.score) for p in t.products]
            assert [encode_png(im) for im in a.images] == [im.png for im in t.images]
    finally:
        running.stop(grace=1)


def test_the_batch_shape_decides_the_result_not_the_neighbours(service):
    """Why fixed chunks: embedding rows inside chunks of one shape gives identical vectors
    whatever the other rows are; the service relies on this."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8)
    embedder = service.embedder
    reference = embedder.embed(images[:3], batch_size=8, fixed_shape=True)
    for start in (0, 5):
        mixed = images[8:16].copy()
        mixed[start : start + 3] = images[:3]
        assert np.array_equal(embedder.embed(mixed, batch_size=8, fixed_shape=True)[start : start + 3], reference)


@pytest.mark.parametrize("bad, message", [
    ({"max_wait_ms": -1}, "max_wait_ms must be >= 0"),
    ({"max_batch_rows": 0}, "max_batch_rows must be at least 1"),
    ({"chunk_rows": 0}, "chunk_rows must be at least 1"),
])
def test_a_bad_batch_policy_is_refused_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        BatchPolicy(**bad)


def test_finish_lets_the_batch_in_flight_end_and_idle_workers_quit(service, monkeypatch):
    """What the interpreter-exit hook relies on: finish() waits for a running batch, whose request
    still gets its answer, and does not wait out idle_seconds for the idle worker."""
    svc = batched_service(service, max_wait_ms=0, idle_seconds=WAIT * 10)
    batcher = svc.batchers["cgan"]
    generator = batcher.generator
    started, release = threading.Event(), threading.Event()
    real_sample = generator.sample_conditions

    def held_sample(conditions, seeds):
        started.set()
        release.wait(WAIT)
        return real_sample(conditions, seeds)

    monkeypatch.setattr(generator, "sample_conditions", held_sample)
    result = {}
    asker = threading.Thread(target=lambda: result.update(r=svc.generate_and_retrieve(REQUESTS[0])))
    asker.start()
    assert started.wait(WAIT)
    finisher = threading.Thread(target=batcher.finish, args=(WAIT,))
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive()  # still waiting for the held batch
    release.set()
    finisher.join(WAIT)
    asker.join(WAIT)
    assert not finisher.is_alive() and not any(t.is_alive() for t in batcher._threads)
    assert len(result["r"].products) == REQUESTS[0].top_k
