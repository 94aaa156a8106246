"""Reindex throughput on Ray: `atelier index --distributor ray` with 1 and 2 workers, beside the local job.

    .venv/bin/python -m benchmarks.reindex_ray                  # the 44,441-product catalogue
    .venv/bin/python -m benchmarks.reindex_ray --quick          # 256 rows: a smoke run, Ray's start-up dominates

Each run is one reindex() call on the same catalogue, embedder and batch size, publishing an index:
  local           distributor="local": this process, --threads torch threads (default: all cores);
  ray, N workers  distributor="ray", workers=N: a local Ray started and stopped by the call, N
                  workers of 1 CPU and 1 torch thread each, shards of the catalogue handed out by
                  this process, which builds and publishes the index.
Reported per run: end to end images/s (rows / wall seconds of the call: for Ray that includes
starting Ray and its workers, the embedding, the index build and the publish), the embedding
alone (Ray: from the first shard handed out to the last one written; local: the job's loop), and
each Ray worker's own images/s (its images / the seconds it spent on its shards).

The catalogue is found or imported as by benchmarks/reindex.py (--catalogue, --data, --limit;
--quick always imports its first rows). This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/reindex_ray.py` as well as `python -m benchmarks.reindex_ray`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, machine, run_and_report, table  # noqa: E402
from benchmarks.reindex import add_catalogue_options, open_catalogue  # noqa: E402

NAME = "reindex_ray"
QUICK = {"limit": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reindex_ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_catalogue_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the forward (default 64)")
    p.add_argument("--limit", type=int, help="index the first N rows only (default: the whole catalogue)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run, in order (default 1,2)")
    p.add_argument("--no-local", action="store_true", help="leave out the local job")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of the local job (default: all cores); each Ray worker has 1")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help=f"smoke-test size: the first {QUICK['limit']} rows")
    args = p.parse_args(argv)
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.worker_counts or min(args.worker_counts) < 1:
        p.error(f"--workers: expected comma-separated counts >= 1, got {args.workers!r}")
    if args.quick:
        args.limit = min(args.limit or QUICK["limit"], QUICK["limit"])
    return args


def one_run(catalogue, dest: Path, args: argparse.Namespace, workers: int | None) -> dict[str, Any]:
    """One reindex() call (workers None: the local job): its rates and its manifest's build record."""
    from atelier.indexer.runner import reindex

    ray = {"distributor": "ray", "workers": workers} if workers else {"threads": args.threads}
    start = time.perf_counter()
    version = reindex(catalogue.path, dest, args.embedder, args.input_size, batch_size=args.batch_size,
                      progress=False, **ray)
    seconds = time.perf_counter() - start
    build = json.loads((version / "manifest.json").read_text())["build"]
    shutil.rmtree(dest.parent, ignore_errors=True)
    embedding = build["embedding_images_per_second"] if workers else build["images_per_second"]
    print(f"{f'ray, {workers} worker(s)' if workers else 'local'}: {len(catalogue) / seconds:.1f} img/s "
          f"end to end, {embedding:.1f} embedding", file=sys.stderr)
    return {"workers": workers, "images": len(catalogue), "seconds": seconds,
            "images_per_second": len(catalogue) / seconds, "embedding_images_per_second": embedding, "build": build}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from atelier.indexer.distributed import import_ray

    torch.set_num_threads(args.threads)
    ray = import_ray()
    began, host = time.perf_counter(), machine(ray=ray.__version__)
    tmp = args.out / "tmp" / NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        catalogue = open_catalogue(args, tmp)
        runs = [] if args.no_local else [one_run(catalogue, tmp / "index-local" / "dest", args, None)]
        runs += [one_run(catalogue, tmp / f"index-ray-{w}" / "dest", args, w) for w in args.worker_counts]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()  # --out/tmp, when no other benchmark is using it
    return {
        "benchmark": NAME, "command": command_line(), "seconds": time.perf_counter() - began, "machine": host,
        "catalogue": {"name": catalogue.name, "rows": len(catalogue), "path": str(args.catalogue), "limit": args.limit},
        "embedder": args.embedder, "input_size": args.input_size, "batch_size": args.batch_size, "runs": runs,
        "tables": [throughput_table(runs, catalogue, args), workers_table(runs)], "goals": [],
    }


def throughput_table(runs: list[dict[str, Any]], catalogue, args: argparse.Namespace) -> dict[str, Any]:
    base = next((r for r in runs if r["workers"] is None), None)
    rows = []
    for r in runs:
        b = r["build"]
        rows.append([f"ray, {r['workers']} worker{'s' if r['workers'] > 1 else ''}" if r["workers"] else
                     f"local, {args.threads} torch thread{'s' if args.threads > 1 else ''}", r["images"],
                     r["images_per_second"],
                     r["embedding_images_per_second"], b.get("startup_seconds"),
                     r["images_per_second"] / base["images_per_second"] if base else None])
    return table(
        f"Reindex on Ray, batch {args.batch_size}", ["job", "images", "images/s end to end", "images/s embedding",
                                                     "Ray start-up s", "end to end x local"],
        rows,
        [f"Catalogue {catalogue.name} ({len(catalogue):,} rows{', the first rows only' if args.limit else ''}), "
         f"embedder {args.embedder} (input {args.input_size} px where it is an ImageNet one), "
         f"{os.cpu_count()} CPUs. One reindex() call per row, each publishing an index.",
         "End to end: rows / wall seconds of the call (for Ray: starting a local Ray and its workers, the workers "
         "building the embedder, the embedding, the index build on the driver, the publish). Embedding: Ray from "
         "the first shard handed out to the last one written; local, the job's reader -> mapper -> writer loop.",
         "Ray workers have 1 CPU and 1 torch thread each; the local job runs --threads torch threads beside its "
         "decode thread."])


def workers_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [[r["workers"], w["worker"], w["shards"], w["images"], w["seconds"], w["images_per_second"]]
            for r in runs if r["workers"] for w in r["build"]["per_worker"]]
    return table("Ray workers, each on its own", ["workers in the job", "worker", "shards", "images", "seconds busy",
                                                   "images/s"], rows,
                 ["A worker's images / the seconds it spent on its shards (read, decode, forward, thumbnails)."])


def main(argv: list[str] | None = None) -> int:
    return run_and_report(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
