"""Limits, deadlines, admission control, health, index hot swap and integrity, over real sockets.

Timing is controlled with events, never measured: a slow model is a stand-in generator that
blocks until the test releases it, and "at once" means "while the earlier request is still held".
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier import artifacts
from atelier.catalog.fashion_mnist import CLASS_NAMES
from atelier.catalog.images import encode_png
from atelier.indexer.index_directory import INDEX_FILE, IndexDirectory
from atelier.retrieval import batching
from atelier.retrieval.service import (
    Admission,
    DeadlineExceeded,
    IndexRefused,
    InvalidRequest,
    Limits,
    LoadedModel,
    Overloaded,
    RetrievalRequest,
    RetrievalService,
)
from atelier.server.app import start_server
from atelier.server.client import AtelierClient
from atelier.server.servicer import AtelierServicer
from atelier.server.wire import pb, pb_grpc

WAIT = 60  # seconds: only an upper bound on waiting for an event, never a measured duration


# --- stand-ins and helpers -------------------------------------------------------------------


class HeldGenerator:
    """A stand-in for a slow model: `sample_conditions` blocks until the test releases it."""

    def __init__(self, inner, on_sample=None):
        self.inner, self.on_sample = inner, on_sample
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample_conditions(self, conditions, seeds):
        self.entered.set()
        if self.on_sample is not None:
            self.on_sample()
        else:
            assert self.release.wait(WAIT), "the test never released the held generator"
        return self.inner.sample_conditions(conditions, seeds)


class CountingEmbedder:
    """The real embedder, counting calls: proves which stages ran."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images, **options):
        self.calls += 1
        return self.inner.embed(images, **options)


def make_service(base: RetrievalService, generator=None, embedder=None, index: IndexDirectory | None = None,
                 index_source: Path | None = None, clock=None, **limits) -> RetrievalService:
    """A fresh service from the session's loaded pieces (no reloading of weights)."""
    model = base.models["cgan"]
    kwargs = {"clock": clock} if clock else {}
    return RetrievalService(index or base.index, embedder or base.embedder,
                            {"cgan": LoadedModel("cgan", generator or model.generator, model.manifest)},
                            Limits(max_num_samples=8, max_top_k=20, max_candidates=100, **limits),
                            index_source=index_source, **kwargs)


