"""Training throughput per model: the real training loop beside a minimal loop of the same networks.

    .venv/bin/python -m benchmarks.training                  # the committed models, all cores
    .venv/bin/python -m benchmarks.training --quick --threads 1
    .venv/bin/python -m benchmarks.training --models cgan,mcgan --steps 40

Per model, at the same batch size and torch threads:
  real     atelier.generator.train.train() for --steps steps on the model's own catalogue,
           fine-tuning the committed checkpoint (so each model has its trained architecture and,
           for the progressive ones, its last resolution): batches gathered from the
           preloaded catalogue tensor, the progress bar (to a log, as in a background run), the
           sample grid and the checkpoint at the end of the epoch;
  minimal  the same family's Trainer.step on its own copy of the same model with batches built
           beforehand: nothing but forward + backward + optimiser steps. The two loops take
           turns, one step each, so both see the machine in the same state.
images/s leaves out the first --warmup steps of each loop (allocator and kernel warm-up). The real
figure is per epoch: its steady step rate, plus the grid + checkpoint it writes once per epoch,
amortised over one epoch of the whole training split. Goal: overhead = 1 - real /
minimal under 10% per model. Loading the catalogue into memory (once per run) is reported apart.

Catalogues: runs/data/fmnist (Fashion-MNIST: cgan, cvae), runs/data/fpi-apparel-64 (Fashion
Product Images apparel-6x6 at 64 px: mcgan, cpggan, cdpggan), runs/data/fpi-apparel-128
(stage2). Where one is absent, and always with --quick, a small one is built under --out/tmp from
the Debian Fashion-MNIST files and $ATELIER_DATA/fashion_product_images_small (default
../shared/data). --quick trains tiny networks from scratch for a few steps: a smoke test.
This is a benchmark, not a test: nothing here asserts; read the report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/training.py` as well as `python -m benchmarks.training`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, command_line, goal, machine, run_and_report, table  # noqa: E402

NAME = "training"
TARGET = 0.10
CHECKPOINTS = REPO / "checkpoints"
DATA = REPO / "runs" / "data"


@dataclass(frozen=True)
class Model:
    family: str
    checkpoint: str  # committed folder under checkpoints/, fine-tuned by the real loop
    catalogue: str  # key of CATALOGUES
    batch_size: int  # of the committed run (progressive models choose their own per resolution)
    tiny: dict[str, Any] = field(default_factory=dict)  # --quick: from scratch with these options


MODELS = [
    Model("cgan", "cgan-fashion-mnist", "fmnist", 64, {"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}),
    Model("cvae", "cvae-fashion-mnist", "fmnist", 64, {"width": 8, "embed_dim": 8, "latent_dim": 8}),
    Model("mcgan", "mcgan-fpi-apparel", "fpi-64", 64, {"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}),
    Model("cpggan", "cpggan-fpi-apparel", "fpi-64", 64,
          {"g_width": 8, "d_width": 8, "max_width": 16, "batch_sizes": "4:16"}),
    Model("cdpggan", "cdpggan-fpi-apparel", "fpi-64", 64,
          {"g_width": 8, "d_width": 8, "max_width": 16, "batch_sizes": "4:16"}),
    Model("stage2", "stage2-fpi-apparel", "fpi-128", 32,
          {"stage1": str(CHECKPOINTS / "mcgan-fpi-apparel"), "g_width": 8, "d_width": 8, "ca_dim": 16}),
]
CATALOGUES = {"fmnist": ("fmnist", None), "fpi-64": ("fpi-apparel-64", 64), "fpi-128": ("fpi-apparel-128", 128)}
QUICK = {"steps": 3, "warmup": 1, "batch_size": 16, "rows": 160}


def data_root() -> Path:
    return Path(os.environ.get("ATELIER_DATA", REPO.parent / "shared" / "data"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default=",".join(m.family for m in MODELS),
                   help=f"families to measure, comma-separated (default all: {', '.join(m.family for m in MODELS)})")
    p.add_argument("--steps", type=int, default=30, help="training steps of each loop (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each loop left out of images/s (default 5)")
    p.add_argument("--data-dir", type=Path, default=DATA,
                   help="folder with the catalogues fmnist, fpi-apparel-64, fpi-apparel-128 (default runs/data)")
    p.add_argument("--data", type=Path, default=None,
                   help="source of catalogues built when absent: a folder with fashion_product_images_small/ "
                        "(default $ATELIER_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test, seconds: tiny networks from scratch, {QUICK['steps']} steps of "
                        f"{QUICK['batch_size']} ({QUICK['warmup']} warm-up) on {QUICK['rows']}-row catalogues")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {m.family for m in MODELS}
    if unknown:
        p.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(m.family for m in MODELS)}")
    if args.quick:
        args.steps, args.warmup = QUICK["steps"], QUICK["warmup"]
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


# -- catalogues ---------------------------------------------------------------------------------
def catalogue_for(key: str, args: argparse.Namespace, tmp: Path, rows: int) -> tuple[Path, str]:
    """(catalogue folder, where it came from): the real one, or a small one built under tmp."""
    folder, size = CATALOGUES[key]
    real = args.data_dir / folder
    if not args.quick and (real / "manifest.json").is_file():
        return real, str(real)
    dest = tmp / "catalogues" / folder
    if (dest / "manifest.json").is_file():
        return dest, f"built: first {rows} rows"
    if key == "fmnist":
        fashion_mnist_subset(dest, rows)
        return dest, f"built: first {rows} rows of the Debian Fashion-MNIST train split"
    from atelier.catalog.fashion_product_images import import_fashion_product_images

    source = (args.data or data_root()) / "fashion_product_images_small"
    if not source.is_dir():
        raise FileNotFoundError(f"no catalogue at {real} and no Fashion Product Images at {source} to build one from "
                                "(set ATELIER_DATA or --data)")
    import_fashion_product_images(source, dest, selection="apparel-6x6", size=size, limit=rows, progress=False)
    return dest, f"built: first {rows} apparel-6x6 products at {size} px"


def fashion_mnist_subset(dest: Path, rows: int) -> None:
    """The first `rows` images of the official train split (Debian's IDX files) as a catalogue."""
    import pyarrow as pa

    from atelier.catalog.catalogue import write_catalogue
    from atelier.catalog.fashion_mnist import CLASS_NAMES, SCHEMA, load_split, locate
    from atelier.catalog.images import encode_png

    images, labels = load_split(locate(download=False), "train")
    batch = pa.record_batch({
        "id": [f"train_{i:05d}" for i in range(rows)], "split": ["train"] * rows,
        "category": [CLASS_NAMES[int(k)] for k in labels[:rows]],
        "image": [encode_png(im[:, :, None]) for im in images[:rows]],
    })
    write_catalogue(dest, "fashion-mnist", SCHEMA, [batch], image_channels=1,
                    source={"dataset": "Fashion-MNIST", "first_train_rows": rows})


# -- the two loops, step by step in turn ---------------------------------------------------------
class Minimal:
    """The minimal loop: a second trainer of the same model, with batches built beforehand."""

    def __init__(self, model, batch_size: int, conditions):
        import torch

        from atelier.generator.base import family

        model.train()
        self.trainer = family(model.family).Trainer(model)
        batch = getattr(self.trainer, "batch_size", None) or batch_size
        generator = torch.Generator().manual_seed(0)
        shape = (batch, model.config.channels, model.config.image_size, model.config.image_size)
        self.batches = [(torch.rand(shape, generator=generator) * 2 - 1, conditions[i * batch : (i + 1) * batch].clone())
                        for i in range(len(conditions) // batch)]


class StepClock:
    """While installed, times every Trainer.step of a family (the real loop is left as it is) and,
    just before each, runs one step of the minimal loop, timed apart: the two loops take turns a
    step at a time, so both see the machine in the same state (on a shared machine, two runs one
    after the other differ by more than the overhead measured here)."""

    def __init__(self, trainer_class: type, minimal: Minimal):
        self.cls, self.original, self.minimal = trainer_class, trainer_class.step, minimal
        self.entries: list[float] = []
        self.exits: list[float] = []
        self.sizes: list[int] = []
        self.minimal_seconds: list[float] = []
        self.minimal_sizes: list[int] = []

    def __enter__(self) -> StepClock:
        clock, original, minimal = self, self.original, self.minimal

        def timed_step(trainer, real, condition):
            images, conditions = minimal.batches[len(clock.minimal_seconds) % len(minimal.batches)]
            start = time.perf_counter()
            original(minimal.trainer, images, conditions)
            clock.minimal_seconds.append(time.perf_counter() - start)
            clock.minimal_sizes.append(len(images))
            clock.entries.append(time.perf_counter())
            result = original(trainer, real, condition)
            clock.exits.append(time.perf_counter())
            clock.sizes.append(len(real))
            return result

        self.cls.step = timed_step
        return self

    def __exit__(self, *exc) -> None:
        self.cls.step = self.original

    def steady(self, warmup: int) -> dict[str, Any]:
        """The steps after the warm-up. Real: from the end of the last warm-up step to the end of the
        last step, less the minimal steps run in between (so what the loop does between steps
        counts); minimal: its steps alone. Seconds per step, and per step outside step()."""
        n = len(self.sizes) - warmup
        start = self.exits[warmup - 1] if warmup else self.entries[0] - self.minimal_seconds[0]
        seconds = self.exits[-1] - start - sum(self.minimal_seconds[warmup:])
        inside = sum(b - a for a, b in zip(self.entries[warmup:], self.exits[warmup:]))
        images, minimal_images = sum(self.sizes[warmup:]), sum(self.minimal_sizes[warmup:])
        minimal_seconds = sum(self.minimal_seconds[warmup:])
        return {"batch_size": self.sizes[-1], "steps": n,
                "real": {"images": images, "seconds": seconds, "images_per_second": images / seconds,
                         "step_seconds": seconds / n, "outside_step_seconds": (seconds - inside) / n},
                "minimal": {"images": minimal_images, "seconds": minimal_seconds,
                            "images_per_second": minimal_images / minimal_seconds, "step_seconds": minimal_seconds / n}}


def models_for(model: Model, catalogue: Path, args: argparse.Namespace):
    """(TrainConfig options, the minimal loop's own copy of the model the real loop starts from)."""
    from atelier.catalog.catalogue import Catalogue
    from atelier.generator.base import family
    from atelier.generator.checkpoint import load_generator

    if not args.quick:
        checkpoint = CHECKPOINTS / model.checkpoint
        return {"init": checkpoint}, load_generator(checkpoint)[0]
    cat = Catalogue.open(catalogue)
    image = cat.load_images(limit=1)[0][0]
    cls = family(model.family)
    config = cls.Config(**{"image_size": image.shape[0], "channels": image.shape[2], **model.tiny})
    return {"model_overrides": dict(model.tiny), "limit": QUICK["rows"]}, cls(cat.schema, config)


def conditions_of(catalogue: Path, n: int):
    """Condition vectors of the catalogue's first n rows, as train() encodes them."""
    import numpy as np
    import torch

    from atelier.catalog.catalogue import Catalogue

    cat = Catalogue.open(catalogue)
    rows = cat.attributes().select(list(cat.schema.names)).slice(0, n).to_pylist()
    return torch.from_numpy(np.stack([cat.schema.encode({k: v for k, v in r.items() if v is not None},
                                                        require_all=False) for r in rows]))


def measure(model: Model, catalogue: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """train() as `atelier train` runs it, its steps taking turns with the minimal loop's."""
    from atelier.generator.base import family
    from atelier.generator.train import TrainConfig, train

    batch_size = QUICK["batch_size"] if args.quick else model.batch_size
    options, copy = models_for(model, catalogue, args)
    minimal = Minimal(copy, batch_size, conditions_of(catalogue, 4 * 64))
    config = TrainConfig(catalogue=catalogue, out=out, model=model.family, epochs=1, max_steps=args.steps,
                         batch_size=batch_size, threads=args.threads, progress=True, device="cpu", **options)
    log = io.StringIO()  # the bar and the epoch line go to a log (not a terminal), as in a background run
    began = time.perf_counter()
    with StepClock(family(model.family).Trainer, minimal) as clock, contextlib.redirect_stderr(log):
        published = train(config)
    ended = time.perf_counter()
    training = json.loads((published / "manifest.json").read_text())["training"]
    steady = clock.steady(args.warmup)
    real = steady["real"]
    # one epoch of the whole training split: its steps at the steady rate, then its one grid + checkpoint
    epoch_end = ended - clock.exits[-1]
    steps_per_epoch = max(1, training["rows"] // steady["batch_size"])
    epoch_seconds = steps_per_epoch * real["step_seconds"] + epoch_end
    epoch_rate = steps_per_epoch * steady["batch_size"] / epoch_seconds
    return {
        "catalogue": str(catalogue), "batch_size": steady["batch_size"], "steps": args.steps,
        "warmup_steps": args.warmup, "steady": steady,
        "startup_seconds": clock.entries[0] - began - clock.minimal_seconds[0], "epoch_end_seconds": epoch_end,
        "training_rows": training["rows"], "steps_per_epoch": steps_per_epoch,
        "real_images_per_second": epoch_rate, "minimal_images_per_second": steady["minimal"]["images_per_second"],
        "overhead": 1 - epoch_rate / steady["minimal"]["images_per_second"],
        "outside_step_share": (steps_per_epoch * real["outside_step_seconds"] + epoch_end) / epoch_seconds,
        "manifest_images_per_second": training["images_per_second"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    began, host = time.perf_counter(), machine()  # the load average before this run adds its own
    tmp = args.out / "tmp" / NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    results: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    try:
        for model in [m for m in MODELS if m.family in args.models]:
            rows = QUICK["rows"] if args.quick else (args.steps + 2) * model.batch_size * 2
            catalogue, sources[model.catalogue] = catalogue_for(model.catalogue, args, tmp, rows)
            r = results[model.family] = measure(model, catalogue, tmp / "models" / model.family, args)
            print(f"{model.family}: real {r['real_images_per_second']:.1f} img/s, minimal "
                  f"{r['minimal_images_per_second']:.1f} img/s, overhead {r['overhead']:.3f}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()  # --out/tmp, when no other benchmark is using it

    rows = [[name, r["batch_size"], r["real_images_per_second"], r["minimal_images_per_second"], r["overhead"],
             r["outside_step_share"]] for name, r in results.items()]
    costs = [[name, r["steady"]["real"]["step_seconds"] * 1000, r["steady"]["minimal"]["step_seconds"] * 1000,
              r["steady"]["real"]["outside_step_seconds"] * 1000, r["epoch_end_seconds"], r["steps_per_epoch"],
              r["startup_seconds"], r["manifest_images_per_second"]] for name, r in results.items()]
    threads = torch.get_num_threads()
    what = ("tiny networks from scratch (--quick)" if args.quick else
            "the committed checkpoints, fine-tuned (their architectures; CPGGAN/CDPGGAN at their last resolution)")
    tables = [
        table(f"Training throughput per model, {threads} torch threads", ["model", "batch", "real images/s",
              "minimal images/s", "overhead (1 - real/minimal)", "real time outside step()"], rows,
              [f"Models: {what}. {args.steps} steps per loop, the first {args.warmup} left out.",
               "Real: train() per epoch of the whole training split: the steady step rate of the real loop "
               "(gathering batches from the catalogue tensor, the progress bar to a log), plus the epoch's sample "
               "grid + checkpoint.",
               "Minimal: the family's Trainer.step on its own copy of the same model with batches built "
               "beforehand; its steps take turns with the real loop's, one each, so both see the same machine.",
               "Real time outside step(): the share of the real epoch spent outside Trainer.step (batches, "
               "progress bar, grid, checkpoint), measured directly.",
               "Catalogues: " + "; ".join(f"{k}: {v}" for k, v in sources.items()) + "."]),
        table("Where the real loop's time goes", ["model", "real ms per step", "minimal ms per step",
              "real ms per step outside step()", "grid + checkpoint per epoch (s)", "steps per epoch",
              "start-up once per run (s)", "manifest images/s"], costs,
              ["Start-up: opening the catalogue, decoding it into one tensor, loading the checkpoint "
               "(once per run, not in images/s; the first model's includes torch's one-time initialisation).",
               f"Manifest images/s: what train() records (images seen / seconds since start-up), here over only "
               f"{args.steps} steps, so warm-up and the grid + checkpoint weigh far more than in a real run, and "
               "the minimal loop's turns are in it."]),
    ]
    return {
        "benchmark": NAME, "command": command_line(), "seconds": time.perf_counter() - began, "machine": host,
        "models": results, "tables": tables,
        "goals": [goal(f"{name}: training overhead (1 - real/minimal)", r["overhead"], TARGET, higher_is_better=False)
                  for name, r in results.items()],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
