"""What operators watch (atelier/server/telemetry.py): Prometheus metrics scraped over real HTTP,
request ids in gRPC metadata and HTTP headers, and one JSON log line per call."""

from __future__ import annotations

import json
import logging
import re
import shutil
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atelier import artifacts
from atelier.retrieval.service import LoadedModel, RetrievalService
from atelier.retrieval.stages import ALL
from atelier.server.app import start_server
from atelier.server.telemetry import JsonFormatter, Telemetry, accept_request_id
from atelier.server.wire import pb, pb_grpc

WAIT = 60  # seconds: an upper bound on waiting, never a measured duration
HEX_ID = re.compile(r"[0-9a-f]{32}")


def fresh_service(service: RetrievalService, index_source=None) -> RetrievalService:
    """A service of its own (its own batcher and counters) from the session's loaded pieces."""
    model = service.models["cgan"]
    return RetrievalService(service.index, service.embedder,
                            {"cgan": LoadedModel("cgan", model.generator, model.manifest)}, service.limits,
                            index_source=index_source)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The metrics at `url`, parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def request(category: str = "Bag", **fields) -> pb.GenerateAndRetrieveRequest:
    return pb.GenerateAndRetrieveRequest(attributes={"category": pb.AttributeValues(values=[category])}, **fields)


def post(url: str, body: dict | bytes, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=WAIT) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


@pytest.fixture()
def served(service):
    running = start_server(fresh_service(service), "127.0.0.1:0", http_address="127.0.0.1:0")
    yield running
    running.stop(grace=1)


def test_metrics_count_calls_by_method_and_code_and_the_histograms_count_them(served):
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.AtelierStub(channel)
        for seed in range(3):
            stub.GenerateAndRetrieve(request(num_samples=2, top_k=3, seed=seed), timeout=WAIT)
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.GenerateAndRetrieve(request("Gown"), timeout=WAIT)
        stub.GetSchema(pb.GetSchemaRequest(), timeout=WAIT)
    url = served.http.url
    body = {"attributes": {"category": {"values": ["Coat"]}}, "numSamples": 1, "topK": 2}
    assert post(url + "v1/generate-and-retrieve", body)[0] == 200
    assert post(url + "v1/generate-and-retrieve", b"{not json")[0] == 400
    samples = scrape(url + "metrics")

    calls = "atelier_requests_total"
    assert value(samples, calls, face="grpc", method="GenerateAndRetrieve", code="OK") == 3
    assert value(samples, calls, face="grpc", method="GenerateAndRetrieve", code="INVALID_ARGUMENT") == 2
    assert value(samples, calls, face="grpc", method="GetSchema", code="OK") == 1
    assert value(samples, calls, face="http", method="GenerateAndRetrieve", code="OK") == 1  # the HTTP face's call
    http = "atelier_http_requests_total"
    assert value(samples, http, route="/v1/generate-and-retrieve", code="200") == 1
    assert value(samples, http, route="/v1/generate-and-retrieve", code="400") == 1  # never reached the servicer
    assert value(samples, "atelier_request_seconds_count", face="grpc", method="GenerateAndRetrieve", code="OK") == 3
    assert value(samples, "atelier_request_seconds_count", face="grpc", method="GenerateAndRetrieve",
                 code="INVALID_ARGUMENT") == 2
    for stage in ALL:  # every answered call, gRPC or HTTP, in every stage
        assert value(samples, "atelier_stage_seconds_count", method="GenerateAndRetrieve", model="cgan", stage=stage) == 4
        assert value(samples, "atelier_stage_seconds_sum", method="GenerateAndRetrieve", model="cgan", stage=stage) >= 0
    # batches: every answered request was in one, with its rows
    assert value(samples, "atelier_batch_requests_sum", model="cgan") == 4
    assert value(samples, "atelier_batch_rows_sum", model="cgan") == 3 * 2 + 1
    assert value(samples, "atelier_batch_rows_count", model="cgan") == value(samples, "atelier_batch_seconds_count",
                                                                           model="cgan") >= 1
    assert value(samples, "atelier_queue_depth", model="cgan") == 0  # nothing running now
    assert value(samples, "atelier_batch_seconds_per_row", model="cgan") > 0
    service = served.service
    assert value(samples, "atelier_model_info", model="cgan", family="cgan", version=service.models["cgan"].version) == 1
    index = [labels for (name, labels) in samples if name == "atelier_index_info"]
    assert len(index) == 1 and dict(index[0])["version"] == service.index.version


def test_the_index_info_follows_a_hot_swap(service, small_index, tmp_path):
    dest = tmp_path / "index"
    publish_copy(small_index, dest)
    running = start_server(fresh_service(service, index_source=dest), "127.0.0.1:0", http_address="127.0.0.1:0")
    try:
        before = running.service.index.version
        new = publish_copy(small_index, dest)
        with grpc.insecure_channel(running.target) as channel:
            assert pb_grpc.AtelierStub(channel).ReloadIndex(pb.ReloadIndexRequest(), timeout=WAIT).swapped
        versions = [dict(labels)["version"] for (name, labels) in scrape(running.http.url + "metrics")
                    if name == "atelier_index_info"]
        assert versions == [new] and new != before
    finally:
        running.stop(grace=1)