def wait_until(predicate, what: str) -> None:
    done = threading.Event()
    for _ in range(WAIT * 20):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def health_of(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, outcome) where outcome gets 'result' or 'error'."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def publish_copy(source: Path, dest: Path, corrupt: bool = False, schema: dict | None = None) -> str:
    """Publish a copy of the index version `source` at `dest` (a new version); returns its name.

    `corrupt` flips a byte of the FAISS file after its hash was recorded; `schema` rewrites the
    manifest with another schema (hashes recomputed, so only the schema check can catch it).
    """
    folder = artifacts.resolve(source)
    with artifacts.staging(dest) as stage:
        for file in folder.iterdir():
            shutil.copy2(file, stage / file.name)
        if schema is not None:
            manifest = artifacts.read_manifest(stage)
            fields = {k: v for k, v in manifest.items() if k not in ("kind", "created", "files")}
            artifacts.write_manifest(stage, manifest["kind"], **{**fields, "schema": schema})
        if corrupt:
            data = bytearray((stage / INDEX_FILE).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (stage / INDEX_FILE).write_bytes(bytes(data))
        return artifacts.publish(stage, dest).name


@pytest.fixture()
def own_index(tmp_path, small_index) -> Path:
    """A published index of this test's own, so swapping it leaves the session's alone."""
    dest = tmp_path / "index"
    publish_copy(small_index, dest)
    return dest


BAG = {"category": "Bag"}


# --- limits ------------------------------------------------------------------------------------


def test_limits_are_checked_and_each_refusal_names_its_limit(service):
    svc = make_service(service, max_attributes=2, max_values_per_attribute=3, max_string_length=16)
    cases = [
        (RetrievalRequest(BAG, num_samples=9), "allowed 1..8 (max_num_samples"),
        (RetrievalRequest(BAG, top_k=21), "allowed 1..20 (max_top_k"),
        (RetrievalRequest(BAG, num_samples=8, top_k=20), "exceeds the limit 100 (max_candidates)"),
        (RetrievalRequest({"a": "x", "b": "x", "c": "x"}), "3 attributes given; allowed at most 2 (max_attributes)"),
        (RetrievalRequest({"category": ["a", "b", "c", "d"]}), "4 values; allowed at most 3 (max_values_per_attribute)"),
        (RetrievalRequest({"category": "x" * 17}), "has 17 characters; allowed at most 16 (max_string_length)"),
        (RetrievalRequest({"c" * 1000: "Bag"}), "has 1000 characters; allowed at most 16 (max_string_length)"),
        (RetrievalRequest(BAG, model="m" * 17), "model name 'mmmmmmmmmmmmmmmmm' has 17 characters"),
    ]
    for request, fragment in cases:
        with pytest.raises(InvalidRequest) as error:
            svc.generate_and_retrieve(request)
        assert fragment in str(error.value), (request, error.value)
    # A huge string is not echoed whole in the error.
    with pytest.raises(InvalidRequest) as error:
        svc.generate_and_retrieve(RetrievalRequest({"category": "y" * 100_000}))
    assert len(str(error.value)) < 300


def test_limits_must_be_positive_and_defaults_within_them():
    with pytest.raises(ValueError, match="limit max_queue_per_model must be at least 1, got 0"):
        Limits(max_queue_per_model=0)
    with pytest.raises(ValueError, match="exceed the maxima"):
        Limits(max_top_k=5)
    with pytest.raises(ValueError, match="default_deadline_seconds must be positive, got 0"):
        Limits(default_deadline_seconds=0)


def test_message_size_limits_are_grpc_limits_and_named(service):
    running = start_server(make_service(service, max_request_bytes=4096, max_response_bytes=2048))
    try:
        with AtelierClient(running.target, timeout=WAIT) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.generate_and_retrieve({"category": "x" * 10_000})
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:  # 8 drawings as PNG do not fit in 2 KiB
                client.generate_and_retrieve(BAG, num_samples=8, top_k=2, return_images=True)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2048" in error.value.details()
            assert len(client.generate_and_retrieve(BAG, num_samples=1, top_k=2).products) == 2
            limits = client.get_schema().limits
            assert (limits.max_request_bytes, limits.max_response_bytes, limits.max_queue_per_model,
                    limits.default_deadline_seconds) == (4096, 2048, Limits.max_queue_per_model,
                                                         Limits.default_deadline_seconds)
    finally:
        running.stop(grace=1)


# --- deadlines ---------------------------------------------------------------------------------


def test_an_expired_deadline_stops_before_the_next_stage_in_process(service):
    now = [0.0]
    embedder = CountingEmbedder(service.embedder)
    slow = HeldGenerator(service.models["cgan"].generator, on_sample=lambda: now.__setitem__(0, now[0] + 10))
    svc = make_service(service, generator=slow, embedder=embedder, clock=lambda: now[0])
    with pytest.raises(DeadlineExceeded, match=r"deadline \(5000 ms\) passed before stage 'embed'; not run: embed, search, merge"):
        svc.generate_and_retrieve(RetrievalRequest(BAG, num_samples=1), time_remaining=5)
    assert embedder.calls == 0 and svc.admission.admitted("cgan") == 0
    with pytest.raises(DeadlineExceeded, match="before stage 'validate'"):
        svc.generate_and_retrieve(RetrievalRequest(BAG), time_remaining=0)
    result = svc.generate_and_retrieve(RetrievalRequest(BAG, num_samples=1, top_k=2), time_remaining=60)
    assert len(result.products) == 2 and embedder.calls == 1


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, remaining: float):
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining

    def abort(self, code, details):
        raise Aborted(code, details)


