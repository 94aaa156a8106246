"""Run the performance benchmarks and write one report: `python -m benchmarks`.

    .venv/bin/python -m benchmarks                     # all six, full size (~40 min on 2 cores before families, which adds ~2, and reindex_ray)
    .venv/bin/python -m benchmarks --only index,serving
    .venv/bin/python -m benchmarks --quick             # every benchmark at toy size (a smoke run)

Each benchmark also runs alone (`python -m benchmarks.reindex --help`, ...) with its own
options. This runner passes --out, --threads and --quick on, and writes under --out:
`<name>.json` and `<name>.md` per benchmark, and `summary.md` / `summary.json` with every
table, every goal (met or not, with the ratio), the machine and the commands.
Benchmarks measure and report; nothing here asserts (tests/ holds the tests).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from benchmarks.common import command_line, to_markdown, write_report

BENCHMARKS = ("reindex", "reindex_ray", "serving", "families", "index", "index_on_disk", "training", "training_ddp")  # soak is separate: it runs for minutes by design


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated benchmarks to run, in order (default: {','.join(BENCHMARKS)})")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where reports go (default runs/bench)")
    p.add_argument("--threads", type=int, help="torch / FAISS threads for every benchmark (default: all cores)")
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke run of the benchmark code, not figures")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared = ["--out", str(args.out)] + (["--threads", str(args.threads)] if args.threads else []) + \
        (["--quick"] if args.quick else [])
    reports, start = [], time.perf_counter()
    for name in args.only:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        report = module.run(module.parse_args(shared))
        report["command"] = f"{command_line()}  (as: python -m benchmarks.{name} {' '.join(shared)})"
        write_report(report, args.out)
        reports.append(report)
    goals = [{"benchmark": r["benchmark"], **g} for r in reports for g in r.get("goals", [])]
    lines = ["## Goals", "", "| benchmark | goal | measured | target | ratio | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {g['benchmark']} | {g['goal']} | {g['measured']} | {g['target']} | {g['ratio']:.2f} | "
              f"{'met' if g['met'] else '**not met**'} |" for g in goals]
    summary = "\n".join(lines) + "\n\n" + "\n".join(to_markdown(r) for r in reports)
    (args.out / "summary.md").write_text(summary)
    (args.out / "summary.json").write_text(json.dumps({"command": command_line(), "seconds": round(time.perf_counter() - start, 1),
                                                       "goals": goals, "reports": reports}, indent=2, default=str) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
