"""Smoke test of benchmarks/serving.py: a real server process, a real socket, seconds of load.

It checks that the benchmark runs and reports what it claims (every level answered, sane
percentiles, both report files); the figures themselves are never asserted.
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repository root off the path
    sys.path.insert(0, str(REPO))


@pytest.mark.slow
def test_serving_benchmark_quick_run(tmp_path, small_index, tiny_model, capsys):
    from benchmarks.serving import main

    argv = ["--quick", "--out", str(tmp_path), "--index", str(small_index), "--model", str(tiny_model),
            "--seconds", "1", "--warmup-seconds", "0.3", "--concurrency", "1,3", "--threads", "1", "--burst", "16"]
    assert main(argv) == 0
    assert "### serving" in capsys.readouterr().out

    json_path, md_path = tmp_path / "serving.json", tmp_path / "serving.md"
    assert json_path.is_file() and md_path.is_file()
    report = json.loads(json_path.read_text())
    assert report["benchmark"] == "serving" and report["command"] and report["machine"]["cpus"] >= 1
    assert report["seconds"] > 0 and len(report["tables"]) == 3  # in process, served, the burst
    assert "### serving" in md_path.read_text()

    for config, served in report["runs"].items():
        # the server's own defaults, nothing raised to keep requests from being shed
        assert served["server"]["limits"]["max_queue_per_model"] == 256, config
        burst = served["burst"]
        assert burst["calls"] == 16 and burst["ok"] + sum(burst["errors_by_code"].values()) == 16, (config, burst)
        in_process = served["server"]["in_process"]
        lat = in_process["latency_ms"]
        assert lat["calls"] > 0 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"], (config, in_process)
        assert {"validate", "generate", "embed", "search", "merge"} <= set(in_process["stages_ms"])
        assert [level["concurrency"] for level in served["levels"]] == [1, 3]
        for level in served["levels"]:
            lat = level["latency_ms"]
            assert level["ok"] > 0 and level["errors_by_code"] == {}, (config, level)
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"], (config, level)
            assert level["qps"] > 0 and 1 <= level["max_in_flight"] <= level["concurrency"], (config, level)

    # Both goals are reported (met or not: a benchmark never asserts its figures).
    assert [g["target"] for g in report["goals"]] == [1.15, 3.0]
    assert all(isinstance(g["met"], bool) and g["measured"] > 0 for g in report["goals"])
