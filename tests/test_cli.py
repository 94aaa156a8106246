"""The command line as a user runs it: separate processes, a real server, a real client."""

import json
import signal
import subprocess
import sys

from conftest import listening_port

ATELIER = [sys.executable, "-m", "atelier.cli"]


def run(*args, timeout=120):
    return subprocess.run([*ATELIER, *args], capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_verb():
    out = run("--help").stdout
    for verb in ("import", "train", "index", "serve", "query", "demo"):
        assert verb in out
    assert "--max-seconds" in run("train", "--help").stdout


def test_errors_are_one_clear_line(tmp_path):
    result = run("index", "--catalogue", str(tmp_path / "nope"), "--out", str(tmp_path / "i"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"atelier index: error: {tmp_path / 'nope'} does not exist"


def test_serve_and_query(small_index, tiny_model, tmp_path):
    server = subprocess.Popen([*ATELIER, "serve", "--index", str(small_index), "--model", f"tiny={tiny_model}",
                               "--address", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = listening_port(server)
        target = f"127.0.0.1:{port}"
        ok = run("query", "--target", target, "--attr", "category=Dress", "--top-k", "3", "--seed", "1", "--json",
                 "--images-out", str(tmp_path / "images"))
        assert ok.returncode == 0, ok.stderr
        body = json.loads(ok.stdout)
        assert len(body["products"]) == 3 and body["model"] == "tiny"
        assert len(list((tmp_path / "images").glob("sample-*.png"))) == 4
        schema = run("query", "--target", target, "--schema")
        assert json.loads(schema.stdout)["models"][0]["name"] == "tiny"
        bad = run("query", "--target", target, "--attr", "category=Gown")
        assert bad.returncode == 2 and "INVALID_ARGUMENT: unknown value 'Gown'" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
