"""Fuzzing the real server over a real socket: generated requests, and random bytes on the wire.

Whatever a client sends, the answer is OK or a status that blames the request (never INTERNAL),
the server stays up, and its memory does not grow with the number of requests. Run alone with

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_servicer_fuzz.py -q -s    # -s prints the counts and RSS

Tests run in file order: the first records the RSS after a warm-up, the last compares.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in the [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from atelier.catalog.fashion_mnist import CLASS_NAMES  # noqa: E402
from atelier.retrieval.service import Limits, RetrievalService  # noqa: E402
from atelier.server.app import start_server  # noqa: E402
from atelier.server.wire import pb, pb_grpc  # noqa: E402

# What a request may be answered with: success, or the caller's (or the caller's deadline's) fault.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
LIMITS = Limits(max_num_samples=4, max_top_k=16, max_candidates=32, default_num_samples=2, default_top_k=4,
                max_attributes=8, max_values_per_attribute=8, max_string_length=64, max_request_bytes=64 << 10)
RSS_GROWTH_BOUND_MB = 200  # generous: allocator and gRPC buffers settle; a leak per request would not
SETTINGS = dict(deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

outcomes: Counter[str] = Counter()  # "method code" -> count, printed at the end
rss_mb: dict[str, float] = {}


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def fuzz_server(service):
    """The session's model and index behind tight limits, so valid requests stay cheap."""
    served = RetrievalService(service.index, service.embedder, dict(service.models), LIMITS)
    running = start_server(served)
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        yield ch


def call(channel, request) -> grpc.StatusCode:
    stub = pb_grpc.AtelierStub(channel)
    try:
        response = stub.GenerateAndRetrieve(request, timeout=60)
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, f"{code.name}: {error.details()} for {request!r:.300}"
        assert error.details(), f"{code.name} without a message"
        outcomes[f"GenerateAndRetrieve {code.name}"] += 1
        return code
    k = request.top_k or LIMITS.default_top_k
    assert 1 <= len(response.products) <= k and response.num_samples >= 1
    assert len(response.images) == (response.num_samples if request.return_images else 0)
    assert all(-1.0001 <= p.score <= 1.0001 for p in response.products)
    outcomes["GenerateAndRetrieve OK"] += 1
    return grpc.StatusCode.OK


def raw_call(channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send `data` as the request body as is (no serializer), so anything reaches the server."""
    try:
        channel.unary_unary(f"/atelier.v1.Atelier/{method}")(data, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, f"{method}: {code.name}: {error.details()} for {data[:100]!r}"
    outcomes[f"{method} (bytes) {code.name}"] += 1
    return code


def request_of(attributes, model="", num_samples=0, top_k=0, seed=None, return_images=False):
    request = pb.GenerateAndRetrieveRequest(
        attributes={k: pb.AttributeValues(values=v) for k, v in attributes.items()},
        model=model, num_samples=num_samples, top_k=top_k, return_images=return_images,
    )
    if seed is not None:
        request.seed = seed
    return request


# --- strategies ----------------------------------------------------------------------------------

uint32 = st.one_of(st.integers(0, 6), st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 1]))
seed = st.one_of(st.none(), st.integers(0, 2**64 - 1))
# Long, but mostly within max_request_bytes: gRPC takes 0.1-1 s to refuse an oversized message
# on this machine, so those few are sent on purpose in test_oversized_and_concurrent_requests.
huge = st.integers(60, 20_000).map(lambda n: "x" * n)
text = st.one_of(st.text(max_size=80), huge, st.sampled_from(["", " ", "\x00", "\u202e", "é", "💃", "../", "/etc/passwd"]))
group_name = st.one_of(st.just("category"), st.sampled_from(["Category", "CATEGORY", "colour", "../category"]), text)
value = st.one_of(st.sampled_from(CLASS_NAMES), st.sampled_from(CLASS_NAMES).map(str.swapcase), text)
attributes = st.dictionaries(group_name, st.lists(value, max_size=12), max_size=12)
model = st.one_of(st.sampled_from(["", "cgan", "CGAN", "../cgan", "cgan\x00"]), text)
# Mostly well-formed requests, so the whole path (generate, embed, search, merge, encode) runs.
valid = st.builds(request_of, st.builds(lambda v: {"category": [v]}, st.sampled_from(CLASS_NAMES)),
                  st.sampled_from(["", "cgan"]), st.integers(0, 4), st.integers(0, 8), seed, st.booleans())
anything = st.builds(request_of, attributes, model, uint32, uint32, seed, st.booleans())


# --- the tests, in order ---------------------------------------------------------------------------


def test_warm_up_then_record_rss(channel):
    for i in range(60):
        call(channel, request_of({"category": [CLASS_NAMES[i % 10]]}, num_samples=1 + i % 4, top_k=1 + i % 8,
                                 seed=i, return_images=i % 2 == 0))
        call(channel, request_of({"category": ["Gown"]}))
    rss_mb["before"] = vm_rss_mb()


@settings(max_examples=1200, **SETTINGS)
@given(request=st.one_of(valid, anything))
def test_generated_requests(channel, request):
    call(channel, request)


@settings(max_examples=1000, **SETTINGS)
@given(method=st.sampled_from(["GenerateAndRetrieve", "GetSchema", "ReloadIndex"]), data=st.binary(max_size=2048))
def test_random_bytes_on_the_wire(channel, method, data):
    raw_call(channel, method, data)


@settings(max_examples=800, **SETTINGS)
@given(request=valid, edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")),
                                     min_size=1, max_size=6))
def test_mutated_valid_requests(channel, request, edits):
    """Valid messages with bytes replaced, inserted or deleted: parses that go wrong half-way."""
    data = bytearray(request.SerializeToString())
    for position, byte, op in edits:
        i = position % (len(data) + 1)
        if op == "r" and i < len(data):
            data[i] = byte
        elif op == "i":
            data.insert(i, byte)
        elif op == "d" and i < len(data):
            del data[i]
    raw_call(channel, "GenerateAndRetrieve", bytes(data))


def test_oversized_and_concurrent_requests(channel):
    for n in (LIMITS.max_request_bytes + 1, 4 * LIMITS.max_request_bytes):
        assert call(channel, request_of({"category": ["x" * n]})) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raw_call(channel, "GenerateAndRetrieve", b"\x00" * (2 * LIMITS.max_request_bytes)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # Many at once: they wait their turn, or are refused (RESOURCE_EXHAUSTED) where their deadline cannot be met;
    # none fail otherwise.
    failures: list[str] = []

    def burst(i: int) -> None:
        try:
            call(channel, request_of({"category": [CLASS_NAMES[i % 10]]}, num_samples=4, top_k=8, seed=i))
        except AssertionError as error:
            failures.append(str(error))

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]


def test_server_still_serving_and_rss_bounded(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert call(channel, request_of({"category": ["Dress"]}, num_samples=2, top_k=3, seed=1)) == grpc.StatusCode.OK
    rss_mb["after"] = vm_rss_mb()
    total = sum(outcomes.values())
    print(f"\nfuzz: {total} requests; " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    print(f"fuzz: VmRSS after warm-up {rss_mb.get('before', float('nan')):.0f} MB, after {rss_mb['after']:.0f} MB")
    if "before" in rss_mb:
        assert rss_mb["after"] - rss_mb["before"] < RSS_GROWTH_BOUND_MB, rss_mb
