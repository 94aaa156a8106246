"""GenerateAndRetrieve latency and throughput: the in-process pipeline, then the real gRPC server.

    .venv/bin/python -m benchmarks.serving                     # FPI index + MCGAN, 20 s per level, c = 1, 8, 32, a burst of 64
    .venv/bin/python -m benchmarks.serving --quick             # seconds: small Fashion-MNIST index + CGAN, c = 1, 4

Both figures come from the same server process (this module with --serve-child), so they share
its torch threads (`--threads`), its loaded model and index, and its batching policy:

1. in process: after loading, before it listens, the child warms up and then calls
   `RetrievalService.generate_and_retrieve` back to back for `--seconds` (no gRPC, no client in
   the way) and reports total latency (mean, p50/p95/p99) and the mean time of each stage;
2. served: it then listens on a free localhost port, and this process runs a bounded `grpc.aio`
   load generator against it: for each concurrency c, c coroutines on one channel, each sending
   its next call only when its last one has returned (so never more than c in flight), for a
   warm-up (not counted) and then `--seconds`. OK calls give p50/p95/p99 and QPS (OK calls /
   measured seconds); every other outcome is counted by status code;
3. a burst: `--burst` calls (64) sent at once on that channel, as a new user's load would come,
   each with the `--timeout` deadline: OK count, refusals by code, latency and the burst's wall time.

Every request, in process and served, is drawn the same way: random valid attributes from the
served model's schema (benchmarks.soak.Requests, no invalid ones), a random seed, `--num-samples`
images and `--top-k` products, no images returned.

The server runs on `atelier serve`'s defaults: `Limits()` (admission by expected wait against
each call's deadline under the hard cap max_queue_per_model 256, default_deadline_seconds 10,
max_running_per_model 2 batch workers; `--max-running` changes only that) and `BatchPolicy()`
(unless `--batch-wait-ms`, `--max-batch-rows` or `--batch-chunk-rows` say otherwise), with the gRPC
workers atelier serve gives it (workers_needed). Nothing is set to keep requests from being shed:
a refusal (RESOURCE_EXHAUSTED) is counted like any other outcome. Dynamic batching
(atelier.retrieval.batching): the server gathers concurrent requests for one model into one
generator and one embedder batch within `--batch-wait-ms`, up to `--max-batch-rows` rows, run in
slices of `--batch-chunk-rows`. The whole run is then repeated on a server whose batches hold one
request each (max_batch_rows 1, no wait), to show what batching gives. Per level the report also
gives the requests per batch (the batcher's counters) and the cores the server and the load
generator kept busy: on a small machine both share the CPUs.

Goals: served p50 at c = 1 at most 1.15x the in-process p50; QPS at c = 32 at least
3x QPS at c = 1. This is a benchmark: it reports and never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from atelier.retrieval.stages import ALL as STAGE_ORDER  # the stages in pipeline order
from benchmarks.common import REPO, command_line, goal, machine, percentile, run_and_report, table
from benchmarks.soak import Requests, build_small_index, rss_mib

DEFAULT_INDEX = REPO / "runs" / "demo-fpi" / "index"  # the FPI demo: 44,441 products, in-domain embedder
DEFAULT_MODEL = REPO / "checkpoints" / "mcgan-fpi-apparel"
QUICK_MODEL = REPO / "checkpoints" / "cgan-fashion-mnist"
BATCHED, UNBATCHED = "batched", "unbatched"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"),
                   help="folder for serving.json, serving.md and the server logs (default runs/bench)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of seconds: small Fashion-MNIST index and CGAN, 1.5 s per level, concurrency 1,4")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the server process (default: all cores, %(default)s)")
    p.add_argument("--seconds", type=float,
                   help="measured seconds per concurrency level, and of the in-process run (default 20; --quick 1.5)")
    p.add_argument("--warmup-seconds", type=float,
                   help="seconds before each measurement that are not counted (default 20%% of --seconds, 0.5..3)")
    p.add_argument("--concurrency", help="concurrency levels, comma separated (default 1,8,32; --quick 1,4)")
    p.add_argument("--num-samples", type=int, default=4, help="images generated per request (default 4)")
    p.add_argument("--top-k", type=int, default=10, help="products per request (default 10)")
    p.add_argument("--index", type=Path,
                   help=f"index folder to serve (default {DEFAULT_INDEX.relative_to(REPO)}; --quick: a small "
                        "Fashion-MNIST index built by benchmarks.soak under --workdir)")
    p.add_argument("--model", type=Path,
                   help=f"checkpoint to serve (default {DEFAULT_MODEL.relative_to(REPO)}; --quick "
                        f"{QUICK_MODEL.relative_to(REPO)})")
    p.add_argument("--model-name", help="name the model is served under (default: its family, e.g. mcgan)")
    p.add_argument("--batch-wait-ms", type=float,
                   help="server: longest wait to gather a batch (BatchPolicy.max_wait_ms; default the policy's own)")
    p.add_argument("--max-batch-rows", type=int,
                   help="server: most generator rows in one batch (BatchPolicy.max_batch_rows; default the policy's own)")
    p.add_argument("--batch-chunk-rows", type=int,
                   help="server: the one row count both networks run at (BatchPolicy.chunk_rows; default the policy's own)")
    p.add_argument("--max-running", type=int,
                   help="server: batch worker threads per model (Limits.max_running_per_model; default: the "
                        "server's own)")
    p.add_argument("--burst", type=int, default=64,
                   help="calls sent at once after the levels, each with the --timeout deadline (default 64; 0: none)")
    p.add_argument("--no-unbatched", action="store_true",
                   help="skip the second served run on a server without dynamic batching")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request generator (default 0)")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak",
                   help="where the small index is built without --index under --quick (default runs/soak, "
                        "shared with benchmarks.soak)")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-batching", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 20.0)
    if args.warmup_seconds is None:
        args.warmup_seconds = min(3.0, max(0.5, 0.2 * args.seconds))
    try:
        levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,8,32")).split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency takes integers separated by commas, got {args.concurrency!r}")
    args.concurrency = sorted(set(levels))
    if not args.concurrency or args.concurrency[0] < 1:
        p.error("--concurrency needs at least one level, each at least 1")
    if args.seconds <= 0 or args.warmup_seconds < 0 or args.threads < 1 or args.timeout <= 0 or args.burst < 0:
        p.error("--seconds and --timeout must be positive, --warmup-seconds and --burst not negative, "
                "--threads at least 1")
    if args.index is None and not args.quick:
        args.index = DEFAULT_INDEX
    if args.model is None:
        args.model = QUICK_MODEL if args.quick else DEFAULT_MODEL
    return args


# -- the server process: in-process figures first, then it serves ----------------------------
def summary(latencies_ms: list[float]) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {"calls": len(latencies_ms), "mean": r(sum(latencies_ms) / len(latencies_ms)) if latencies_ms else None,
            "p50": r(percentile(latencies_ms, 50)), "p95": r(percentile(latencies_ms, 95)),
            "p99": r(percentile(latencies_ms, 99)), "max": r(max(latencies_ms, default=None))}


def stage_means(per_call: list[dict[str, float]]) -> dict[str, float]:
    """Mean ms of each stage over the calls, stages in pipeline order (unknown ones last)."""
    names = {s for t in per_call for s in t}
    ordered = [s for s in STAGE_ORDER if s in names] + sorted(names - set(STAGE_ORDER))
    return {s: round(sum(t.get(s, 0.0) for t in per_call) / len(per_call), 3) for s in ordered} if per_call else {}


def schema_message(schema, pb):
    """The model's schema as the GetSchema message benchmarks.soak.Requests draws from."""
    return pb.GetSchemaResponse(groups=[pb.AttributeGroup(name=g.name, values=list(g.values), multi_label=g.multi_label)
                                        for g in schema.groups])


