"""GenerateAndRetrieve latency of every committed model, side by side, over the real gRPC server.

    .venv/bin/python -m benchmarks.families              # every committed model on its demo's index
    .venv/bin/python -m benchmarks.families --quick      # seconds: the Fashion-MNIST models, a small index

For each demo (`atelier demo --dataset NAME`), one `RetrievalService` serves every committed
checkpoint (`checkpoints/*`, kind model) trained on the catalogue of that demo's default model, on
the demo's index (`runs/demo-fm/index`, `runs/demo-fpi-full/index`, `runs/demo-fpi/index`: made by
`./dev.sh demo`), behind the real gRPC server on a free localhost port, with the server's default
limits and batching. One client then asks each
model, at concurrency 1 (one call in flight), `--requests` times after `--warmup` calls: random
valid attributes of the model's schema, a random seed, `--num-samples` drawings (default 4),
`--top-k` products, no images returned. It reports p50 / p95 / mean latency at the client and
the server's mean time per stage (the response's timings), and the goal: the demo's default
model's p50 at most 150 ms on this machine. Client and server share the CPU, as they do in
the serving benchmark. This is a benchmark: it reports and never asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from atelier.retrieval.stages import ALL as STAGE_ORDER
from benchmarks.common import REPO, command_line, goal, machine, percentile, run_and_report, table

CHECKPOINTS = REPO / "checkpoints"
# the demo (`atelier demo --dataset`) -> the folder its README command writes to
DEMO_OUT = {"fashion-mnist": "runs/demo-fm", "fashion-product-images": "runs/demo-fpi-full",
            "fashion-product-images-apparel": "runs/demo-fpi"}
DEMO_INDEXES = {demo: REPO / out / "index" for demo, out in DEMO_OUT.items()}
TARGET_MS = 150.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__.split("\n", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where families.json/.md go")
    p.add_argument("--quick", action="store_true",
                   help="Fashion-MNIST models only, on a small index built under --workdir, 2 requests each")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    p.add_argument("--requests", type=int, default=40, help="measured calls per model (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="calls per model before measuring (default 3)")
    p.add_argument("--num-samples", type=int, default=4, help="drawings per request (default 4)")
    p.add_argument("--top-k", type=int, default=10, help="products per request (default 10)")
    p.add_argument("--demos", default=",".join(DEMO_INDEXES),
                   help=f"the demos (`atelier demo --dataset`) whose catalogues' models to measure "
                        f"(default {','.join(DEMO_INDEXES)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the request generator")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak", help="--quick: where the small index goes")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.demos = 2, 1, "fashion-mnist"
    args.demos = [c.strip() for c in args.demos.split(",") if c.strip()]
    unknown = [c for c in args.demos if c not in DEMO_INDEXES]
    if unknown:
        p.error(f"unknown demo(s) {unknown}; available: {', '.join(DEMO_INDEXES)}")
    return args


def _trained_on(checkpoint: Path) -> str | None:
    """The catalogue a committed generator checkpoint was trained on; None for other kinds."""
    from atelier import artifacts

    record = artifacts.read_manifest(checkpoint, verify=False)
    return record.get("training", {}).get("catalogue") if record.get("kind") == "model" else None


def committed_models() -> dict[str, dict[str, Path]]:
    """{demo: {checkpoint folder name: path}}: the committed generator checkpoints trained on the
    catalogue of each demo's default model (a model serves only an index of its own schema)."""
    from atelier.demo import DEMO_DATASETS

    catalogues = {demo: _trained_on(CHECKPOINTS / DEMO_DATASETS.get(demo).checkpoint) for demo in DEMO_INDEXES}
    out: dict[str, dict[str, Path]] = {}
    for manifest in sorted(CHECKPOINTS.glob("*/manifest.json")):
        trained_on = _trained_on(manifest.parent)
        for demo, catalogue in catalogues.items():
            if trained_on is not None and trained_on == catalogue:
                out.setdefault(demo, {})[manifest.parent.name] = manifest.parent
    return out


def _measure(client, name: str, schema, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    groups = [(g.name, list(g.values)) for g in schema.groups if not g.multi_label]
    latencies, stages = [], {stage: [] for stage in STAGE_ORDER}
    for i in range(args.warmup + args.requests):
        attributes = {g: rng.choice(values) for g, values in groups}
        start = time.perf_counter()
        response = client.generate_and_retrieve(attributes, model=name, num_samples=args.num_samples,
                                                top_k=args.top_k, seed=rng.randrange(2**31))
        elapsed = (time.perf_counter() - start) * 1e3
        if i < args.warmup:
            continue
        latencies.append(elapsed)
        for timing in response.timings:
            stages.setdefault(timing.stage, []).append(timing.milliseconds)
    return {"p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "mean_ms": statistics.fmean(latencies), "requests": len(latencies),
            "stage_mean_ms": {s: statistics.fmean(v) for s, v in stages.items() if v}}


def _serve_and_measure(index: Path, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server
    from atelier.server.client import AtelierClient

    service = RetrievalService.open(index, models)
    server = start_server(service)
    rng = random.Random(args.seed)
    out = {}
    try:
        with AtelierClient(server.target) as client:
            client.wait_ready()
            for name, loaded in service.models.items():
                print(f"families: {name} ({loaded.generator.family}) on {index}", file=sys.stderr, flush=True)
                out[name] = {"family": loaded.generator.family, "checkpoint": str(models[name]),
                             **_measure(client, name, loaded.generator.schema, args, rng)}
    finally:
        server.stop()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from atelier.demo import DEMO_DATASETS

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models = committed_models()
    results: dict[str, dict[str, Any]] = {}
    for demo in args.demos:
        index = DEMO_INDEXES[demo]
        if args.quick:
            from benchmarks.soak import build_small_index

            index = build_small_index(argparse.Namespace(workdir=args.workdir, build_rows=300, input_size=32))
        elif not index.exists():
            data = "" if demo == "fashion-mnist" else " --data DIR"
            raise SystemExit(f"families: no index at {index}; make it with "
                             f"`./dev.sh demo --dataset {demo}{data} --out {DEMO_OUT[demo]}`")
        results[demo] = _serve_and_measure(index, models.get(demo, {}), args)
    columns = ["demo", "model", "family", "p50 ms", "p95 ms", "mean ms",
               *(f"{s} ms" for s in STAGE_ORDER)]
    rows = [[demo, name, r["family"], r["p50_ms"], r["p95_ms"], r["mean_ms"],
             *(r["stage_mean_ms"].get(s) for s in STAGE_ORDER)]
            for demo, per_model in results.items() for name, r in per_model.items()]
    goals = []
    for demo in results:
        default = DEMO_DATASETS.get(demo).checkpoint
        if default in results[demo]:
            goals.append(goal(f"{demo}: the demo's default model ({default}) p50 at concurrency 1, "
                              f"{args.num_samples} drawings (ms)", results[demo][default]["p50_ms"], TARGET_MS,
                              higher_is_better=False))
    notes = [f"concurrency 1, {args.requests} calls per model after {args.warmup} warm-up calls, "
             f"{args.num_samples} drawings and top {args.top_k} per call; stage columns: the server's mean time "
             "per stage", "client and server share this machine's CPUs"]
    return {"benchmark": "families", "command": command_line(), "machine": machine(),
            "seconds": time.perf_counter() - started, "models": results,
            "tables": [table("GenerateAndRetrieve latency per committed model", columns, rows, notes)],
            "goals": goals}


def main(argv: list[str] | None = None) -> int:
    return run_and_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
