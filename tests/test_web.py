"""The HTTP/JSON face and the web page: plain HTTP against the gRPC answers, then the page itself
in headless Chromium (Debian's chromium and chromium-driver, driven by selenium)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from conftest import REPO, listening_port, missing
from google.protobuf.json_format import MessageToDict

from atelier.server.app import start_server
from atelier.server.client import AtelierClient
from atelier.server.security import SecurityConfig

TROUSERS = {"attributes": {"category": {"values": ["Trouser"]}}, "numSamples": 2, "topK": 5, "seed": "3",
            "returnImages": True, "returnThumbnails": True}
QUERY_TOKEN, ADMIN_TOKEN = "query-token-0123456789abcdef", "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def web(service):
    running = start_server(service, "127.0.0.1:0", max_workers=4, http_address="127.0.0.1:0")
    yield running
    running.stop(grace=1)


@pytest.fixture()
def grpc_client(web):
    with AtelierClient(web.target, timeout=60) as client:
        client.wait_ready()
        yield client


def call(url: str, body=None, headers=None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a GET (no body) or a POST (a dict as JSON, or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def api(running, path: str) -> str:
    return running.http.url + path.lstrip("/")


def grpc_error(call_) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call_()
    return raised.value


# --- HTTP/JSON ------------------------------------------------------------------------------------


def test_an_answer_beyond_max_response_bytes_is_refused_naming_the_limit(small_index, tiny_model):
    from atelier.retrieval.service import Limits, RetrievalService

    limits = Limits(max_num_samples=8, max_top_k=20, max_candidates=100, max_response_bytes=4000)
    running = start_server(RetrievalService.open(small_index, {"cgan": tiny_model}, limits), "127.0.0.1:0",
                           max_workers=4, http_address="127.0.0.1:0")
    try:
        status, answer, _ = call(api(running, "v1/generate-and-retrieve"), {**TROUSERS, "numSamples": 8})
        assert status == 400 and answer["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert "exceeds the server's limit of 4000 bytes" in answer["error"]["message"]
        small = {"attributes": TROUSERS["attributes"], "numSamples": 1, "topK": 1}
        assert call(api(running, "v1/generate-and-retrieve"), small)[0] == 200  # within the limit: answered
    finally:
        running.stop(grace=0)


def test_generate_and_retrieve_over_http_is_the_grpc_answer(web, grpc_client):
    status, answer, headers = call(api(web, "v1/generate-and-retrieve"), TROUSERS)
    assert status == 200 and headers["Content-Type"] == "application/json"
    expected = MessageToDict(grpc_client.generate_and_retrieve(
        {"category": "Trouser"}, num_samples=2, top_k=5, seed=3, return_images=True, return_thumbnails=True))
    assert len(answer["products"]) == 5 and len(answer["images"]) == 2
    assert all(p["thumbnail"] for p in answer["products"])  # base64, as protobuf's JSON mapping writes bytes
    for key in ("products", "images", "seed", "model", "modelVersion", "indexVersion", "numSamples"):
        assert answer[key] == expected[key], key
    assert [t["stage"] for t in answer["timings"]] == [t["stage"] for t in expected["timings"]]


def test_schema_over_http_is_the_grpc_schema(web, grpc_client):
    status, schema, _ = call(api(web, "v1/schema"))
    assert status == 200 and schema == MessageToDict(grpc_client.get_schema())
    assert schema["models"][0]["name"] == "cgan" and "acceptsPartial" not in schema["models"][0]  # false: left out


def test_a_body_that_is_not_json_or_not_the_message_is_400_naming_the_problem(web):
    url = api(web, "v1/generate-and-retrieve")
    status, answer, _ = call(url, b"{not json")
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "not JSON" in answer["error"]["message"] and "line 1 column 2" in answer["error"]["message"]
    status, answer, _ = call(url, b"[1, 2]")
    assert status == 400 and "must be a JSON object" in answer["error"]["message"]
    status, answer, _ = call(url, {"attributes": {"category": {"values": ["Dress"]}}, "topKk": 5})
    assert status == 400 and "topKk" in answer["error"]["message"] and "topK" in answer["error"]["message"]
    status, answer, _ = call(url, {"topK": "many"})
    assert status == 400 and "topK" in answer["error"]["message"]
    status, answer, _ = call(url, b"\xff\xfe{}")
    assert status == 400 and "not UTF-8" in answer["error"]["message"]


def test_a_bad_request_is_400_with_the_grpc_message(web, grpc_client):
    status, answer, _ = call(api(web, "v1/generate-and-retrieve"), {"attributes": {"category": {"values": ["Cape"]}}})
    error = grpc_error(lambda: grpc_client.generate_and_retrieve({"category": "Cape"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status == 400 and answer["error"]["message"] == error.details() and "Dress" in error.details()
    status, answer, _ = call(api(web, "v1/generate-and-retrieve"),
                             {"attributes": {"category": {"values": ["Dress"]}}, "topK": 999})
    assert status == 400 and "top_k 999 out of range: allowed 1..20" in answer["error"]["message"]


def test_unknown_product_is_404_and_a_known_one_is_like_grpc(web, grpc_client):
    status, answer, _ = call(api(web, "v1/retrieve-similar"), {"productId": "no_such_product"})
    assert status == 404 and answer["error"]["status"] == "NOT_FOUND" and "no_such_product" in answer["error"]["message"]
    status, answer, _ = call(api(web, "v1/retrieve-similar"), {"productId": "train_00001", "topK": 4})
    assert status == 200 and answer["products"] == MessageToDict(
        grpc_client.retrieve_similar(product_id="train_00001", top_k=4))["products"]
    assert "train_00001" not in [p["id"] for p in answer["products"]]


def test_a_body_beyond_max_request_bytes_is_413_unread(web):
    limit = web.service.limits.max_request_bytes
    connection = http.client.HTTPConnection("127.0.0.1", web.http.port, timeout=60)
    try:  # the length is declared and never sent: the server must answer without reading it
        connection.putrequest("POST", "/v1/generate-and-retrieve")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(limit + 1))
        connection.endheaders()
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert f"{limit + 1} bytes exceeds the server's limit of {limit} bytes" in answer["error"]["message"]
    assert call(api(web, "v1/schema"))[0] == 200  # and it goes on serving


def test_deadline_header_paths_and_methods(web):
    url = api(web, "v1/generate-and-retrieve")
    dress = {"attributes": {"category": {"values": ["Dress"]}}}
    status, answer, _ = call(url, dress, {"X-Timeout-Seconds": "0"})
    assert status == 504 and answer["error"]["status"] == "DEADLINE_EXCEEDED"
    status, answer, _ = call(url, dress, {"X-Timeout-Seconds": "soon"})
    assert status == 400 and "X-Timeout-Seconds" in answer["error"]["message"]
    assert call(url, dress, {"X-Timeout-Seconds": "30"})[0] == 200
    status, answer, _ = call(api(web, "v1/nothing"))
    assert status == 404 and "POST /v1/generate-and-retrieve" in answer["error"]["message"]
    status, answer, headers = call(api(web, "v1/schema"), dress)
    assert status == 405 and headers["Allow"] == "GET"
    status, answer, headers = call(url)
    assert status == 405 and headers["Allow"] == "POST"


def test_the_page_is_served_from_the_package_with_nothing_from_elsewhere(web):
    with urllib.request.urlopen(web.http.url, timeout=60) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "<script src=\"app.js\">" in page and "://" not in page
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(web.http.url + name, timeout=60) as response:
            assert response.headers["Content-Type"].startswith(kind) and response.read()


def test_unavailable_while_loading(service):
    running = start_server(None, "127.0.0.1:0", http_address="127.0.0.1:0")
    try:
        status, answer, _ = call(api(running, "v1/schema"))
        assert status == 503 and answer["error"]["status"] == "UNAVAILABLE" and "loading" in answer["error"]["message"]
        assert urllib.request.urlopen(running.http.url, timeout=60).status == 200  # the page is up already
        running.attach(service)
        assert call(api(running, "v1/schema"))[0] == 200
    finally:
        running.stop(grace=1)
    with pytest.raises(OSError):  # stopped with the gRPC server
        urllib.request.urlopen(running.http.url, timeout=5)


def test_tokens_are_the_grpc_ports_tokens_with_the_same_rights(service):
    security = SecurityConfig(tokens={QUERY_TOKEN: ["query"], ADMIN_TOKEN: ["admin"]})
    running = start_server(service, "127.0.0.1:0", security=security, http_address="127.0.0.1:0")
    try:
        url = api(running, "v1/schema")
        status, answer, headers = call(url)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert answer["error"]["status"] == "UNAUTHENTICATED" and "missing bearer token" in answer["error"]["message"]
        assert call(url, headers={"Authorization": "Bearer not-a-known-token-at-all"})[0] == 401
        status, answer, _ = call(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 403 and "needs the 'query' right" in answer["error"]["message"]
        assert call(url, headers={"Authorization": f"Bearer {QUERY_TOKEN}"})[0] == 200
        status, _, _ = call(api(running, "v1/generate-and-retrieve"), {"attributes": {"category": {"values": ["Bag"]}}},
                            {"Authorization": f"Bearer {QUERY_TOKEN}"})
        assert status == 200
        assert urllib.request.urlopen(running.http.url, timeout=60).status == 200  # the page holds no data
    finally:
        running.stop(grace=1)


def test_https_with_the_grpc_ports_certificate_and_client_ca(service, tmp_path):
    certificates = pytest.importorskip("test_security", reason="pip install cryptography (in the [test] extra)")
    ca = certificates._CA("web-ca", tmp_path)
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    security = SecurityConfig(server_cert, server_key, client_ca=ca.cert_file)
    running = start_server(service, "127.0.0.1:0", security=security, http_address="127.0.0.1:0")
    try:
        assert running.http.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=ca.cert_file)
        trusting.load_cert_chain(client_cert, client_key)
        with urllib.request.urlopen(api(running, "v1/schema"), context=trusting, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["models"][0]["name"] == "cgan"
        with pytest.raises(OSError):  # no client certificate: refused, as on the gRPC port
            urllib.request.urlopen(api(running, "v1/schema"), context=ssl.create_default_context(cafile=ca.cert_file),
                                   timeout=60).read()
    finally:
        running.stop(grace=1)


def test_cli_serve_with_http(small_index, tiny_model):
    # port 0 for both faces: a port picked here and freed could be taken before the server binds it
    server = subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve", "--index", str(small_index), "--model",
                               f"tiny={tiny_model}", "--address", "127.0.0.1:0", "--http", "127.0.0.1:0"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        listening_port(server)
        line = server.stdout.readline()
        found = re.search(r"HTTP/JSON on (http://127\.0\.0\.1:(\d+)/)$", line.strip())
        assert found and int(found.group(2)) > 0, line
        base = found.group(1)
        status, schema, headers = call(f"{base}v1/schema", headers={"X-Request-Id": "cli-1"})
        assert status == 200 and schema["models"][0]["name"] == "tiny" and headers["X-Request-Id"] == "cli-1"
        with urllib.request.urlopen(f"{base}metrics", timeout=60) as response:
            assert 'atelier_requests_total{code="OK",face="http",method="GetSchema"} 1.0' in response.read().decode()
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
    # --log-format json, the default: every log line is a JSON object; the call is one of them
    lines = [json.loads(line) for line in server.stderr.read().splitlines() if line.strip()]
    calls = [line for line in lines if line["logger"] == "atelier.requests"]
    assert [(c["request_id"], c["method"], c["code"], c["face"]) for c in calls] == [("cli-1", "GetSchema", "OK", "http")]


def test_cli_serve_http_port_taken(small_index, tiny_model):
    """A port another process holds: a one-line error naming the address, exit 2, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "atelier.cli", "serve", "--index", str(small_index), "--model",
                               f"tiny={tiny_model}", "--address", "127.0.0.1:0", "--http", f"127.0.0.1:{taken}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"atelier serve: error: cannot listen for HTTP on 127.0.0.1:{taken}" in done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stdout


