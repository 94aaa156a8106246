"""Soak run: the real gRPC server under steady concurrent load for a fixed time.

    .venv/bin/python -m benchmarks.soak                       # 5 minutes at concurrency 16
    .venv/bin/python -m benchmarks.soak --minutes 30 --index runs/index --model checkpoints/cgan-fashion-mnist

The server runs in its own process (this module with --serve-child: RetrievalService.open +
atelier.server.app.start_server on a free localhost port), so its resident memory is its own.
`--concurrency` client threads send GenerateAndRetrieve back to back over one channel, each with
random valid attributes (random letter case too: values match case-insensitively) and a random
seed; a share of the requests (`--invalid-share`) is invalid on purpose (unknown value, unknown
model, no attributes, top_k or num_samples over the limit) and must come back INVALID_ARGUMENT.

Reported (printed and written as JSON): requests, OK count, error counts by status code,
unexpected outcomes (a valid request not OK, an invalid one not INVALID_ARGUMENT; RESOURCE_EXHAUSTED
is counted apart when --max-queue lowers the server's hard cap to shed load), latency p50/p95/p99 and QPS of the
OK calls after the warm-up, the server's RSS at start, after the warm-up and at the end (plus a
sample every --rss-every seconds), the machine, and the exact command.

Without --index it builds a small index itself: the first --build-rows products of the
Fashion-MNIST test split (from the Debian IDX files, atelier.catalog.fashion_mnist.locate) as a
catalogue, embedded with mobilenet_v2, under --workdir (reused when already there).
This is a benchmark, not a test: nothing here asserts; read the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "checkpoints" / "cgan-fashion-mnist"
INVALID_KINDS = ("unknown_value", "unknown_model", "no_attributes", "top_k_over_limit", "num_samples_over_limit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.split("\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: .venv/bin/python -m benchmarks.soak --minutes 5 --concurrency 16 "
               "--out runs/soak/soak.json (builds a small Fashion-MNIST index under --workdir when "
               "--index is not given).",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="length of the run, warm-up included (default 5)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads calling at once (default 16)")
    p.add_argument("--warmup-seconds", type=float,
                   help="first part of the run left out of latency, QPS and RSS growth "
                        "(default: 20%% of the run, at most 60 s)")
    p.add_argument("--invalid-share", type=float, default=0.05,
                   help="fraction of requests that are invalid on purpose and must get INVALID_ARGUMENT (default 0.05)")
    p.add_argument("--num-samples", type=int, default=4, help="images generated per valid request (default 4)")
    p.add_argument("--top-k", type=int, default=10, help="products per valid request (default 10)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request generator (default 0)")
    p.add_argument("--index", type=Path, help="index folder to serve (default: build a small one under --workdir)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help=f"checkpoint to serve (default {DEFAULT_MODEL.relative_to(REPO)})")
    p.add_argument("--build-rows", type=int, default=2000,
                   help="products of the index built without --index: first N of the Fashion-MNIST test split (default 2000)")
    p.add_argument("--input-size", type=int, default=64, help="embedder input size of the index built without --index (default 64)")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak",
                   help="where the built index and the server log go (default runs/soak)")
    p.add_argument("--server-threads", type=int, help="torch threads of the server process (default: torch's own)")
    p.add_argument("--max-queue", type=int,
                   help="server admission cap per model (max_queue_per_model); default: the server's own (atelier "
                        "serve's defaults, under which a call waits while its expected wait fits its --timeout); "
                        "below --concurrency it sheds load: RESOURCE_EXHAUSTED, counted apart")
    p.add_argument("--target", help="soak an already running server at HOST:PORT instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --target: that server's pid, to read its RSS (Linux /proc)")
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--out", type=Path, help="JSON report path (default <workdir>/soak-<UTC time>.json)")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or not 0.0 <= args.invalid_share <= 1.0:
        p.error("--minutes must be positive, --concurrency at least 1, --invalid-share within [0, 1]")
    if args.server_pid and not args.target:
        p.error("--server-pid goes with --target")
    return args


# -- the server process ----------------------------------------------------------------------
def make_limits(args: argparse.Namespace):
    """atelier serve's defaults, but --max-queue when given."""
    from atelier.retrieval.service import Limits

    return Limits(**({"max_queue_per_model": max(args.max_queue, 1)} if args.max_queue else {}))


