"""Smoke tests of the benchmarks: each runs at --quick size on real data and writes a whole report.

Figures are not checked against targets here (benchmarks never assert; timings do not belong in
tests), only that every table, goal and file is there and every rate is a positive number.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import write_report


def _check_report(report: dict, out, name: str, titles: list[str], goals: int) -> None:
    assert report["benchmark"] == name and report["command"] and report["seconds"] > 0
    assert report["machine"]["torch_threads"] == 1
    assert [t["title"].split(",")[0] for t in report["tables"]] == titles
    for t in report["tables"]:
        assert t["rows"] and all(len(row) == len(t["columns"]) for row in t["rows"])
    assert len(report["goals"]) == goals
    for g in report["goals"]:
        assert math.isfinite(g["measured"]) and isinstance(g["met"], bool)
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["goals"] == report["goals"]
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith(f"### {name}") and all(t in markdown for t in titles)


def test_reindex_benchmark_quick(tmp_path, fpi_parquet):
    from benchmarks import reindex

    out = tmp_path / "bench"
    assert reindex.main(["--quick", "--threads", "1", "--out", str(out), "--data", str(fpi_parquet.parent)]) == 0
    report = json.loads((out / "reindex.json").read_text())
    _check_report(report, out, "reindex", ["Reindex throughput", "Where the end-to-end time went",
                                            "Pure forward by batch size (the batch size is chosen here)"], goals=1)
    assert report["catalogue"]["rows"] == reindex.QUICK["limit"]
    assert report["pure_forward_images_per_second"] > 0 and report["naive_images_per_second"] > 0
    assert report["end_to_end"]["images_per_second"] > 0 and report["end_to_end"]["forward_seconds"] > 0
    assert report["batch_size"] in [int(b) for b in reindex.QUICK["batch_sizes"].split(",")]
    assert not (out / "tmp" / "reindex").exists()  # the catalogue copy and the index are removed


def test_reindex_ray_benchmark_quick(tmp_path, fpi_parquet):
    from benchmarks import reindex_ray

    out = tmp_path / "bench"
    assert reindex_ray.main(["--quick", "--threads", "1", "--workers", "2", "--out", str(out),
                             "--data", str(fpi_parquet.parent)]) == 0
    report = json.loads((out / "reindex_ray.json").read_text())
    _check_report(report, out, "reindex_ray", ["Reindex on Ray", "Ray workers"], goals=0)
    assert [r["workers"] for r in report["runs"]] == [None, 2]
    for r in report["runs"]:
        assert r["images"] == reindex_ray.QUICK["limit"] and r["images_per_second"] > 0
        assert r["embedding_images_per_second"] > 0 and r["build"]["distributor"] == ("ray" if r["workers"] else "local")
    assert len(report["tables"][1]["rows"]) == 2  # one row per worker of the Ray run
    assert not (out / "tmp" / "reindex_ray").exists()


def test_training_benchmark_quick(tmp_path, fpi_parquet, idx_dir):
    from benchmarks import training

    out = tmp_path / "bench"
    report = training.run(training.parse_args(["--quick", "--threads", "1", "--out", str(out),
                                               "--data", str(fpi_parquet.parent)]))
    write_report(report, out)
    families = [m.family for m in training.MODELS]
    _check_report(report, out, "training", ["Training throughput per model", "Where the real loop's time goes"],
                  goals=len(families))
    assert list(report["models"]) == families
    for name, r in report["models"].items():
        assert r["real_images_per_second"] > 0 and r["minimal_images_per_second"] > 0, name
        assert 0 <= r["outside_step_share"] < 1 and r["steady"]["steps"] == 2, name
    assert not (out / "tmp" / "training").exists()


def test_training_ddp_benchmark_quick(tmp_path, idx_dir):
    from benchmarks import training_ddp

    out = tmp_path / "bench"
    report = training_ddp.run(training_ddp.parse_args(["--quick", "--threads", "1", "--out", str(out)]))
    write_report(report, out)
    _check_report(report, out, "training_ddp", ["Training images/s: flow (width=8 sample_steps=2)"], goals=0)
    assert [(r["processes"], r["threads"], r["global_batch"]) for r in report["runs"]] == [(1, 1, 32), (2, 1, 64)]
    assert all(r["images_per_second"] > 0 and len(r["points"]) >= 2 for r in report["runs"])
    assert not (out / "tmp" / "training-ddp").exists()


def test_index_on_disk_benchmark_quick(tmp_path):
    from benchmarks import index_on_disk

    out = tmp_path / "bench"
    report = index_on_disk.run(index_on_disk.parse_args(["--quick", "--threads", "1", "--out", str(out)]))
    write_report(report, out)
    _check_report(report, out, "index_on_disk", ["The writer and a served IVF64"], goals=0)
    memory, disk = report["results"]["lists in memory"], report["results"]["on-disk lists"]
    assert "index.ivfdata" in disk["build"]["files"] and "index.ivfdata" not in memory["build"]["files"]
    assert disk["build"]["recall_at_10"] == memory["build"]["recall_at_10"]  # the same index, lists elsewhere
    assert all(r["serve"]["queries_per_second"] > 0 for r in (memory, disk))
    assert not (out / "tmp" / "index_on_disk").exists()


def test_families_benchmark_quick(tmp_path, idx_dir, mobilenet_weights):
    from benchmarks import families

    out = tmp_path / "bench"
    report = families.run(families.parse_args(["--quick", "--threads", "1", "--out", str(out),
                                               "--workdir", str(tmp_path / "work")]))
    write_report(report, out)
    _check_report(report, out, "families", ["GenerateAndRetrieve latency per committed model"], goals=1)
    served = report["models"]["fashion-mnist"]
    assert set(served) == set(families.committed_models()["fashion-mnist"]) >= {"flow-fashion-mnist"}
    assert {r["family"] for r in served.values()} >= {"cgan", "cvae", "flow"}
    for name, r in served.items():
        assert r["requests"] == 2 and r["p50_ms"] > 0 and r["stage_mean_ms"]["generate"] > 0, name


def test_families_sorts_each_checkpoint_to_the_demo_of_its_own_catalogue():
    from benchmarks import families

    committed = families.committed_models()
    assert set(committed) == set(families.DEMO_INDEXES)
    assert {"mcgan-fpi-apparel", "stage2-fpi-apparel"} <= set(committed["fashion-product-images-apparel"])
    # the whole catalogue's flow and its refinement: not on the apparel index, whose schema differs
    assert {"flow-fpi-full", "flow-distilled-fpi-full", "stage2-fpi-full"} <= set(committed["fashion-product-images"])
    assert not set(committed["fashion-product-images"]) & set(committed["fashion-product-images-apparel"])
    assert {"cgan-fashion-mnist", "flow-distilled-fashion-mnist"} <= set(committed["fashion-mnist"])


def test_benchmark_help_says_what_is_measured(capsys):
    from benchmarks import reindex, training

    for module, words in ((reindex, "pure forward"), (training, "minimal")):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        assert words in capsys.readouterr().out