def test_the_servicer_maps_a_passed_deadline_to_deadline_exceeded(service):
    servicer = AtelierServicer(make_service(service))
    request = pb.GenerateAndRetrieveRequest(attributes={"category": pb.AttributeValues(values=["Bag"])})
    with pytest.raises(Aborted) as error:
        servicer.GenerateAndRetrieve(request, FakeContext(0))
    assert error.value.args[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "before stage 'validate'" in error.value.args[1]


def test_a_deadline_passing_during_generation_returns_deadline_exceeded_and_skips_the_rest(service):
    held = HeldGenerator(service.models["cgan"].generator)
    embedder = CountingEmbedder(service.embedder)
    svc = make_service(service, generator=held, embedder=embedder)
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=2) as client:
            with pytest.raises(grpc.RpcError) as error:  # the model is held until after the deadline
                client.generate_and_retrieve(BAG, num_samples=1)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the server's deadline runs from when the call reached it, a transit later than the
            # client's: release the model only once that one has surely passed too
            time.sleep(0.5)
            held.release.set()
            wait_until(lambda: svc.admission.admitted("cgan") == 0, "the expired request to end")
            assert embedder.calls == 0  # nothing after generation ran
            client.timeout = WAIT
            assert len(client.generate_and_retrieve(BAG, num_samples=1, top_k=3).products) == 3
            assert embedder.calls == 1
    finally:
        held.release.set()
        running.stop(grace=1)


# --- admission control -------------------------------------------------------------------------


def test_beyond_the_queue_bound_requests_are_refused_at_once_naming_it(service):
    held = HeldGenerator(service.models["cgan"].generator)
    svc = make_service(service, generator=held, max_queue_per_model=1)
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client:
            first, outcome = in_thread(client.generate_and_retrieve, BAG, num_samples=1, top_k=2)
            assert held.entered.wait(WAIT)
            with pytest.raises(grpc.RpcError) as error:  # answered while the first is still held
                client.generate_and_retrieve(BAG, num_samples=1)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(max_queue_per_model = 1)" in error.value.details() and "'cgan'" in error.value.details()
            assert client.health() == "SERVING" and client.get_schema().default_model == "cgan"
            held.release.set()
            first.join(WAIT)
            assert len(outcome["result"].products) == 2
            assert len(client.generate_and_retrieve(BAG, num_samples=1, top_k=2).products) == 2
    finally:
        held.release.set()
        running.stop(grace=1)


def test_requests_within_the_bound_wait_their_turn(service):
    held = HeldGenerator(service.models["cgan"].generator)
    svc = make_service(service, generator=held, max_queue_per_model=2, max_running_per_model=1)
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client:
            first, first_outcome = in_thread(client.generate_and_retrieve, BAG, num_samples=1, top_k=2)
            assert held.entered.wait(WAIT)
            second, second_outcome = in_thread(client.generate_and_retrieve, BAG, num_samples=1, top_k=3)
            wait_until(lambda: svc.admission.admitted("cgan") == 2, "the second request to queue")
            with pytest.raises(grpc.RpcError) as error:
                client.generate_and_retrieve(BAG)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "= 2)" in error.value.details()
            held.release.set()
            first.join(WAIT), second.join(WAIT)
            assert len(first_outcome["result"].products) == 2 and len(second_outcome["result"].products) == 3
    finally:
        held.release.set()
        running.stop(grace=1)


def test_a_deadline_passing_in_the_queue_stops_the_request_there(service):
    held = HeldGenerator(service.models["cgan"].generator)
    embedder_calls = CountingEmbedder(service.embedder)
    svc = make_service(service, generator=held, embedder=embedder_calls, max_queue_per_model=2, max_running_per_model=1)
    first, outcome = in_thread(svc.generate_and_retrieve, RetrievalRequest(BAG, num_samples=1, top_k=2))
    try:
        assert held.entered.wait(WAIT)  # the one batch worker is busy with the first request
        with pytest.raises(DeadlineExceeded, match=r"waited in model 'cgan''s batch queue \(max_running_per_model = 1\); "
                                                   r"not run: generate, embed, search, merge"):
            svc.generate_and_retrieve(RetrievalRequest(BAG, num_samples=1), time_remaining=0.05)
        assert svc.admission.admitted("cgan") == 1 and embedder_calls.calls == 0
    finally:
        held.release.set()
        first.join(WAIT)
    assert len(outcome["result"].products) == 2 and embedder_calls.calls == 1  # only the first was embedded
    assert svc.admission.admitted("cgan") == 0