def serve_child(args: argparse.Namespace) -> None:
    """Load, listen on a free port, print one JSON line, serve until stdin closes."""
    import torch

    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server

    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    service = RetrievalService.open(args.index, {"soak": args.model}, make_limits(args))
    running = start_server(service, "127.0.0.1:0", args.concurrency + 4)
    info = service.describe() if hasattr(service, "describe") else {}
    print(json.dumps({"port": running.port, "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                      "index": str(args.index), "index_products": len(service.index),
                      "limits": dataclasses.asdict(service.limits), "models": info.get("models")}, default=str), flush=True)
    sys.stdin.read()  # the parent closes stdin (or dies): stop
    running.stop(grace=2)


def start_server_process(args: argparse.Namespace, index: Path) -> tuple[subprocess.Popen, dict[str, Any], Path]:
    log = args.workdir / "server.log"
    command = [sys.executable, "-m", "benchmarks.soak", "--serve-child", "--index", str(index), "--model", str(args.model),
               "--concurrency", str(args.concurrency)]
    if args.max_queue:
        command += ["--max-queue", str(args.max_queue)]
    if args.server_threads:
        command += ["--server-threads", str(args.server_threads)]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(f"the server did not start (rc {process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return process, json.loads(line), log


# -- an index to serve -----------------------------------------------------------------------
def build_small_index(args: argparse.Namespace) -> Path:
    index = args.workdir / f"index-fm-test-{args.build_rows}-{args.input_size}px"
    if index.exists():
        print(f"soak: reusing {index}", file=sys.stderr)
        return index
    import pyarrow as pa

    from atelier.catalog.catalogue import write_catalogue
    from atelier.catalog.fashion_mnist import CLASS_NAMES, SCHEMA, load_split, locate
    from atelier.catalog.images import encode_png
    from atelier.indexer.runner import reindex

    images, labels = load_split(locate(), "test")
    n = min(args.build_rows, len(labels))
    batch = pa.record_batch({
        "id": [f"test_{i:05d}" for i in range(n)], "split": ["test"] * n,
        "category": [CLASS_NAMES[int(k)] for k in labels[:n]],
        "image": [encode_png(im[:, :, None]) for im in images[:n]],
    })
    catalogue = args.workdir / f"catalogue-fm-test-{n}"
    write_catalogue(catalogue, f"fashion-mnist-test-{n}", SCHEMA, [batch], image_channels=1)
    print(f"soak: indexing {n} Fashion-MNIST products -> {index}", file=sys.stderr)
    reindex(catalogue, index, input_size=args.input_size, progress=False)
    return index


def rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- the load --------------------------------------------------------------------------------
class Requests:
    """Random valid requests from the server's schema, and invalid ones of known kinds."""

    def __init__(self, schema, args: argparse.Namespace):
        self.groups = [(g.name, list(g.values)) for g in schema.groups if not g.multi_label]
        self.args = args
        has_limits = "limits" in schema.DESCRIPTOR.fields_by_name and schema.HasField("limits")
        limits = schema.limits if has_limits else None
        self.max_top_k = limits.max_top_k if limits and limits.max_top_k else 100_000
        self.max_num_samples = limits.max_num_samples if limits and limits.max_num_samples else 100_000

    def make(self, rng: random.Random, pb) -> tuple[Any, str]:
        """(request, kind): kind is "valid" or one of INVALID_KINDS."""
        attributes = {}
        for name, values in self.groups:
            value = rng.choice(values)
            attributes[name] = rng.choice((value, value.lower(), value.upper()))
        kind = "valid" if rng.random() >= self.args.invalid_share else rng.choice(INVALID_KINDS)
        model, n, k = "", self.args.num_samples, self.args.top_k
        if kind == "unknown_value":
            attributes[self.groups[0][0]] = f"no-such-value-{rng.randrange(10**6)}"
        elif kind == "unknown_model":
            model = f"no-such-model-{rng.randrange(10**6)}"
        elif kind == "no_attributes":
            attributes = {}
        elif kind == "top_k_over_limit":
            k = self.max_top_k + 1
        elif kind == "num_samples_over_limit":
            n = self.max_num_samples + 1
        request = pb.GenerateAndRetrieveRequest(
            attributes={g: pb.AttributeValues(values=[v]) for g, v in attributes.items()},
            model=model, num_samples=n, top_k=k, seed=rng.randrange(2**63),
        )
        return request, kind


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    position = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[position], 1)