def to_domain(request, RetrievalRequest):
    """A GenerateAndRetrieveRequest as the servicer turns it into a RetrievalRequest."""
    return RetrievalRequest(
        attributes={name: list(v.values) if len(v.values) != 1 else v.values[0] for name, v in request.attributes.items()},
        model=request.model, num_samples=request.num_samples, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, return_images=request.return_images)


def measure_in_process(service, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Back-to-back generate_and_retrieve calls for args.seconds, after args.warmup_seconds."""
    from atelier.retrieval.service import RetrievalRequest
    from atelier.server.wire import pb

    requests = Requests(schema_message(service.models[model].generator.schema, pb), request_settings(args))
    rng = random.Random(args.seed * 1000 + 999)
    latencies, timings = [], []
    warm_until = time.perf_counter() + args.warmup_seconds
    started = None
    while True:
        now = time.perf_counter()
        if started is None and now >= warm_until:
            started = now
        if started is not None and now - started >= args.seconds:
            break
        request = to_domain(requests.make(rng, pb)[0], RetrievalRequest)
        request.model = model
        began = time.perf_counter()
        result = service.generate_and_retrieve(request)
        ms = (time.perf_counter() - began) * 1000
        if started is not None:
            latencies.append(ms)
            timings.append(result.timings_ms)
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 3), "latency_ms": summary(latencies), "stages_ms": stage_means(timings),
            "calls_per_second": round(len(latencies) / elapsed, 2)}


def request_settings(args: argparse.Namespace) -> SimpleNamespace:
    return SimpleNamespace(invalid_share=0.0, num_samples=args.num_samples, top_k=args.top_k)


def batch_policy(args: argparse.Namespace, on: bool):
    """The BatchPolicy to open the service with: the given one, or one request per batch (`on` False)."""
    from atelier.retrieval.batching import BatchPolicy

    chunk = {"chunk_rows": args.batch_chunk_rows} if args.batch_chunk_rows is not None else {}
    if not on:
        return BatchPolicy(max_wait_ms=0.0, max_batch_rows=1, **chunk)
    given = {"max_wait_ms": args.batch_wait_ms, "max_batch_rows": args.max_batch_rows, **chunk}
    return BatchPolicy(**{k: v for k, v in given.items() if v is not None})


def serve_child(args: argparse.Namespace) -> None:
    """Load, measure in process, listen on a free port, print one JSON line, serve until stdin closes."""
    import torch

    from atelier.retrieval.service import Limits, RetrievalService
    from atelier.server.app import start_server, workers_needed

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    limits = Limits(**({"max_running_per_model": args.max_running} if args.max_running else {}))  # the defaults
    policy = batch_policy(args, args.child_batching == "on")
    extra = {"batching": policy} if policy is not None else {}
    service = RetrievalService.open(args.index, {args.model_name: args.model}, limits, **extra)
    loaded = time.perf_counter() - began
    in_process = measure_in_process(service, args.model_name, args)
    running = start_server(service, "127.0.0.1:0", workers_needed(limits, len(service.models)))
    print(json.dumps({
        "port": running.port, "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
        "index": str(args.index), "index_products": len(service.index), "index_version": service.index.version,
        "model": {"name": args.model_name, "path": str(args.model), "version": service.models[args.model_name].version},
        "limits": service.limits.as_dict(), "workers": workers_needed(limits, len(service.models)),
        "batching": dataclasses.asdict(policy) if policy is not None else None,
        "load_seconds": round(loaded, 2), "in_process": in_process,
    }, default=str), flush=True)
    for _ in sys.stdin:  # each line asks for the batch counters; the parent closes stdin (or dies): stop
        print(json.dumps(batch_counters(service)), flush=True)
    running.stop(grace=2)


def batch_counters(service) -> dict[str, dict[str, int]]:
    """Per model: batches computed and requests in them, so far (the batcher's own counters)."""
    return {name: {"batches": b.batches, "requests": b.batched_requests}
            for name, b in getattr(service, "batchers", {}).items()}


def start_server_process(args: argparse.Namespace, index: Path, config: str) -> tuple[subprocess.Popen, dict[str, Any]]:
    log = args.out / f"serving-server-{config}.log"
    command = [sys.executable, "-m", "benchmarks.serving", "--serve-child", "--index", str(index),
               "--model", str(args.model), "--model-name", args.model_name, "--threads", str(args.threads),
               "--seconds", str(args.seconds), "--warmup-seconds", str(args.warmup_seconds),
               "--num-samples", str(args.num_samples), "--top-k", str(args.top_k), "--seed", str(args.seed),
               "--child-batching", "on" if config == BATCHED else "off"]
    if args.max_running is not None:
        command += ["--max-running", str(args.max_running)]
    if args.batch_wait_ms is not None:
        command += ["--batch-wait-ms", str(args.batch_wait_ms)]
    if args.max_batch_rows is not None:
        command += ["--max-batch-rows", str(args.max_batch_rows)]
    if args.batch_chunk_rows is not None:
        command += ["--batch-chunk-rows", str(args.batch_chunk_rows)]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(f"the server did not start (rc {process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    info = json.loads(line)
    info["log"] = str(log)
    return process, info


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_marks(process: subprocess.Popen) -> tuple[float, float | None, float]:
    """(wall, server CPU, client CPU) seconds now, to turn two marks into CPU use per wall second."""
    return time.perf_counter(), cpu_seconds(process.pid), time.process_time()


def ask_counters(process: subprocess.Popen) -> dict[str, dict[str, int]]:
    process.stdin.write(b"counters\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def stop_server_process(process: subprocess.Popen) -> None:
    process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the load generator ----------------------------------------------------------------------
async def load_levels(target: str, args: argparse.Namespace,
                      server: subprocess.Popen) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Each concurrency level, then the burst (None without one)."""
    import grpc

    from atelier.server.wire import pb, pb_grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=60)
        stub = pb_grpc.AtelierStub(channel)
        requests = Requests(await stub.GetSchema(pb.GetSchemaRequest(), timeout=60), request_settings(args))
        levels = [await load_level(stub, requests, pb, c, args, server) for c in args.concurrency]
        burst = await load_burst(stub, requests, pb, args) if args.burst else None
        return levels, burst


async def load_burst(stub, requests: Requests, pb, args: argparse.Namespace) -> dict[str, Any]:
    """`args.burst` calls sent at once, each with the `--timeout` deadline; what came back."""
    import grpc

    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed * 1000 + 777)

    async def one(request) -> tuple[str, float]:
        began = loop.time()
        try:
            await stub.GenerateAndRetrieve(request, timeout=args.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        return code, (loop.time() - began) * 1000

    began = loop.time()
    outcomes = await asyncio.gather(*(one(requests.make(rng, pb)[0]) for _ in range(args.burst)))
    wall = loop.time() - began
    codes = Counter(code for code, _ in outcomes)
    return {"calls": args.burst, "timeout": args.timeout, "ok": codes.get("OK", 0), "wall_seconds": round(wall, 3),
            "errors_by_code": {c: n for c, n in sorted(codes.items()) if c != "OK"},
            "latency_ms": summary([ms for code, ms in outcomes if code == "OK"]),
            "refused_latency_ms": summary([ms for code, ms in outcomes if code == "RESOURCE_EXHAUSTED"])}


async def load_level(stub, requests: Requests, pb, concurrency: int, args: argparse.Namespace,
                     server: subprocess.Popen) -> dict[str, Any]:
    import grpc

    loop = asyncio.get_running_loop()
    t0 = loop.time() + args.warmup_seconds  # calls that start before t0 are warm-up
    t1 = t0 + args.seconds  # no call starts after t1
    records: list[tuple[float, float, float, str, Any]] = []  # (start, end, ms, code, server timings)
    in_flight = {"now": 0, "max": 0}
    load_before = os.getloadavg()

    async def caller(index: int) -> None:
        rng = random.Random(args.seed * 1000 + concurrency * 100 + index)
        while loop.time() < t1:
            request, _ = requests.make(rng, pb)
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            began = loop.time()
            timings = None
            try:
                response = await stub.GenerateAndRetrieve(request, timeout=args.timeout)
                code = "OK"
                timings = {t.stage: t.milliseconds for t in response.timings}
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            except Exception as error:  # a client-side failure is a finding too
                code = f"CLIENT_{type(error).__name__}"
            ended = loop.time()
            in_flight["now"] -= 1
            records.append((began, ended, (ended - began) * 1000, code, timings))

    async def marks_at_t0():
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        return cpu_marks(server), await loop.run_in_executor(None, ask_counters, server)

    marked = asyncio.ensure_future(marks_at_t0())
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    (cpu_first, first), cpu_last, last = await marked, cpu_marks(server), ask_counters(server)
    wall = cpu_last[0] - cpu_first[0]
    server_cpu = (cpu_last[1] - cpu_first[1]) / wall if None not in (cpu_first[1], cpu_last[1]) and wall > 0 else None
    client_cpu = (cpu_last[2] - cpu_first[2]) / wall if wall > 0 else None
    batches = sum(m["batches"] for m in last.values()) - sum(m["batches"] for m in first.values())
    batched = sum(m["requests"] for m in last.values()) - sum(m["requests"] for m in first.values())
    measured = [r for r in records if t0 <= r[0] < t1]
    ok = [r for r in measured if r[3] == "OK"]
    window = max((r[1] for r in measured), default=t1) - t0
    codes = Counter(r[3] for r in measured)
    return {
        "concurrency": concurrency, "measured_seconds": round(window, 3), "warmup_seconds": args.warmup_seconds,
        "calls": len(measured), "ok": len(ok), "errors_by_code": {c: n for c, n in sorted(codes.items()) if c != "OK"},
        "warmup_calls": sum(1 for r in records if r[0] < t0), "max_in_flight": in_flight["max"],
        "qps": round(len(ok) / window, 3) if window > 0 else None,
        "latency_ms": summary([r[2] for r in ok]),
        "server_stages_ms": stage_means([r[4] for r in ok]),
        "batches": batches, "requests_per_batch": round(batched / batches, 2) if batches else None,
        "cpu_cores_busy": {"server": None if server_cpu is None else round(server_cpu, 2),
                           "client": None if client_cpu is None else round(client_cpu, 2)},
        "server_rss_mib": rss_mib(server.pid),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }


# -- the run ---------------------------------------------------------------------------------
def model_family(checkpoint: Path) -> str:
    try:
        return json.loads((checkpoint / "config.json").read_text())["family"]
    except (OSError, KeyError, ValueError):
        return "model"


def serve_and_load(args: argparse.Namespace, index: Path, config: str) -> dict[str, Any]:
    process, server = start_server_process(args, index, config)
    print(f"serving: {config} server pid {server['pid']} on port {server['port']}; in process "
          f"p50 {server['in_process']['latency_ms']['p50']} ms", file=sys.stderr)
    try:
        levels, burst = asyncio.run(load_levels(f"127.0.0.1:{server['port']}", args, process))
    finally:
        stop_server_process(process)
    for level in levels:
        print(f"serving: {config} c={level['concurrency']}: {level['ok']} OK, {level['qps']} QPS, "
              f"p50 {level['latency_ms']['p50']} ms, errors {level['errors_by_code'] or 0}", file=sys.stderr)
    if burst is not None:
        print(f"serving: {config} burst of {burst['calls']}: {burst['ok']} OK in {burst['wall_seconds']} s, "
              f"errors {burst['errors_by_code'] or 0}", file=sys.stderr)
    return {"server": server, "levels": levels, "burst": burst}


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    index = set_up(args)
    import torch

    torch.set_num_threads(args.threads)  # this process only drives the load; the figure names the server's threads
    host = machine(server_torch_threads=args.threads, client="grpc.aio, one channel, this process")
    configs = [BATCHED] + ([UNBATCHED] if not args.no_unbatched else [])
    runs = {config: serve_and_load(args, index, config) for config in configs}
    tables = [in_process_table(args, runs, run_notes(args, index, runs)), served_table(args, runs)]
    if args.burst:
        tables.append(burst_table(args, runs))
    return {"benchmark": "serving", "command": command_line(), "machine": host,
            "seconds": round(time.perf_counter() - began, 1), "tables": tables, "goals": serving_goals(runs[BATCHED]),
            "settings": {"index": str(index), "model": str(args.model), "model_name": args.model_name,
                         "threads": args.threads, "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
                         "concurrency": args.concurrency, "num_samples": args.num_samples, "top_k": args.top_k,
                         "timeout": args.timeout, "batch_wait_ms": args.batch_wait_ms,
                         "max_batch_rows": args.max_batch_rows, "batch_chunk_rows": args.batch_chunk_rows,
                         "max_running": args.max_running, "burst": args.burst, "quick": args.quick},
            "runs": runs, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def set_up(args: argparse.Namespace) -> Path:
    """Settle the model and its served name, and the index to serve (built small without --index); returns the index."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = args.model.resolve()  # the server process runs from the repository root
    args.model_name = args.model_name or model_family(args.model)
    if args.index is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return build_small_index(SimpleNamespace(workdir=args.workdir.resolve(), build_rows=2000, input_size=64))
    return args.index.resolve()


# -- the report ------------------------------------------------------------------------------
def run_notes(args: argparse.Namespace, index: Path, runs: dict[str, dict[str, Any]]) -> list[str]:
    """What was served, how the server was set up, and each run's batching policy."""
    server = runs[BATCHED]["server"]
    notes = [f"Index {index} ({server['index_products']:,} products), model {args.model_name} "
             f"({args.model}), num_samples {args.num_samples}, top_k {args.top_k}, random valid attributes and seeds, "
             "no images returned.",
             f"Server: atelier serve's defaults{'' if args.max_running is None else ' but --max-running'}: torch "
             f"threads {args.threads}, max_queue_per_model {server['limits']['max_queue_per_model']} (the hard cap; "
             f"below it admission by expected wait against each call's deadline, {args.timeout:g} s here), "
             f"max_running_per_model {server['limits'].get('max_running_per_model')}, "
             f"{server['workers']} gRPC workers; client and server share this machine's "
             f"{os.cpu_count()} CPUs."]
    notes.append(f"batched: BatchPolicy {server['batching']}"
                 + (f"; unbatched: BatchPolicy {runs[UNBATCHED]['server']['batching']} (max_batch_rows 1: "
                    "every batch is one request; the same worker threads)" if UNBATCHED in runs else ""))
    return notes


def in_process_table(args: argparse.Namespace, runs: dict[str, dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    stage_names: list[str] = []
    for r in runs.values():
        stage_names += [s for s in r["server"]["in_process"]["stages_ms"] if s not in stage_names]
    rows = []
    for config, r in runs.items():
        ip = r["server"]["in_process"]
        lat = ip["latency_ms"]
        rows.append([config, lat["calls"], ip["calls_per_second"], lat["mean"], lat["p50"], lat["p95"], lat["p99"],
                     *(ip["stages_ms"].get(s) for s in stage_names)])
    return table(f"In process: generate_and_retrieve back to back in the server process ({args.seconds:g} s, "
                 f"after {args.warmup_seconds:g} s warm-up)",
                 ["config", "calls", "calls/s", "mean ms", "p50 ms", "p95 ms", "p99 ms", *(f"{s} ms" for s in stage_names)],
                 rows, notes)


def served_table(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    served_stages: list[str] = []
    for r in runs.values():
        for level in r["levels"]:
            served_stages += [s for s in level["server_stages_ms"] if s not in served_stages]
    rows = []
    for config, r in runs.items():
        for level in r["levels"]:
            lat = level["latency_ms"]
            errors = sum(level["errors_by_code"].values())
            rows.append([config, level["concurrency"], level["ok"], errors, level["qps"], lat["p50"], lat["p95"],
                         lat["p99"], *(level["server_stages_ms"].get(s) for s in served_stages),
                         level["requests_per_batch"], level["cpu_cores_busy"]["server"],
                         level["cpu_cores_busy"]["client"], level["max_in_flight"],
                         level["load_average"]["after"][0]])
    return table(f"Served: grpc.aio load generator, {args.seconds:g} s per level after {args.warmup_seconds:g} s warm-up "
                 f"(stage columns: the server's own mean ms per OK call)",
                 ["config", "concurrency", "OK", "errors", "QPS", "p50 ms", "p95 ms", "p99 ms",
                  *(f"{s} ms" for s in served_stages), "requests / batch", "server cores busy", "client cores busy",
                  "max in flight", "load avg (1 min)"],
                 rows,
                 [f"{config} c={level['concurrency']}: errors by code {level['errors_by_code']}"
                  for config, r in runs.items() for level in r["levels"] if level["errors_by_code"]])


def burst_table(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for config, r in runs.items():
        burst = r.get("burst")
        if burst:
            lat, refused = burst["latency_ms"], burst["refused_latency_ms"]
            rows.append([config, burst["calls"], burst["ok"], sum(burst["errors_by_code"].values()), lat["p50"],
                         lat["p99"], lat["max"], refused["max"], burst["wall_seconds"]])
    return table(f"Burst: {args.burst} calls sent at once, each with a {args.timeout:g} s deadline, on the server's "
                 "defaults",
                 ["config", "calls", "OK", "errors", "OK p50 ms", "OK p99 ms", "OK max ms", "refused max ms", "wall s"],
                 rows,
                 [f"{config} burst: errors by code {r['burst']['errors_by_code']}"
                  for config, r in runs.items() if r.get("burst") and r["burst"]["errors_by_code"]])


def serving_goals(main_run: dict[str, Any]) -> list[dict[str, Any]]:
    """Server overhead at the lowest concurrency, and throughput scaling up to 32 (or the highest level)."""
    goals = []
    base_p50 = main_run["server"]["in_process"]["latency_ms"]["p50"]
    by_c = {level["concurrency"]: level for level in main_run["levels"]}
    lowest = min(by_c)
    if base_p50 and by_c[lowest]["latency_ms"]["p50"]:
        goals.append(goal(f"server overhead at concurrency {lowest}: served p50 / in-process p50",
                          by_c[lowest]["latency_ms"]["p50"] / base_p50, 1.15, higher_is_better=False))
    highest = 32 if 32 in by_c else max(by_c)
    if highest != lowest and by_c[lowest]["qps"] and by_c[highest]["qps"] is not None:
        goals.append(goal(f"throughput scaling: QPS at concurrency {highest} / QPS at concurrency {lowest}",
                          by_c[highest]["qps"] / by_c[lowest]["qps"], 3.0))
    return goals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_child:
        serve_child(args)
        return 0
    return run_and_report(run, args)


if __name__ == "__main__":
    sys.exit(main())
