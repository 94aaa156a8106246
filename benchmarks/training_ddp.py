"""Training images/s with 1 and 2 processes: `atelier train` alone and under torchrun (DDP, gloo).

    .venv/bin/python -m benchmarks.training_ddp                  # the flow on Fashion-MNIST, 60 steps per run
    .venv/bin/python -m benchmarks.training_ddp --quick          # a few steps of a tiny flow: a smoke run

Runs, each training the same model from scratch with the same per-process batch (--batch-size), so
two processes train on a global batch twice as large (the usual data-parallel scaling):
  1 process, 1 thread     `atelier train --threads 1`
  1 process, T threads    `atelier train --threads T` (T = --threads, default: all cores), the
                          way one machine is used without torchrun
  N processes, 1 thread   `torchrun --standalone --nproc_per_node N -m atelier train --threads 1`
images/s is the training loop's own figure (TensorBoard's `images_per_second`, written every
--log-every steps), the median of the points after the first (start-up); efficiency per process is
(N-process images/s) / (N x 1-process, 1-thread images/s). The catalogue is runs/data/fmnist
(from `atelier import fashion-mnist`) or, where absent and always with --quick, a small one built
under --out from the Debian Fashion-MNIST files. This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/training_ddp.py` as well as `python -m benchmarks.training_ddp`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, command_line, machine, run_and_report, table  # noqa: E402

NAME = "training_ddp"
CATALOGUE = REPO / "runs" / "data" / "fmnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalogue", type=Path, help=f"catalogue to train on (default {CATALOGUE.relative_to(REPO)})")
    p.add_argument("--model", default="flow", help="model family (default flow)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="model option (default for the flow: width=32, the committed Fashion-MNIST flow's)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of each process (default 32)")
    p.add_argument("--steps", type=int, default=60, help="training steps of each run (default 60)")
    p.add_argument("--log-every", type=int, default=10, help="steps per images/s point (default 10)")
    p.add_argument("--processes", default="1,2", help="process counts under torchrun, in order (default 1,2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of the one-process, several-threads run (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="a tiny flow for a few steps on a small catalogue")
    args = p.parse_args(argv)
    args.process_counts = [int(n) for n in args.processes.split(",") if n.strip()]
    if not args.process_counts or min(args.process_counts) < 1:
        p.error(f"--processes: expected comma-separated counts >= 1, got {args.processes!r}")
    if args.set is None:
        args.set = ["width=8", "sample_steps=2"] if args.quick else (["width=32"] if args.model == "flow" else [])
    if args.quick:
        args.steps, args.log_every = min(args.steps, 12), min(args.log_every, 3)
    return args


def catalogue_path(args: argparse.Namespace) -> Path:
    if args.catalogue:
        return args.catalogue
    if CATALOGUE.is_dir() and not args.quick:
        return CATALOGUE
    small = args.out / "tmp" / "fmnist-small"
    if not small.is_dir():
        from benchmarks.training import fashion_mnist_subset

        fashion_mnist_subset(small, 2048)
    return small


def images_per_second(events: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("images_per_second")]


def one_run(args: argparse.Namespace, catalogue: Path, processes: int, threads: int, work: Path) -> dict[str, Any]:
    out = work / f"p{processes}-t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.tensorboard", ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    sets = [a for kv in args.set for a in ("--set", kv)]
    command = [*launcher, "-m", "atelier", "train", "--model", args.model, "--catalogue", str(catalogue), "--out",
               str(out), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--epochs", "1",
               "--log-every", str(args.log_every), "--threads", str(threads), "--quiet", *sets]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    points = images_per_second(Path(f"{out}.tensorboard"))
    steady = points[1:] or points
    rate = statistics.median(steady)
    label = f"{processes} process{'es' if processes > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each"
    print(f"training_ddp: {label}: {rate:.1f} img/s ({len(points)} points, {wall:.0f} s)", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.versions", ignore_errors=True)
    return {"processes": processes, "threads": threads, "label": label, "images_per_second": rate,
            "points": points, "wall_seconds": wall, "global_batch": args.batch_size * processes}


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    catalogue = catalogue_path(args)
    work = args.out / "tmp" / "training-ddp"
    work.mkdir(parents=True, exist_ok=True)
    runs = [one_run(args, catalogue, 1, 1, work)]
    if args.threads > 1:
        runs.append(one_run(args, catalogue, 1, args.threads, work))
    runs += [one_run(args, catalogue, n, 1, work) for n in args.process_counts if n > 1]
    shutil.rmtree(work, ignore_errors=True)
    single = runs[0]["images_per_second"]
    rows = [[r["label"], r["global_batch"], r["images_per_second"], r["images_per_second"] / single,
             r["images_per_second"] / (single * r["processes"] * r["threads"]), r["wall_seconds"]] for r in runs]
    return {
        "benchmark": NAME,
        "tables": [table(f"Training images/s: {args.model} ({' '.join(args.set) or 'defaults'}), batch "
                         f"{args.batch_size} per process, {args.steps} steps, on {catalogue}",
                         ["run", "global batch", "images/s", "speed-up", "efficiency per core", "wall s"], rows,
                         ["images/s: median of the loop's own figure every --log-every steps after the first; "
                          "wall s includes start-up (torchrun's rendezvous, loading the catalogue) and the checkpoint"])],
        "runs": runs, "goals": [], "machine": machine(torch_threads=max(r["threads"] for r in runs)), "command": command_line(),
        "seconds": time.perf_counter() - began,
    }


def main(argv: list[str] | None = None) -> int:
    return run_and_report(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
