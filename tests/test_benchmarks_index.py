"""Smoke test of benchmarks/index.py at --quick size (synthetic vectors only, seconds).

Figures are not checked against targets (benchmarks never assert; timings do not belong in tests),
only that every table and file is there, recalls are fractions and rates positive numbers.
"""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks.common import write_report


def test_index_benchmark_quick(tmp_path):
    from benchmarks import index

    out = tmp_path / "bench"
    report = index.run(index.parse_args(["--quick", "--out", str(out), "--threads", "1"]))
    write_report(report, out)

    assert report["benchmark"] == "index" and report["command"] and report["seconds"] > 0
    titles = [t["title"] for t in report["tables"]]
    assert titles == ["Index candidates, synthetic 20k", "What choose_index picks under a memory budget",
                      "Neighbour structure: real against synthetic vectors"]
    for t in report["tables"]:
        assert t["rows"] and all(len(row) == len(t["columns"]) for row in t["rows"])

    candidates = report["sets"]["synthetic 20k"]["candidates"]
    kinds = {c["kind"] for c in candidates}
    assert {"flat", "hnsw", "ivf-sq8", "ivf-pq"} <= kinds  # the PQ one: the smallest budget's pick
    for c in candidates:
        assert 0.0 <= c["recall_at_10"] <= 1.0
        assert c["qps_single"] > 0 and c["qps_batched"] > 0 and c["bytes"] > 0 and c["build_seconds"] >= 0
    flat = next(c for c in candidates if c["kind"] == "flat")
    assert flat["recall_at_10"] == 1.0 and flat["bytes_per_vector"] >= 4 * 64  # exact, 4 bytes a dimension
    assert next(c for c in candidates if c["kind"] == "hnsw")["recall_at_10"] >= 0.9

    choices = report["sets"]["synthetic 20k"]["choices"]
    assert choices[0]["budget"] is None and choices[0]["factory"] == "Flat"  # 20k rows: exact below 50k
    assert choices[-1]["factory"] is None and "no index type fits" in choices[-1]["error"]  # 500KB: nothing fits
    assert len(report["goals"]) == 3
    for g in report["goals"]:
        assert math.isfinite(g["measured"]) and isinstance(g["met"], bool)

    saved = json.loads((out / "index.json").read_text())
    assert saved["goals"] == report["goals"]
    markdown = (out / "index.md").read_text()
    assert markdown.startswith("### index") and all(t in markdown for t in titles)
    assert not (out / "tmp").exists()  # the scratch folder is removed


def test_mixture_is_reproducible_and_unit_norm():
    from benchmarks.index import Mixture

    a, b = Mixture(16, centres=20, groups=4, seed=3), Mixture(16, centres=20, groups=4, seed=3)
    x = a.sample(500, seed=1, chunk=128)
    assert x.shape == (500, 16) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x, b.sample(500, seed=1, chunk=128))
    assert not np.array_equal(x, a.sample(500, seed=2, chunk=128))
