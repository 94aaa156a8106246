"""What every benchmark shares: the machine record, percentiles, and the result files.

Each benchmark module has `run(args) -> dict` returning a report of this shape

    {"benchmark": "reindex", "command": "...", "machine": machine(), "seconds": ...,
     "tables": [{"title": ..., "columns": [...], "rows": [[...], ...], "notes": [...]}],
     "goals": [{"goal": ..., "measured": ..., "target": ..., "ratio": ..., "met": bool}],
     ...anything else the module measured...}

and `write_report(report, out_dir)` writes `<benchmark>.json` and `<benchmark>.md`; the
`python -m benchmarks` runner concatenates the Markdown of every module it ran.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and settings a figure was measured on."""
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return {
        "cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **extra,
    }


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    argv = sys.argv[:]
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = "-m " + Path(argv[0]).parent.name
    elif argv and argv[0].endswith(".py"):
        argv[0] = "-m benchmarks." + Path(argv[0]).stem
    return ".venv/bin/python " + " ".join(shlex.quote(a) if not a.startswith("-m ") else a for a in argv)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[position]


def goal(description: str, measured: float, target: float, higher_is_better: bool = True) -> dict[str, Any]:
    """One performance goal: measured against target, with the ratio and the verdict."""
    ratio = measured / target if target else float("inf")
    met = measured >= target if higher_is_better else measured <= target
    return {"goal": description, "measured": round(measured, 4), "target": target, "ratio": round(ratio, 3), "met": bool(met)}


def table(title: str, columns: list[str], rows: list[list[Any]], notes: list[str] | None = None) -> dict[str, Any]:
    return {"title": title, "columns": columns, "rows": rows, "notes": notes or []}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, bool):
        return "met" if value else "**not met**"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    """A report's tables and goals as Markdown, with the machine and the command under them."""
    lines = [f"### {report['benchmark']}", ""]
    for t in report.get("tables", []):
        lines += [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                  "|" + "|".join("---" for _ in t["columns"]) + "|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t["rows"]]
        lines += [""] + [f"- {note}" for note in t["notes"]] + ([""] if t["notes"] else [])
    if report.get("goals"):
        lines += ["| goal | measured | target | ratio | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {g['goal']} | {_cell(g['measured'])} | {_cell(g['target'])} | {g['ratio']:.2f} | "
                  f"{_cell(g['met'])} |" for g in report["goals"]]
        lines.append("")
    m = report["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
              f"load average at start {m['load_average_at_start']}, {m['date']}.",
              f"Command: `{report['command']}` ({report.get('seconds', 0):.0f} s).", ""]
    return "\n".join(lines)


def run_and_report(run: Callable[[Any], dict[str, Any]], args: Any) -> int:
    """A benchmark's main: run it, write its JSON + Markdown under args.out, print the Markdown."""
    report = run(args)
    json_path, md_path = write_report(report, Path(args.out))
    print(to_markdown(report))
    print(f"report: {json_path} {md_path}", file=sys.stderr)
    return 0


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write `<benchmark>.json` and `<benchmark>.md` under `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{report['benchmark']}.json"
    md_path = out_dir / f"{report['benchmark']}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path