def test_metrics_on_a_port_of_their_own_and_each_server_counts_its_own(service, served):
    other = start_server(fresh_service(service), "127.0.0.1:0", metrics_address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(other.target) as channel:
            pb_grpc.AtelierStub(channel).GetSchema(pb.GetSchemaRequest(), timeout=WAIT)
        own = scrape(f"http://127.0.0.1:{other.metrics_port}/metrics")
        assert value(own, "atelier_requests_total", face="grpc", method="GetSchema", code="OK") == 1
        assert value(scrape(served.http.url + "metrics"), "atelier_requests_total", face="grpc", method="GetSchema",
                     code="OK") == 0  # two servers in one process: two registries
    finally:
        other.stop(grace=1)
    with pytest.raises(OSError):  # stopped with the server
        urllib.request.urlopen(f"http://127.0.0.1:{other.metrics_port}/metrics", timeout=5)


def request_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "atelier.requests"]


def test_each_call_is_one_json_line_and_its_id_comes_back_in_the_metadata(served, caplog):
    caplog.set_level(logging.INFO, logger="atelier.requests")
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.AtelierStub(channel)
        asked = request("bag", num_samples=2, top_k=3, seed=5,
                        filters={"category": pb.AttributeValues(values=["Bag", "Coat"])})
        _, call = stub.GenerateAndRetrieve.with_call(asked, metadata=(("x-request-id", "shop-42.a"),), timeout=WAIT)
        assert dict(call.trailing_metadata())["x-request-id"] == "shop-42.a"
        _, call = stub.GenerateAndRetrieve.with_call(request(num_samples=1), timeout=WAIT)
        fresh = dict(call.trailing_metadata())["x-request-id"]
        assert HEX_ID.fullmatch(fresh)
        with pytest.raises(grpc.RpcError) as refused:  # an error carries its id too
            stub.GenerateAndRetrieve(request("Gown"), metadata=(("x-request-id", "bad one"),), timeout=WAIT)
        refused_id = dict(refused.value.trailing_metadata())["x-request-id"]
        assert HEX_ID.fullmatch(refused_id)  # a client id with a space is not taken
        stub.RetrieveSimilar(pb.RetrieveSimilarRequest(product_id="train_00003", top_k=2), timeout=WAIT)
    lines = request_lines(caplog)
    assert [line["method"] for line in lines] == ["GenerateAndRetrieve"] * 3 + ["RetrieveSimilar"]
    first, second, error, similar = lines
    assert first["request_id"] == "shop-42.a" and first["face"] == "grpc" and first["code"] == "OK"
    assert first["model"] == "cgan" and first["attributes"] == {"category": ["bag"]}
    assert first["filters"] == {"category": ["Bag", "Coat"]}
    assert (first["num_samples"], first["top_k"], first["seed"], first["products"]) == (2, 3, 5, 3)
    assert list(first["stages_ms"]) == list(ALL) and all(ms >= 0 for ms in first["stages_ms"].values())
    assert first["total_ms"] >= sum(first["stages_ms"].values()) * 0.5 > 0  # the call's own clock
    assert second["request_id"] == fresh
    assert error["request_id"] == refused_id and error["code"] == "INVALID_ARGUMENT"
    assert "unknown value 'Gown'" in error["details"] and error["stages_ms"] == {}
    assert similar["product_id"] == "train_00003" and similar["code"] == "OK"


def test_the_http_face_takes_and_returns_x_request_id_and_logs_the_call(served, caplog):
    caplog.set_level(logging.INFO, logger="atelier.requests")
    url = served.http.url + "v1/generate-and-retrieve"
    body = {"attributes": {"category": {"values": ["Dress"]}}, "numSamples": 1, "topK": 2}
    status, headers = post(url, body, {"X-Request-Id": "web-7"})
    assert status == 200 and headers["X-Request-Id"] == "web-7"
    status, headers = post(url, body)
    assert status == 200 and HEX_ID.fullmatch(headers["X-Request-Id"])
    fresh = headers["X-Request-Id"]
    status, headers = post(url, b"{not json", {"X-Request-Id": "web-8"})  # every answer carries it
    assert status == 400 and headers["X-Request-Id"] == "web-8"
    lines = request_lines(caplog)
    assert [(line["request_id"], line["face"], line["code"]) for line in lines] == [("web-7", "http", "OK"),
                                                                                  (fresh, "http", "OK")]
    assert lines[0]["attributes"] == {"category": ["Dress"]} and lines[0]["model"] == "cgan"


def test_request_ids_log_fields_and_the_json_formatter():
    assert accept_request_id("abc-DEF_1.2:3") == "abc-DEF_1.2:3"
    for bad in (None, "", "a b", "x" * 129, "é", "a\r\nSet-Cookie: x"):
        assert HEX_ID.fullmatch(accept_request_id(bad))
    telemetry = Telemetry()
    with telemetry.call("GenerateAndRetrieve", object()) as record:
        record.ask("cgan", attributes={"category": ["x" * 1000]}, filters={}, seed=None)
    fields = record.log_fields()
    assert fields["attributes"]["category"][0] == "x" * 100 + "..." and "filters" not in fields and "seed" not in fields
    formatter = JsonFormatter()
    plain = logging.LogRecord("atelier.server", logging.WARNING, __file__, 1, "port %d bound", (5,), None)
    assert {k: v for k, v in json.loads(formatter.format(plain)).items() if k != "time"} == {
        "level": "WARNING", "logger": "atelier.server", "message": "port 5 bound"}
    line = logging.LogRecord("atelier.requests", logging.INFO, __file__, 1, "%s", (json.dumps(fields),), None)
    line.atelier_request = fields
    assert {k: v for k, v in json.loads(formatter.format(line)).items() if k not in ("time", "level", "logger")} == fields


def publish_copy(source, dest) -> str:
    """A copy of the index version `source` published at `dest` as a new version; returns its name."""
    folder = artifacts.resolve(source)
    with artifacts.staging(dest) as stage:
        for file in folder.iterdir():
            shutil.copy2(file, stage / file.name)
        return artifacts.publish(stage, dest).name