# --- the page, in a browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from benchmarks.web_screenshot import browser_missing, open_browser

    reason = browser_missing()
    if reason:
        missing(reason)
    driver = open_browser()
    yield driver
    driver.quit()


def page_query(driver) -> dict[str, list[str]]:
    return parse_qs(urlsplit(driver.current_url).query, keep_blank_values=True)


def products(driver) -> list:
    return driver.find_elements("css selector", "#products li.product")


def test_pick_attributes_go_and_see_drawings_and_products(web, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    from benchmarks.web_screenshot import runs, save_page, wait_for_run, wait_ready

    browser.get(web.http.url)
    wait_ready(browser)
    Select(browser.find_element("id", "attr.category")).select_by_visible_text("Dress")
    top_k = browser.find_element("id", "topK")
    top_k.clear()
    top_k.send_keys("6")
    before = runs(browser)
    browser.find_element("id", "go").click()
    assert wait_for_run(browser, before) == "done", browser.find_element("id", "error").text
    drawings = browser.find_elements("css selector", "#drawings img")
    assert len(drawings) == 4 and all(d.get_attribute("src").startswith("data:image/png;base64,") for d in drawings)
    cards = products(browser)
    assert len(cards) == 6
    assert all(c.find_element("css selector", "img.thumb").get_attribute("src").startswith("data:image/")
               for c in cards)
    assert all(c.find_element("css selector", ".score").text.startswith("score ") for c in cards)
    query = page_query(browser)
    assert query["category"] == ["Dress"] and query["topK"] == ["6"] and query["seed"][0].isdigit()
    assert save_page(browser, tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    seed = query["seed"]
    before = runs(browser)
    browser.find_element("id", "more").click()
    assert wait_for_run(browser, before) == "done"
    assert page_query(browser)["seed"] != seed and page_query(browser)["category"] == ["Dress"]
    assert len(browser.find_elements("css selector", "#drawings img")) == 4 and len(products(browser)) == 6


def test_a_shareable_link_runs_its_query(web, browser):
    from benchmarks.web_screenshot import open_link

    assert open_link(browser, web.http.url, "category=Bag&seed=5&topK=4&numSamples=2") == "done"
    expected = call(api(web, "v1/generate-and-retrieve"),
                    {"attributes": {"category": {"values": ["Bag"]}}, "seed": "5", "topK": 4, "numSamples": 2})[1]
    assert [c.get_attribute("data-id") for c in products(browser)] == [p["id"] for p in expected["products"]]
    assert browser.find_element("id", "attr.category").get_attribute("value") == "Bag"
    assert browser.find_element("id", "seed").get_attribute("value") == "5"
    assert len(browser.find_elements("css selector", "#drawings img")) == 2


def test_a_bad_choice_shows_the_servers_message(web, browser):
    from benchmarks.web_screenshot import open_link, runs, wait_for_run

    assert open_link(browser, web.http.url, "category=Dress&filter.colour=Red") == "error"
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "400: unknown filter group 'colour'; filterable groups: category" in error.text
    assert not products(browser)

    top_k = browser.find_element("id", "topK")  # and through the form: more products than the server allows
    top_k.clear()
    top_k.send_keys("999")
    before = runs(browser)
    browser.find_element("id", "go").click()
    assert wait_for_run(browser, before) == "error"
    assert "top_k 999 out of range: allowed 1..20 (max_top_k" in browser.find_element("id", "error").text


def test_more_like_this_asks_retrieve_similar(web, browser):
    from benchmarks.web_screenshot import open_link, runs, wait_for_run

    assert open_link(browser, web.http.url, "category=Sneaker&seed=2&topK=5") == "done"
    first = products(browser)[0]
    liked = first.get_attribute("data-id")
    before = runs(browser)
    first.find_element("css selector", "button.like").click()
    assert wait_for_run(browser, before) == "done", browser.find_element("id", "error").text
    assert page_query(browser)["like"] == [liked]
    shown = [c.get_attribute("data-id") for c in products(browser)]
    expected = call(api(web, "v1/retrieve-similar"), {"productId": liked, "topK": 5})[1]
    assert shown == [p["id"] for p in expected["products"]] and liked not in shown
