"""Reindex throughput: catalogue Parquet -> published FAISS index, in images/s.

    .venv/bin/python -m benchmarks.reindex                 # the 44,441-product catalogue, all cores
    .venv/bin/python -m benchmarks.reindex --quick --threads 1

Measured, each at the same batch size and torch threads:
  pure forward  the embedder's batched forward on images decoded and prepared beforehand (a
                uint8 array in memory): the limit of the job, nothing else to do;
  end to end    atelier.indexer.runner.reindex over the catalogue: open and verify the
                catalogue, build the embedder, read Parquet, decode, prepare, forward, build and
                write the FAISS index, publish (rows / wall seconds);
  naive loop    one image at a time: decode, prepare, forward of a batch of 1.
The batch size is chosen by measurement: a sweep of the pure forward over --batch-sizes, the
fastest wins (unless --batch-size is given). Goal: end to end >= 0.85 x pure forward.

The catalogue is --catalogue (default runs/demo-fpi/catalogue-index, Fashion Product Images
apparel-6x6-all, 44,441 products); when it is absent it is imported there from
$ATELIER_DATA/fashion_product_images_small (default ../shared/data). --limit indexes its first rows
only (a copy under --out/tmp); --quick always imports its first rows from the source data.
This is a benchmark, not a test: nothing here asserts; read the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/reindex.py` as well as `python -m benchmarks.reindex`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, command_line, goal, machine, run_and_report, table  # noqa: E402

NAME = "reindex"
DEFAULT_CATALOGUE = REPO / "runs" / "demo-fpi" / "catalogue-index"
SELECTION = "apparel-6x6-all"
TARGET = 0.85
QUICK = {"limit": 256, "sample": 128, "naive": 32, "batch_sizes": "16,64", "rounds": 1}

# What was tried on the pipeline while it was built (measured with this module and small probes;
# 2,048 rows, 1 torch thread, this 2-core machine shared with other jobs, 2026-11-27).
PIPELINE_NOTES = [
    "Pipeline (atelier/indexer): reader -> mapper -> writer. One worker thread reads the next Parquet "
    "batches and decodes + prepares them (OpenCV and Parquet decompression release the GIL) up to 2 batches "
    "ahead; the main thread only runs the forward and hands vectors to the writer.",
    "Tried, paid: reading Parquet in the worker thread too (it was on the main thread, between forwards): "
    "end to end x1.03 to x1.31, median x1.11, over 6 paired runs in alternating order.",
    "Tried, kept in a thread: a thread that holds the GIL (pure Python) slowed the forward to 38 from 350 "
    "images/s, but one that decodes with OpenCV cost it nothing measurable (the forward thread never waited "
    "for the GIL: its wall time equalled its CPU time), so decoding needs no process of its own.",
    "Measured, did not pay to change: the main thread waits for decoding under 1% of the job (more prefetch "
    "or decode workers cannot help); decode is PNG inflate (cv2.imdecode ~120 us of ~160 us per image; "
    "cvtColor 7, to_pylist 5, np.stack 4), so per-image Python overhead is a few % of a few % of the job; "
    "the writer's one concatenate of the vectors (44k x 256 float32, 45 MB) takes ~30 ms.",
    "Batch size: 32 and 64 were fastest at 1 thread (within noise of each other), 128 and 256 slower "
    "(e.g. 503, 526, 387, 266 images/s for 32, 64, 128, 256), so reindex() and `atelier index` keep 64 unless "
    "the sweep at the benchmark's thread count says otherwise.",
    "With torch on every core, decoding has no free core: the forward-inside-the-job line of the next table "
    "shows what it takes from the forward.",
]


def data_root() -> Path:
    return Path(os.environ.get("ATELIER_DATA", REPO.parent / "shared" / "data"))


def add_catalogue_options(p: argparse.ArgumentParser) -> None:
    """The catalogue and embedder options both reindex benchmarks take."""
    p.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE,
                   help=f"catalogue folder (default {DEFAULT_CATALOGUE.relative_to(REPO)}; imported there from "
                        "--data when absent; ignored with --quick)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder holding fashion_product_images_small/ (default $ATELIER_DATA or ../shared/data)")
    p.add_argument("--embedder", default="auto",
                   help="auto (the catalogue's committed in-domain embedder), mobilenet_v2, or a trained one's folder")
    p.add_argument("--input-size", type=int, default=64, help="input size of an ImageNet embedder (default 64)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reindex",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalogue_options(p)
    p.add_argument("--batch-size", type=int, help="batch size of the forward (default: the sweep's fastest)")
    p.add_argument("--batch-sizes", default="8,16,32,64,128,256",
                   help="batch sizes the pure-forward sweep tries (default 8,16,32,64,128,256)")
    p.add_argument("--limit", type=int, help="index the first N rows only (default: the whole catalogue)")
    p.add_argument("--sample", type=int, default=2048,
                   help="images decoded beforehand for the pure forward and the sweep (default 2048)")
    p.add_argument("--naive", type=int, default=500, help="images through the naive one-at-a-time loop (default 500)")
    p.add_argument("--rounds", type=int, default=2,
                   help="passes of the batch-size sweep, interleaved; each size's best counts (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test sizes, seconds: {QUICK['limit']} rows, sample {QUICK['sample']}, "
                        f"naive {QUICK['naive']}, batch sizes {QUICK['batch_sizes']}")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = min(args.limit or QUICK["limit"], QUICK["limit"])
        args.sample, args.naive = min(args.sample, QUICK["sample"]), min(args.naive, QUICK["naive"])
        args.rounds = QUICK["rounds"]
        if args.batch_sizes == p.get_default("batch_sizes"):
            args.batch_sizes = QUICK["batch_sizes"]
    return args


# -- the catalogue ------------------------------------------------------------------------------
def open_catalogue(args: argparse.Namespace, tmp: Path):
    """The catalogue to index: --catalogue or its first --limit rows; imported from --data when it is
    absent, and always with --quick (a smoke test needs nothing but the source data)."""
    from atelier.catalog.catalogue import Catalogue, write_catalogue

    # a published catalogue's link resolves to its manifest
    if args.quick or not (args.catalogue / "manifest.json").is_file():
        from atelier.catalog.fashion_product_images import import_fashion_product_images

        source = (args.data or data_root()) / "fashion_product_images_small"
        if not source.is_dir():
            raise FileNotFoundError(f"no Fashion Product Images at {source} to import the catalogue from "
                                    f"(set ATELIER_DATA or --data){'' if args.quick else f'; {args.catalogue} is absent too'}")
        # a partial import never lands at the catalogue's own path, where a whole one is expected
        dest = tmp / "catalogue" if args.limit else args.catalogue
        print(f"importing {source} ({SELECTION}{f', first {args.limit} rows' if args.limit else ''}) -> {dest}",
              file=sys.stderr)
        return import_fashion_product_images(source, dest, selection=SELECTION, limit=args.limit, progress=False)
    catalogue = Catalogue.open(args.catalogue)
    if not args.limit or args.limit >= len(catalogue):
        return catalogue

    def first_rows():
        left = args.limit
        for batch in catalogue.iter_batches(["id", "split", *catalogue.schema.names, "image"], 4096):
            if left <= 0:
                return
            yield batch.slice(0, left)
            left -= len(batch)

    # same name and schema, so `auto` picks the same embedder as for the whole catalogue
    return write_catalogue(tmp / "catalogue", catalogue.name, catalogue.schema, first_rows(), catalogue.image_channels,
                           source={"first_rows_of": str(args.catalogue), "rows": args.limit})


def prepared_sample(catalogue, embedder, n: int):
    """The first n images decoded and prepared: (uint8 N x S x S x 3, seconds per image)."""
    import numpy as np

    from atelier.catalog.images import decode_image

    images = []
    for batch in catalogue.iter_batches(["image"], 1024):
        images += batch.column(0).to_pylist()[: n - len(images)]
        if len(images) >= n:
            break
    start = time.perf_counter()
    pixels = np.stack([embedder.prepare(decode_image(data, catalogue.image_channels)) for data in images])
    return pixels, (time.perf_counter() - start) / len(images)


# -- the measurements ---------------------------------------------------------------------------
def forward_rate(embedder, pixels, batch_size: int) -> float:
    """images/s of embedder.forward over `pixels` in batches, after one warm-up batch."""
    embedder.forward(pixels[:batch_size])  # oneDNN builds its kernels for this shape on the first call
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        embedder.forward(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def naive_rate(catalogue, embedder, n: int) -> float:
    """images/s of decode -> prepare -> forward, one image at a time (rows read beforehand)."""
    from atelier.catalog.images import decode_image

    images = next(catalogue.iter_batches(["image"], n)).column(0).to_pylist()[:n]
    embedder.forward(embedder.prepare(decode_image(images[0], catalogue.image_channels))[None])  # warm-up
    start = time.perf_counter()
    for data in images:
        embedder.forward(embedder.prepare(decode_image(data, catalogue.image_channels))[None])
    return len(images) / (time.perf_counter() - start)


def default_batch_size() -> int:
    import inspect

    from atelier.indexer.runner import reindex

    return inspect.signature(reindex).parameters["batch_size"].default


def scheduler_waits() -> float:
    """Seconds this thread has been runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    import threading

    try:
        return int(Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def end_to_end(catalogue, dest: Path, embedder_name: str, input_size: int, batch_size: int,
               threads: int) -> dict[str, Any]:
    """One real reindex job: rows / wall seconds, and the job's own split of the time."""
    from atelier.indexer.runner import reindex

    start, waits = time.perf_counter(), scheduler_waits()
    version = reindex(catalogue.path, dest, embedder_name, input_size, batch_size=batch_size, threads=threads,
                      progress=False)
    seconds, waits = time.perf_counter() - start, scheduler_waits() - waits
    build = json.loads((version / "manifest.json").read_text())["build"]
    shutil.rmtree(dest.parent, ignore_errors=True)
    return {"images": len(catalogue), "seconds": seconds, "images_per_second": len(catalogue) / seconds,
            "loop_seconds": build["seconds"], "main_thread_cpu_wait_seconds": waits,
            **{k: v for k, v in build.items() if k.endswith("_seconds")}}


@dataclass
class Measured:
    """Everything run() measured, for the report: the inputs, the sweep, the three rates."""
    catalogue: Any
    embedder_name: str
    embedder: Any
    sample: int  # prepared images of the pure forward and the sweep
    decode_seconds: float  # per image, decode + prepare alone
    sizes: list[int]
    passes: dict[int, list[float]]  # images/s of each sweep pass, per batch size
    sweep: dict[int, float]  # the best pass of each batch size
    batch: int
    pure: float
    job: dict[str, Any]
    naive: float


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    began, host = time.perf_counter(), machine()  # the load average before this run adds its own
    tmp = args.out / "tmp" / NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        m = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()  # --out/tmp, when no other benchmark is using it

    threads = torch.get_num_threads()
    ratio = m.job["images_per_second"] / m.pure
    return {
        "benchmark": NAME, "command": command_line(), "seconds": time.perf_counter() - began, "machine": host,
        "catalogue": {"name": m.catalogue.name, "rows": len(m.catalogue), "path": str(args.catalogue), "limit": args.limit},
        "embedder": {"name": m.embedder_name, "input_size": m.embedder.input_size, "dim": m.embedder.dim},
        "batch_size": m.batch, "sweep": {str(b): r for b, r in m.passes.items()},
        "pure_forward_images_per_second": m.pure, "end_to_end": m.job, "naive_images_per_second": m.naive,
        "decode_prepare_images_per_second": 1 / m.decode_seconds,
        "tables": [throughput_table(m, args, threads), time_split_table(m.job, m.pure), sweep_table(m, args)],
        "goals": [goal(f"reindex end to end / pure forward (batch {m.batch}, {threads} threads)", ratio, TARGET)],
    }


def measure(args: argparse.Namespace, tmp: Path) -> Measured:
    """Open the catalogue and the embedder, sweep the batch size, then the three rates at the chosen one."""
    import torch

    from atelier.indexer.embedders import AUTO, build_embedder, embedder_for_catalogue

    catalogue = open_catalogue(args, tmp)
    embedder_name = embedder_for_catalogue(catalogue.name) if args.embedder == AUTO else args.embedder
    embedder = build_embedder(embedder_name, args.input_size)
    pixels, decode_seconds = prepared_sample(catalogue, embedder, min(args.sample, len(catalogue)))
    print(f"{catalogue.name}: {len(catalogue)} rows; embedder {embedder.name} {embedder.input_size} px "
          f"{embedder.dim}-d; {torch.get_num_threads()} torch threads", file=sys.stderr)

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    passes = sweep_batch_sizes(embedder, pixels, sizes, args.rounds)
    sweep = {b: max(r) for b, r in passes.items()}
    for b, r in sweep.items():
        print(f"pure forward, batch {b}: {r:.1f} img/s", file=sys.stderr)
    batch = args.batch_size or max(sweep, key=sweep.get)
    # once more right before the job, so the limit and the job see the machine in one state
    pure = max(sweep.get(batch, 0.0), forward_rate(embedder, pixels, batch))
    job = end_to_end(catalogue, tmp / "index" / "dest", embedder_name, args.input_size, batch, args.threads)
    print(f"end to end, batch {batch}: {job['images_per_second']:.1f} img/s", file=sys.stderr)
    naive = naive_rate(catalogue, embedder, min(args.naive, len(catalogue)))
    print(f"naive loop: {naive:.1f} img/s", file=sys.stderr)
    return Measured(catalogue, embedder_name, embedder, len(pixels), decode_seconds, sizes, passes, sweep, batch, pure,
                    job, naive)


def sweep_batch_sizes(embedder, pixels, sizes: list[int], rounds: int) -> dict[int, list[float]]:
    """The pure forward's images/s at each batch size, one pass per size per round: rounds interleaved (the
    caller keeps each size's best), so a burst of other work on the machine hits every size alike."""
    passes: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for b in sizes:
            passes[b].append(forward_rate(embedder, pixels, b))
    return passes


# -- the report ---------------------------------------------------------------------------------
def throughput_table(m: Measured, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    catalogue, embedder, job, pure = m.catalogue, m.embedder, m.job, m.pure
    naive_images = min(args.naive, len(catalogue))
    return table(
        f"Reindex throughput, batch {m.batch}, {threads} torch threads",
        ["path", "images", "images/s", "x pure forward"],
        [["pure forward (decoded beforehand): the limit", m.sample, pure, 1.0],
         ["end to end: reindex(), Parquet -> published index", job["images"], job["images_per_second"],
          job["images_per_second"] / pure],
         ["naive loop: decode + embed one image at a time", naive_images, m.naive, m.naive / pure]],
        [f"Catalogue {catalogue.name} ({len(catalogue):,} rows{', the first rows only' if args.limit else ''}), "
         f"embedder {m.embedder_name} ({embedder.input_size} px, {embedder.dim}-d), {threads} torch threads "
         f"on {os.cpu_count()} CPUs.",
         f"Pure forward: best of {len(m.passes.get(m.batch, [])) + 1} passes over {m.sample:,} prepared "
         "images. End to end: "
         "rows / wall seconds of one reindex() call in this process (Python imports are not in it).",
         f"Decode + prepare alone, one thread: {1 / m.decode_seconds:,.0f} images/s "
         f"({m.decode_seconds * 1e6:.0f} us per image).",
         *PIPELINE_NOTES])


def time_split_table(job: dict[str, Any], pure: float) -> dict[str, Any]:
    """Where the end-to-end job's seconds went, from its manifest's `build` record."""
    outside = job["seconds"] - job["loop_seconds"]
    other = job["loop_seconds"] - job["forward_seconds"] - job["wait_seconds"]
    return table(
        "Where the end-to-end time went", ["part", "seconds", "share of the job"],
        [["forward (main thread)", job["forward_seconds"], job["forward_seconds"] / job["seconds"]],
         ["main thread waiting for decode", job["wait_seconds"], job["wait_seconds"] / job["seconds"]],
         ["main thread, rest of the loop (writer, progress)", other, other / job["seconds"]],
         ["outside the loop: open + verify catalogue, build embedder, FAISS build + write + publish",
          outside, outside / job["seconds"]],
         ["of all the above: main thread runnable, waiting for a CPU (taken by the worker or other processes)",
          job["main_thread_cpu_wait_seconds"], job["main_thread_cpu_wait_seconds"] / job["seconds"]],
         ["worker thread: Parquet read (beside the forward)", job["read_seconds"], None],
         ["worker thread: decode + prepare (beside the forward)", job["decode_seconds"], None]],
        [f"The forward inside the job ran at {job['images'] / job['forward_seconds']:,.1f} images/s, "
         f"{job['images'] / job['forward_seconds'] / pure:.3f} x the pure forward (the difference: the worker "
         "thread and other processes sharing the cores and caches, and kernel set-up for the first and the "
         "last, partial batch).",
         "From the index manifest's `build` record (atelier/indexer/mapper.py timings)."])


def sweep_table(m: Measured, args: argparse.Namespace) -> dict[str, Any]:
    return table(
        "Pure forward by batch size (the batch size is chosen here)", ["batch size", "images/s (best)", "passes"],
        [[b, m.sweep[b], ", ".join(f"{r:.0f}" for r in m.passes[b])] for b in m.sizes],
        [f"Each size over the same {m.sample:,} prepared images after one warm-up batch, {args.rounds} "
         f"interleaved round(s); {'fastest' if not args.batch_size else '--batch-size'}: {m.batch}. "
         f"reindex() and `atelier index` default to {default_batch_size()}."])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