def test_admission_in_process_counts_and_releases(service):
    svc = make_service(service, max_queue_per_model=1)
    with svc.admission.slot("cgan"):
        with pytest.raises(Overloaded, match=r"model 'cgan' has 1 requests running or waiting.*max_queue_per_model = 1"):
            svc.generate_and_retrieve(RetrievalRequest(BAG, num_samples=1))
    assert svc.admission.admitted("cgan") == 0
    assert len(svc.generate_and_retrieve(RetrievalRequest(BAG, num_samples=1, top_k=1)).products) == 1


class KnownBatcher:
    """A model's batcher as admission sees it, with a batch time per row the test sets."""

    def __init__(self, seconds_per_row: float | None, max_workers: int):
        self.seconds_per_row, self.max_workers = seconds_per_row, max_workers


def test_admission_waits_while_the_expected_wait_fits_the_deadline_and_refuses_beyond():
    batcher = KnownBatcher(None, max_workers=2)
    admission = Admission(Limits(default_deadline_seconds=0.7), {"m": batcher})
    with contextlib.ExitStack() as held:
        for _ in range(3):  # before any measurement, every request is admitted
            held.enter_context(admission.slot("m", rows=10, deadline=0.01))
        assert (admission.admitted("m"), admission.rows("m"), admission.expected_wait("m")) == (3, 30, None)
    batcher.seconds_per_row = 0.1  # 10 rows ahead, 2 workers: 10 x 0.1 / 2 = 0.5 s
    with admission.slot("m", rows=10, deadline=0.01):
        assert admission.expected_wait("m") == pytest.approx(0.5)
        with pytest.raises(Overloaded) as refused:
            with admission.slot("m", rows=10, deadline=0.4):
                pass
        message = str(refused.value)
        for fragment in ("model 'm'", "expected wait 0.50 s (10 rows ahead x 100.0 ms per row / 2 batch workers)",
                         "exceeds the deadline of 0.40 s (the caller's)", "1 requests running or waiting",
                         "max_queue_per_model = 256"):
            assert fragment in message, (fragment, message)
        with admission.slot("m", rows=10, deadline=0.6):  # 0.5 s fits 0.6 s: it waits its turn
            assert admission.admitted("m") == 2
            with pytest.raises(Overloaded, match=r"expected wait 1\.00 s .* deadline of 0\.70 s \(none given: the "
                                                 r"server's default_deadline_seconds\)"):
                with admission.slot("m", rows=1):  # no deadline of its own: the server's default
                    pass
    assert (admission.admitted("m"), admission.rows("m"), admission.peak("m")) == (0, 0, 3)


def test_the_hard_cap_refuses_at_once_whatever_the_estimate_and_the_queue_never_exceeds_it(service):
    held = HeldGenerator(service.models["cgan"].generator)
    svc = make_service(service, generator=held, max_queue_per_model=3, max_running_per_model=1)
    running = start_server(svc)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AtelierStub(channel)
            request = pb.GenerateAndRetrieveRequest(attributes={"category": pb.AttributeValues(values=["Bag"])},
                                                    num_samples=1, top_k=2)
            calls = [stub.GenerateAndRetrieve.future(request, timeout=WAIT) for _ in range(10)]
            # 7 refused while the 3 admitted are still held: the refusals came back first
            wait_until(lambda: sum(c.done() for c in calls) == 7, "the refusals")
            refused = [c for c in calls if c.done()]
            assert all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
            assert all("(max_queue_per_model = 3)" in c.details() for c in refused)
            assert svc.admission.admitted("cgan") == 3
            held.release.set()
            assert sum(len(c.result().products) == 2 for c in calls if c not in refused) == 3
        assert svc.admission.peak("cgan") == 3 and svc.admission.admitted("cgan") == 0
    finally:
        held.release.set()
        running.stop(grace=1)