@dataclasses.dataclass
class Outcome:
    """What the load left behind: every call, the unexpected ones, the server's RSS over time."""
    # (end time, latency ms, kind, code) of every call
    records: list[tuple[float, float, str, str]] = dataclasses.field(default_factory=list)
    unexpected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rss_samples: list[tuple[float, float | None]] = dataclasses.field(default_factory=list)
    marks: dict[str, float | None] = dataclasses.field(default_factory=dict)  # RSS at start, after the warm-up, at the end
    elapsed: float = 0.0


def soak(args: argparse.Namespace, target: str, server_pid: int | None) -> dict[str, Any]:
    import grpc

    from atelier.server.wire import pb, pb_grpc

    duration = args.minutes * 60
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60.0, 0.2 * duration)
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = pb_grpc.AtelierStub(channel)
    schema = stub.GetSchema(pb.GetSchemaRequest(), timeout=60)
    requests = Requests(schema, args)
    outcome = drive_load(args, stub, requests, server_pid, duration, warmup)
    channel.close()
    return summarise(outcome, args, warmup, requests, schema)


def drive_load(args: argparse.Namespace, stub, requests: Requests, server_pid: int | None, duration: float,
               warmup: float) -> Outcome:
    """--concurrency client threads calling back to back for `duration` seconds, and one thread sampling
    the server's RSS every --rss-every seconds (and right at the end of the warm-up)."""
    import grpc

    from atelier.server.wire import pb

    lock = threading.Lock()
    outcome = Outcome()
    start = time.monotonic()
    stop_at = start + duration
    outcome.marks["start"] = rss_mib(server_pid)

    def worker(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while time.monotonic() < stop_at:
            request, kind = requests.make(rng, pb)
            began = time.monotonic()
            try:
                stub.GenerateAndRetrieve(request, timeout=args.timeout)
                code, message = "OK", ""
            except grpc.RpcError as error:
                code, message = error.code().name, error.details() or ""
            except Exception as error:  # a client-side failure is a finding too
                code, message = f"CLIENT_{type(error).__name__}", str(error)
            ended = time.monotonic()
            expected = ("OK",) if kind == "valid" else ("INVALID_ARGUMENT",)
            shed = code == "RESOURCE_EXHAUSTED" and kind == "valid" and args.max_queue is not None
            with lock:
                outcome.records.append((ended - start, (ended - began) * 1000, kind, code))
                if code not in expected and not shed and len(outcome.unexpected) < 1000:
                    outcome.unexpected.append({"t": round(ended - start, 2), "kind": kind, "code": code,
                                               "message": message[:300]})

    def sampler() -> None:
        marks, samples = outcome.marks, outcome.rss_samples
        while True:
            now = time.monotonic()
            samples.append((round(now - start, 1), rss_mib(server_pid)))
            if "after_warmup" not in marks and now - start >= warmup:
                marks["after_warmup"] = samples[-1][1]
            if now >= stop_at:
                return
            next_mark = start + warmup if "after_warmup" not in marks else stop_at
            time.sleep(max(0.05, min(args.rss_every, next_mark - now, stop_at - now)))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    rss_thread = threading.Thread(target=sampler, daemon=True)
    rss_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss_thread.join()
    outcome.marks["end"] = rss_mib(server_pid)
    outcome.elapsed = time.monotonic() - start
    return outcome


def summarise(outcome: Outcome, args: argparse.Namespace, warmup: float, requests: Requests, schema) -> dict[str, Any]:
    """The soak's report: counts over the whole run, latency and QPS after the warm-up, the RSS marks."""
    records, marks, elapsed = outcome.records, outcome.marks, outcome.elapsed
    codes = Counter(code for _, _, _, code in records)
    by_kind = Counter(kind for _, _, kind, _ in records)
    measured = [r for r in records if r[0] >= warmup]
    ok_latencies = sorted(ms for _, ms, kind, code in measured if kind == "valid" and code == "OK")
    window = max(elapsed - warmup, 1e-9)
    growth = (round(marks["end"] - marks["after_warmup"], 1)
              if marks.get("end") is not None and marks.get("after_warmup") is not None else None)
    return {
        "seconds": round(elapsed, 1), "warmup_seconds": round(warmup, 1), "concurrency": args.concurrency,
        "requests": len(records), "ok": codes.get("OK", 0),
        "requests_by_kind": dict(sorted(by_kind.items())),
        "codes": dict(sorted(codes.items())),
        "errors_by_code": {c: n for c, n in sorted(codes.items()) if c != "OK"},
        "valid_errors_by_code": dict(sorted(Counter(code for _, _, kind, code in records
                                                    if kind == "valid" and code != "OK").items())),
        "invalid_answered_invalid_argument": sum(1 for _, _, kind, code in records
                                                 if kind != "valid" and code == "INVALID_ARGUMENT"),
        "unexpected": len(outcome.unexpected), "unexpected_first": outcome.unexpected[:20],
        "after_warmup": {
            "ok_valid_requests": len(ok_latencies),
            "qps_ok": round(len(ok_latencies) / window, 2),
            "qps_all": round(len(measured) / window, 2),
            "latency_ms": {"p50": percentile(ok_latencies, 50), "p95": percentile(ok_latencies, 95),
                           "p99": percentile(ok_latencies, 99), "max": round(ok_latencies[-1], 1) if ok_latencies else None},
        },
        "server_rss_mib": {"start": marks["start"], "after_warmup": marks.get("after_warmup"), "end": marks["end"],
                           "growth_after_warmup": growth, "samples": outcome.rss_samples},
        "schema": {"groups": [g for g, _ in requests.groups], "default_model": schema.default_model,
                   "index_version": schema.index.version, "index_products": schema.index.count},
    }


def machine(server: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "client_torch_threads": torch.get_num_threads(),
            "server_torch_threads": (server or {}).get("torch_threads")}


def print_report(report: dict[str, Any]) -> None:
    after, rss = report["after_warmup"], report["server_rss_mib"]
    lat = after["latency_ms"]
    print(f"soak: {report['seconds']} s at concurrency {report['concurrency']} (warm-up {report['warmup_seconds']} s)")
    print(f"  requests {report['requests']}  ok {report['ok']}  by kind {report['requests_by_kind']}")
    print(f"  errors by code {report['errors_by_code'] or '{}'} (of valid requests: "
          f"{report['valid_errors_by_code'] or '{}'}; invalid ones answered INVALID_ARGUMENT: "
          f"{report['invalid_answered_invalid_argument']})  unexpected {report['unexpected']}")
    for item in report["unexpected_first"][:5]:
        print(f"    unexpected: {item}")
    print(f"  after warm-up: {after['ok_valid_requests']} OK valid calls, {after['qps_ok']} QPS; latency ms "
          f"p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"  server RSS MiB: start {rss['start']}  after warm-up {rss['after_warmup']}  end {rss['end']}  "
          f"growth {rss['growth_after_warmup']}")
    m = report["machine"]
    print(f"  machine: {m['cpus']} CPUs, load {m['load_average']}, server torch threads {m['server_torch_threads']}")
    print(f"  command: {report['command']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_child:
        serve_child(args)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    command = " ".join(shlex.quote(a) for a in [python, "-m", "benchmarks.soak", *(sys.argv[1:] if argv is None else argv)])
    process, server, log = None, None, None
    if args.target:
        target, pid = args.target, args.server_pid
    else:
        index = args.index or build_small_index(args)
        process, server, log = start_server_process(args, index)
        target, pid = f"127.0.0.1:{server['port']}", server["pid"]
        print(f"soak: server pid {pid} on {target} (log {log}); {args.minutes} min at concurrency {args.concurrency}",
              file=sys.stderr)
    try:
        report = soak(args, target, pid)
    finally:
        if process is not None:
            process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    report.update(command=command, target=target, server=server, server_log=str(log) if log else None,
                  model=str(args.model) if not args.target else None, machine=machine(server),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = args.out or args.workdir / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"  report: {out}")
    return 0 if report["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
