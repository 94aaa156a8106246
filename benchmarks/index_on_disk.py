"""The reindex writer's memory at 1M vectors, and a served IVF index with its lists in memory or on disk.

    .venv/bin/python -m benchmarks.index_on_disk                 # 1M synthetic 256-d vectors, IVF4096,SQ8
    .venv/bin/python -m benchmarks.index_on_disk --quick         # 20,000 vectors, IVF64,SQ8: a smoke run

For each of `lists in memory` and `--on-disk-lists` (IndexOptions.on_disk_lists), in a process of
its own so that its peak memory is its own:
  build  the reindex job's writer (atelier.indexer.writer.IndexWriter, as `atelier index` runs it,
         without the reading and embedding): batches of 4,096 vectors of the 1M synthetic set of
         benchmarks/index.py (a mixture fitted to the real 44k index) with their product rows,
         then the index build and publish (runner.publish_index). Reported: the build's seconds
         (training, adding, recall tuning: the manifest's), the index files' bytes, the tuned nprobe
         and recall@10, and the process's peak resident memory (VmHWM) beside the vectors' size;
  serve  IndexDirectory.open of the published folder and 1,000 searches at the tuned nprobe:
         resident memory after them (anonymous, and file pages mapped), queries per second.
This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/index_on_disk.py` as well as `python -m benchmarks.index_on_disk`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, command_line, machine, run_and_report, table  # noqa: E402

NAME = "index_on_disk"
BATCH = 4096
EMBEDDER = {"name": "synthetic", "input_size": 64, "dim": 256, "weights_sha256": "0" * 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.index_on_disk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic vectors (default 1,000,000)")
    p.add_argument("--factory", default="IVF4096,SQ8", help="the IVF index built (default IVF4096,SQ8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS threads (default: all cores)")
    p.add_argument("--queries", type=int, default=1000, help="searches of the served index (default 1000)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="20,000 vectors, IVF64,SQ8")
    p.add_argument("--child", choices=("build", "serve"), help=argparse.SUPPRESS)
    p.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--on-disk", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.factory, args.queries = min(args.rows, 20_000), "IVF64,SQ8", min(args.queries, 200)
    return args


def memory_now_mb() -> dict[str, float]:
    """/proc/self/status now (VmHWM in it is the kernel's peak so far), MB."""
    from benchmarks.index import status_mb

    return {k: round(v, 1) for k, v in status_mb().items()}


class AnonymousPeak:
    """The largest RssAnon seen, sampled every 50 ms in a thread: VmHWM, the kernel's own peak,
    also counts the pages of memory-mapped files (the scratch vectors, the lists), which the
    kernel can drop at any time, so it cannot tell held memory from cached file pages."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, memory_now_mb()["RssAnon"])

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_now_mb()["RssAnon"])


def build_child(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import pyarrow as pa

    from atelier import artifacts
    from atelier.catalog.fashion_mnist import SCHEMA
    from atelier.indexer.index_choice import IndexOptions, choose_index
    from atelier.indexer.mapper import Embedded
    from atelier.indexer.runner import publish_index
    from atelier.indexer.writer import IndexWriter
    from benchmarks.index import Mixture

    faiss.omp_set_num_threads(args.threads)
    mixture = Mixture(dim=EMBEDDER["dim"])
    options = IndexOptions(factory=args.factory, on_disk_lists=args.on_disk)
    start = time.perf_counter()
    with artifacts.staging(args.dest) as stage:
        choice = choose_index(args.rows, EMBEDDER["dim"], options)
        writer = IndexWriter(stage, SCHEMA, EMBEDDER, {"name": "synthetic", "rows": args.rows, "fingerprint": "-"},
                             choice, options)
        for first in range(0, args.rows, BATCH):
            n = min(BATCH, args.rows - first)
            ids = pa.array([f"syn-{i:07d}" for i in range(first, first + n)], pa.string())
            writer.write(Embedded(pa.table({"id": ids, "category": pa.array(["Dress"] * n)}),
                                  mixture.sample(n, seed=first), []))
        before_build = memory_now_mb()
        with AnonymousPeak() as build_peak:
            version = publish_index(writer, args.dest)
    seconds = time.perf_counter() - start
    manifest = json.loads((version / "manifest.json").read_text())
    record = manifest["index_choice"]
    return {"seconds": round(seconds, 1), "build_seconds": record["build_seconds"],
            "tune_seconds": record.get("tune_seconds"), "recall_at_10": record.get("recall_at_10"),
            "search_parameters": record.get("search_parameters"), "index_bytes": record["bytes"],
            "files": {name: (version / name).stat().st_size for name in manifest["files"]},
            "vectors_mb": round(args.rows * EMBEDDER["dim"] * 4 / 1e6, 1),
            "memory_before_build_mb": before_build, "memory_mb": memory_now_mb(),
            "build_anonymous_peak_mb": build_peak.peak,
            "version": str(version)}


def serve_child(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from atelier.indexer.index_directory import IndexDirectory
    from benchmarks.index import Mixture

    faiss.omp_set_num_threads(1)  # a served search: one query at a time, as a server thread does
    queries = Mixture(dim=EMBEDDER["dim"]).sample(args.queries, seed=10**9)
    opened = memory_now_mb()
    index = IndexDirectory.open(args.dest, verify=False)
    after_open = memory_now_mb()
    start = time.perf_counter()
    for q in queries:
        index.search(q[None], 10)
    seconds = time.perf_counter() - start
    return {"queries_per_second": round(len(queries) / seconds, 1), "memory_mb_before_open": opened,
            "memory_mb_after_open": after_open, "memory_mb": memory_now_mb()}


def child(kind: str, args: argparse.Namespace, dest: Path, on_disk: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.index_on_disk", "--child", kind, "--dest", str(dest),
               "--rows", str(args.rows), "--factory", args.factory, "--threads", str(args.threads),
               "--queries", str(args.queries)] + (["--on-disk"] if on_disk else [])
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)  # the children's FAISS threads; recorded with the machine
    began = time.perf_counter()
    work = args.out / "tmp" / NAME
    shutil.rmtree(work, ignore_errors=True)
    results = {}
    for on_disk in (False, True):
        label = "on-disk lists" if on_disk else "lists in memory"
        dest = work / ("on-disk" if on_disk else "memory")
        built = child("build", args, dest, on_disk)
        served = child("serve", args, dest, on_disk)
        results[label] = {"build": built, "serve": served}
        print(f"index_on_disk: {label}: built in {built['seconds']} s, peak {built['memory_mb']['VmHWM']} MB; "
              f"served {served['queries_per_second']} q/s, RssAnon {served['memory_mb']['RssAnon']} MB",
              file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for label, r in results.items():
        b, s = r["build"], r["serve"]
        rows.append([label, b["seconds"], b["build_seconds"], b["memory_before_build_mb"]["RssAnon"],
                     b["build_anonymous_peak_mb"], b["memory_mb"]["VmHWM"], b["vectors_mb"],
                     round(b["index_bytes"] / 1e6, 1),
                     json.dumps(b["search_parameters"]), b["recall_at_10"], s["queries_per_second"],
                     round(s["memory_mb"]["RssAnon"] - s["memory_mb_before_open"]["RssAnon"], 1),
                     round(s["memory_mb"]["RssFile"] - s["memory_mb_before_open"]["RssFile"], 1)])
    return {
        "benchmark": NAME, "command": command_line(), "seconds": time.perf_counter() - began,
        "machine": machine(), "results": results, "goals": [],
        "tables": [table(f"The writer and a served {args.factory} over {args.rows:,} synthetic 256-d vectors",
                         ["lists", "job s", "index build s", "writer anonymous MB before the build",
                          "anonymous peak during the build MB", "peak RSS with file pages MB", "vectors MB", "index files MB", "tuned", "recall@10", "served q/s (1 thread)",
                          "served anonymous MB (after open + searches)", "served file pages MB"], rows,
                         ["anonymous memory (RssAnon) is what the process holds; the kernel's peak RSS (VmHWM) "
                          "also counts pages of the memory-mapped scratch vectors and lists, which it may drop",
                          "before the build: every vector is in the scratch file; what the job holds is its "
                          "imports (torch, FAISS) and the synthetic mixture",
                          "served memory: growth of the process's RssAnon / RssFile from before "
                          "IndexDirectory.open to after the searches"])],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(build_child(args) if args.child == "build" else serve_child(args)))
        return 0
    return run_and_report(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