def test_a_burst_of_64_on_the_default_settings_is_answered(server):
    """The default admission lets a burst wait for its turn instead of failing it."""
    assert server.service.limits.max_queue_per_model == Limits.max_queue_per_model  # the defaults
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AtelierStub(channel)
        for seed in range(3):  # a few lone requests first: the batch time is measured
            stub.GenerateAndRetrieve(pb.GenerateAndRetrieveRequest(
                attributes={"category": pb.AttributeValues(values=["Bag"])}, seed=seed), timeout=WAIT)
        calls = [stub.GenerateAndRetrieve.future(pb.GenerateAndRetrieveRequest(
                     attributes={"category": pb.AttributeValues(values=[CLASS_NAMES[i % 10]])}, seed=i), timeout=5)
                 for i in range(64)]
        codes = [c.code() for c in calls]
    ok = codes.count(grpc.StatusCode.OK)
    assert ok >= 0.95 * 64, Counter(c.name for c in codes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_a_burst_that_cannot_fit_its_deadline_is_refused_at_once_and_the_rest_answered(service, monkeypatch):
    """The model's forward slowed deliberately: 1 s per batch, whatever its rows; while `gate` is
    clear it also waits for the test, so nothing admitted can finish until the test says so."""
    real_generate, gate = batching.generate, threading.Event()
    gate.set()

    def slowed(*args, **kwargs):
        time.sleep(1.0)
        assert gate.wait(WAIT), "the test never opened the gate"
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(batching, "generate", slowed)
    svc = make_service(service, max_running_per_model=1)
    running = start_server(svc)
    bag = {"category": pb.AttributeValues(values=["Bag"])}
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AtelierStub(channel)
            stub.GenerateAndRetrieve(pb.GenerateAndRetrieveRequest(attributes=bag, num_samples=1), timeout=WAIT)
            # measured: a batch of one row ran one 8-row chunk, so at least 1 s / 8 per row
            assert svc.batchers["cgan"].seconds_per_row >= 1.0 / 8
            gate.clear()
            calls = [stub.GenerateAndRetrieve.future(pb.GenerateAndRetrieveRequest(attributes=bag, num_samples=1, seed=i),
                                                     timeout=4) for i in range(48)]
            # one worker, deadline 4 s: at most 33 fit (0..32 rows ahead at 1/8 s), the rest cannot
            wait_until(lambda: sum(c.done() for c in calls) + svc.admission.admitted("cgan") == len(calls),
                       "every call admitted or refused")
            refused = [c for c in calls if c.done()]  # nothing admitted can have finished: the gate is shut
            assert len(refused) >= 15 and all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
            for fragment in ("expected wait", "ms per row / 1 batch workers) exceeds the deadline of",
                             "(the caller's)", "max_queue_per_model = 256"):
                assert fragment in refused[-1].details(), (fragment, refused[-1].details())
            # RetrieveSimilar (an image as the query) waits in the same queue, and is refused the same way
            image = encode_png(np.zeros((28, 28, 1), np.uint8))
            with pytest.raises(grpc.RpcError) as similar:
                stub.RetrieveSimilar(pb.RetrieveSimilarRequest(image=image, top_k=2), timeout=3)
            assert similar.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "expected wait" in similar.value.details()
            admitted = [c for c in calls if c not in refused]
            assert admitted and not any(c.done() for c in admitted)  # all still waiting behind the gate
            gate.set()
            assert all(len(c.result().products) == 10 for c in admitted)  # answered in time: the next batch takes all
        assert svc.admission.admitted("cgan") == 0
    finally:
        gate.set()
        running.stop(grace=1)


# --- health ------------------------------------------------------------------------------------


def test_health_is_not_serving_while_loading_serving_then_not_serving_during_graceful_stop(service):
    held = HeldGenerator(service.models["cgan"].generator)
    loaded = threading.Event()

    def slow_loader():  # a stand-in for loading big models and a big index
        assert loaded.wait(WAIT)
        return make_service(service, generator=held)

    running = start_server(None, limits=Limits())
    target = running.target
    with AtelierClient(target, timeout=WAIT) as client:
        loader, load_outcome = in_thread(running.load, slow_loader)
        assert health_of(target) == "NOT_SERVING" and client.health("atelier.v1.Atelier") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as error:
            client.generate_and_retrieve(BAG)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
        loaded.set()
        loader.join(WAIT)
        assert "error" not in load_outcome
        assert health_of(target) == "SERVING"

        in_flight, outcome = in_thread(client.generate_and_retrieve, BAG, num_samples=1, top_k=2)
        assert held.entered.wait(WAIT)
        running.begin_shutdown()
        assert health_of(target) == "NOT_SERVING"  # still answering, so balancers can see it
        stopper, _ = in_thread(running.stop, grace=WAIT)

        def refusing_new_calls() -> bool:
            try:
                health_of(target)
                return False
            except grpc.RpcError:
                return True

        wait_until(refusing_new_calls, "the server to refuse new calls")
        held.release.set()
        in_flight.join(WAIT)
        assert len(outcome["result"].products) == 2  # the in-flight call finished
        stopper.join(WAIT)
        assert not stopper.is_alive()


# --- index hot swap ----------------------------------------------------------------------------


class Load:
    """Client threads looping requests; records (started after `mark`?, version or error)."""

    def __init__(self, target: str, threads: int = 4):
        self.target, self.stop = target, threading.Event()
        self.mark = threading.Event()
        self.results: list[tuple[bool, str | None, str | None]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i: int) -> None:
        with AtelierClient(self.target, timeout=WAIT) as client:
            n = 0
            while not self.stop.is_set():
                after = self.mark.is_set()
                try:
                    response = client.generate_and_retrieve({"category": CLASS_NAMES[(i + n) % 10]},
                                                            num_samples=1, top_k=3, seed=n)
                    outcome = (after, response.index_version, None)
                except grpc.RpcError as error:
                    outcome = (after, None, f"{error.code().name}: {error.details()}")
                with self.lock:
                    self.results.append(outcome)
                n += 1

    def count(self, after: bool) -> int:
        with self.lock:
            return sum(1 for a, _, _ in self.results if a == after)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_until(lambda: self.count(False) >= 2 * len(self.threads), "requests before the swap")
        return self

    def swapped(self) -> None:
        """Call once the swap is known done: requests started from now on must see it."""
        self.mark.set()
        wait_until(lambda: self.count(True) >= 2 * len(self.threads), "requests after the swap")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)


def test_reload_index_swaps_under_load_without_a_failed_request(service, own_index, small_index):
    svc = make_service(service, index=IndexDirectory.open(own_index), index_source=own_index)
    old = svc.index.version
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client, Load(running.target) as load:
            assert client.reload_index().swapped is False  # nothing new published yet
            new = publish_copy(small_index, own_index)
            reply = client.reload_index()
            assert (reply.index_version, reply.previous_version, reply.swapped) == (new, old, True)
            load.swapped()
            assert client.get_schema().index.version == new
        errors = [e for _, _, e in load.results if e]
        assert not errors, errors[:3]
        assert {v for after, v, _ in load.results if after} == {new}
        assert {v for _, v, _ in load.results} <= {old, new}
    finally:
        running.stop(grace=1)


def test_the_watcher_swaps_to_a_newly_published_index_under_load(service, own_index, small_index):
    svc = make_service(service, index=IndexDirectory.open(own_index), index_source=own_index)
    running = start_server(svc, watch_index=0.05)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client, Load(running.target) as load:
            new = publish_copy(small_index, own_index)
            wait_until(lambda: client.get_schema().index.version == new, "the watcher to swap")
            load.swapped()
        errors = [e for _, _, e in load.results if e]
        assert not errors, errors[:3]
        assert {v for after, v, _ in load.results if after} == {new}
    finally:
        running.stop(grace=1)


def test_a_broken_new_index_is_refused_with_the_reason_and_the_old_keeps_serving(service, own_index, small_index, caplog):
    svc = make_service(service, index=IndexDirectory.open(own_index), index_source=own_index)
    old = svc.index.version
    running = start_server(svc)
    try:
        with AtelierClient(running.target, timeout=WAIT) as client:
            corrupt = publish_copy(small_index, own_index, corrupt=True)
            with caplog.at_level(logging.ERROR, logger="atelier.retrieval"), pytest.raises(grpc.RpcError) as error:
                client.reload_index()
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"index version {corrupt}" in error.value.details()
            assert "index.faiss does not match its sha256" in error.value.details()
            assert f"still serving {old}" in error.value.details()
            assert any("does not match its sha256" in r.getMessage() for r in caplog.records)
            assert client.generate_and_retrieve(BAG, num_samples=1, top_k=2).index_version == old

            schema = svc.index.schema.to_dict()
            schema["groups"][0]["values"] = ["Tee", *schema["groups"][0]["values"][1:]]
            publish_copy(small_index, own_index, schema=schema)
            with pytest.raises(grpc.RpcError) as error:
                client.reload_index()
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "model 'cgan' does not fit index" in error.value.details()
            assert "values ['T-shirt/top'] that the other schema lacks" in error.value.details()
            assert client.generate_and_retrieve(BAG, num_samples=1, top_k=2).index_version == old

            good = publish_copy(small_index, own_index)  # a refusal does not wedge later swaps
            assert client.reload_index().index_version == good
            assert client.generate_and_retrieve(BAG, num_samples=1, top_k=2).index_version == good
    finally:
        running.stop(grace=1)


def test_the_watcher_refuses_a_broken_index_once_and_keeps_serving(service, own_index, small_index):
    svc = make_service(service, index=IndexDirectory.open(own_index), index_source=own_index)
    old = svc.index.version
    running = start_server(svc, watch_index=0.05)
    try:
        corrupt = publish_copy(small_index, own_index, corrupt=True)
        wait_until(lambda: corrupt in running.watcher.refused, "the watcher to refuse the broken version")
        assert "does not match its sha256" in running.watcher.refused[corrupt]
        with AtelierClient(running.target, timeout=WAIT) as client:
            assert client.generate_and_retrieve(BAG, num_samples=1, top_k=2).index_version == old
            assert client.health() == "SERVING"
    finally:
        running.stop(grace=1)


def test_reload_in_process_reuses_the_embedder_and_refuses_without_swapping(service, own_index, small_index):
    svc = make_service(service, index=IndexDirectory.open(own_index), index_source=own_index)
    served = svc.served
    publish_copy(small_index, own_index, corrupt=True)
    with pytest.raises(IndexRefused):
        svc.reload_index()
    assert svc.served is served
    new = publish_copy(small_index, own_index)
    assert svc.reload_index() == (new, True)
    assert svc.embedder is served.embedder and svc.index is not served.index


# --- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(attributes=BAG, model="../../../etc/passwd"), "unknown model '../../../etc/passwd'; available: cgan"),
    (dict(attributes=BAG, model="/tmp"), "unknown model '/tmp'"),
    (dict(attributes={"../category": "Bag"}), "unknown attribute '../category'; allowed: category"),
    (dict(attributes={"category": "../../manifest.json"}), "unknown value '../../manifest.json'"),
])
def test_no_request_field_is_a_path(client, kwargs, fragment):
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve(**kwargs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()


def test_reload_index_takes_no_path():
    """The server reloads only the path it was started with: ReloadIndex has nothing to name one."""
    assert not pb.ReloadIndexRequest.DESCRIPTOR.fields
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        if message.name.endswith("Request"):
            assert not [f.name for f in message.fields if any(w in f.name for w in ("path", "file", "dir"))]


def test_bytes_that_are_no_request_get_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/atelier.v1.Atelier/GenerateAndRetrieve")
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff\xff\xff", timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid atelier.v1.GenerateAndRetrieveRequest" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:  # a string field with invalid UTF-8
            call(b"\x12\x02\xc3\x28", timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_help_lists_the_reliability_flags():
    out = subprocess.run([sys.executable, "-m", "atelier.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=WAIT).stdout
    for flag in ("--max-queue", "--max-running", "--max-candidates", "--max-request-bytes", "--max-response-bytes",
                 "--watch-index", "--grace", "--drain", "--default-deadline", "--metrics", "--log-format"):
        assert flag in out
