"""The training loop: catalogue -> tensors -> family trainer steps -> grids and checkpoints.

The loop knows nothing about a family's losses: `Family.Trainer(model).step(images, condition)`
does one optimisation step and returns its losses. Each epoch writes a sample grid (one column
per value of the first attribute group, same z every epoch so grids compare) and publishes a
checkpoint atomically, so a killed run leaves the last epoch's checkpoint intact. TensorBoard
event files (losses, images/s, learning rate, the grid each epoch) go to `<out>.tensorboard/`
(`events.py`), beside the checkpoint, never into it.

Under torchrun each process trains on its slice of every global batch and rank 0 alone
publishes (`distributed.py`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.catalog.images import encode_png, image_grid, to_square
from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, Trainer, family, sample_seeds
from atelier.generator.checkpoint import load_extra, load_generator, save_checkpoint
from atelier.generator.distributed import (
    World,
    any_rank,
    average_gradients,
    broadcast_from_main,
    finish_together,
    join,
    leave,
)
from atelier.generator.events import TrainingEvents
from atelier.progress import progress_bar

GRID_COLUMNS_MAX = 12


@dataclass
class TrainConfig:
    catalogue: Path
    out: Path
    model: str = "cgan"
    epochs: int = 20
    batch_size: int = 64
    max_seconds: float | None = None  # stop (and save) once this much time has passed
    max_steps: int | None = None
    split: str | None = "train"  # None: every row
    limit: int | None = None  # first N rows only (tests, smoke runs)
    image_size: int | None = None  # None: the catalogue's own size
    seed: int = 0
    threads: int | None = None
    resume: bool = False  # continue the run whose checkpoint is at `out`
    init: Path | None = None  # start from another checkpoint's weights (fine-tune) into `out`
    grid_rows: int = 8
    model_overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    command: str | None = None  # recorded in the manifest
    device: str = "auto"  # cpu, cuda, or auto (cuda when available)
    # compositional hold-out: this fraction of all value combinations of these groups is removed
    # from training (drawn with `seed` among those with >= hold_out_min_rows rows) and recorded
    hold_out_groups: tuple[str, ...] = ()
    hold_out_fraction: float = 0.1
    hold_out_min_rows: int = 40
    tensorboard: bool = True  # event files in `<out>.tensorboard/` (global step: images seen)
    log_every: int = 10  # optimisation steps per logged point (their mean losses and images/s)


def prepare_data(catalogue: Catalogue, split: str | None, limit: int | None, image_size: int | None):
    """Images as float32 NCHW in [-1, 1] and condition vectors, in catalogue order."""
    has_split = split is not None and split in set(catalogue.attributes().column("split").to_pylist())
    images, rows = catalogue.load_images(split=split if has_split else None, limit=limit)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        images = np.stack([to_square(im, image_size, pad_value=_background(images)) for im in images])
    schema = catalogue.schema
    attrs = rows.select(list(schema.names)).to_pylist()
    conditions = np.stack([schema.encode({k: v for k, v in a.items() if v is not None}, require_all=False) for a in attrs])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return tensor.contiguous(), torch.from_numpy(conditions), attrs


def held_out_combinations(schema: AttributeSchema, attrs: list[dict[str, Any]], groups: tuple[str, ...],
                          fraction: float, seed: int, min_rows: int) -> list[dict[str, str]]:
    """`fraction` of all value combinations of `groups` (10% of 6 x 6 type x colour pairs -> 4).

    Drawn among the combinations with at least `min_rows` rows, so each held-out one has real
    products to judge and retrieve against; the same seed and catalogue give the same draw.
    """
    for name in groups:
        if name not in schema.names or schema.group(name).multi_label:
            single = [g.name for g in schema.groups if not g.multi_label]
            raise ValueError(f"--hold-out group {name!r} is not a single-label group of the catalogue; allowed: {single}")
    if len(groups) < 2:
        raise ValueError("--hold-out needs at least two groups (a combination of attributes), e.g. type,colour")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--hold-out-fraction {fraction} must be between 0 and 1")
    total = int(np.prod([len(schema.group(g).values) for g in groups]))
    wanted = max(1, round(fraction * total))
    counts: dict[tuple, int] = {}
    for a in attrs:
        key = tuple(a.get(g) for g in groups)
        if None not in key:
            counts[key] = counts.get(key, 0) + 1
    candidates = sorted(k for k, n in counts.items() if n >= min_rows)
    if len(candidates) < wanted:
        raise ValueError(f"only {len(candidates)} combinations of {groups} have {min_rows}+ rows, "
                         f"fewer than the {wanted} to hold out; lower --hold-out-min-rows or the fraction")
    chosen = np.random.default_rng(seed).choice(len(candidates), size=wanted, replace=False)
    return [dict(zip(groups, candidates[i])) for i in sorted(chosen)]


def _background(images: np.ndarray) -> int:
    """Pad with the images' own border colour (black for Fashion-MNIST, white for product photos)."""
    return int(np.median(np.concatenate([images[:, 0].ravel(), images[:, -1].ravel()])))


def grid_conditions(schema: AttributeSchema, attrs: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """One condition per value of the first group; other single-label groups at their commonest value."""
    first = schema.groups[0]
    fixed: dict[str, Any] = {}
    for g in schema.groups[1:]:
        if not g.multi_label:
            values = [a[g.name] for a in attrs if a.get(g.name) is not None]
            if values:
                fixed[g.name] = max(set(values), key=values.count)
    columns = list(first.values[:GRID_COLUMNS_MAX])
    conds = np.stack([schema.encode({first.name: v, **fixed}, require_all=False) for v in columns])
    return conds, columns


def sample_grid(model: ConditionalGenerator, conditions: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """rows x len(conditions) images: column j is condition j, row i uses seed i."""
    seeds = sample_seeds(seed, rows)
    cond = np.repeat(conditions[None], rows, axis=0).reshape(-1, conditions.shape[1])
    images = model.sample_conditions(cond, [s for s in seeds for _ in range(len(conditions))])
    return image_grid(images, columns=len(conditions))


def attribute_grid(model: ConditionalGenerator, rows: str, columns: str, seed: int = 0,
                   fixed: dict[str, Any] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """One image per (row value, column value) of two attribute groups, e.g. colours x types.

    Other groups take the values in `fixed`, or are left out (models with an "any" embedding).
    Every cell uses the same z, so the grid shows what the attributes change.
    """
    schema = model.schema
    row_values, column_values = schema.group(rows).values, schema.group(columns).values
    cells = [{**(fixed or {}), rows: r, columns: c} for r in row_values for c in column_values]
    conditions = np.stack([schema.encode(cell, require_all=not model.accepts_partial) for cell in cells])
    images = model.sample_conditions(conditions, [seed] * len(cells))
    return image_grid(images, columns=len(column_values)), list(row_values), list(column_values)


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


@dataclass
class Run:
    """A run's model and trainer, and what it had done before this process started (a resume)."""

    model: ConditionalGenerator
    trainer: Trainer
    start_epoch: int = 0
    images_seen: int = 0
    seconds_before: float = 0.0
    init_record: dict[str, Any] = field(default_factory=dict)  # the checkpoint a fine-tune started from
    held_out: list[dict[str, str]] = field(default_factory=list)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) a model; returns the published checkpoint's folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    world = join(device.type)
    try:
        if world.is_distributed and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        # rank 0 initialises as a single process would; the others' own draws differ (their
        # weights are replaced by rank 0's below)
        torch.manual_seed(cfg.seed + world.rank)
        np.random.seed(cfg.seed + world.rank)
        catalogue = Catalogue.open(cfg.catalogue)
        images, conditions, attrs, held_out = training_data(cfg, catalogue)
        run = start_run(cfg, catalogue, device, held_out, channels=images.shape[1], image_size=images.shape[2])
        first_batch = (getattr(run.trainer, "batch_size", None) or cfg.batch_size) * world.size
        if len(images) < first_batch:
            raise ValueError(f"{len(images)} training images is fewer than one global batch of {first_batch}")
        trained = [run.model, *run.trainer.extra_state().values()]
        broadcast_from_main(world, trained)
        average_gradients(world, trained)
        if hasattr(run.trainer, "world"):  # a trainer that draws per global batch (distributed.StepRandom)
            run.trainer.seed, run.trainer.world = cfg.seed, world
        publisher = Publisher(cfg, catalogue, run, attrs, rows=len(images), world=world)
        try:
            run_epochs(cfg, run, images.to(device), conditions.to(device), publisher, world)
        finally:
            publisher.close()
        finish_together(world)
    finally:
        leave(world)
    return artifacts.resolve(cfg.out)


def training_data(cfg: TrainConfig, catalogue: Catalogue):
    """(images, conditions, attributes, held-out combinations): the rows to train on."""
    images, conditions, attrs = prepare_data(catalogue, cfg.split, cfg.limit, cfg.image_size)
    held_out: list[dict[str, str]] = []
    if cfg.hold_out_groups:
        held_out = held_out_combinations(catalogue.schema, attrs, tuple(cfg.hold_out_groups), cfg.hold_out_fraction,
                                         cfg.seed, cfg.hold_out_min_rows)
        keep = [i for i, a in enumerate(attrs) if not any(all(a.get(g) == v for g, v in h.items()) for h in held_out)]
        images, conditions, attrs = images[keep], conditions[keep], [attrs[i] for i in keep]
    return images, conditions, attrs, held_out


def start_run(cfg: TrainConfig, catalogue: Catalogue, device: torch.device, held_out: list[dict[str, str]],
              channels: int, image_size: int) -> Run:
    """A new model, or the one at --out (resume: the counts go on) or at --init (fine-tune)."""
    cls = family(cfg.model)
    source = cfg.out if cfg.resume and Path(cfg.out).exists() else cfg.init
    if source is None:
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        bad = set(cfg.model_overrides) - fields
        if bad:
            raise ValueError(f"unknown {cfg.model} option(s) {sorted(bad)}; allowed: {sorted(fields)}")
        arch = cls.Config(**{"image_size": image_size, "channels": channels, **cfg.model_overrides})
        model = cls(catalogue.schema, arch).to(device).train()
        return Run(model, cls.Trainer(model), held_out=held_out)
    model, manifest = load_generator(source)
    if model.family != cfg.model:
        raise ValueError(f"{source} holds a {model.family!r} model, not {cfg.model!r}")
    difference = model.schema.describe_difference(catalogue.schema)
    if difference:
        raise ValueError(f"{source} was trained on another schema: {difference}")
    fine_tune = source != cfg.out
    changed = {k: v for k, v in cfg.model_overrides.items() if not model.keeps_option(k, v)}
    changeable = model.changeable_options(fine_tune)
    refused = sorted(set(changed) - set(changeable))
    if refused:
        allowed = ", ".join(changeable) or "none"
        raise ValueError(f"cannot change {refused} of the model loaded from {source} (this "
                         f"{'fine-tuned' if fine_tune else 'resumed'} run may change only: {allowed})")
    if changed:  # recorded in the checkpoint's config, so resuming this run keeps its schedule
        model.change_options(changed)
    model.to(device).train()
    trainer = cls.Trainer(model)
    for name, module in trainer.extra_state().items():
        load_extra(source, name, module)
    done = manifest.get("training", {})
    if fine_tune:  # a new run that records where it started
        init = {"path": str(source), "weights_sha256": manifest["weights_sha256"], "training": done}
        return Run(model, trainer, init_record=init, held_out=held_out)
    if done.get("held_out", []) != held_out:
        raise ValueError(f"{source} was trained holding out {done.get('held_out', [])}, this run would hold "
                         f"out {held_out}: repeat the original --hold-out options")
    return Run(model, trainer, start_epoch=int(done.get("epochs", 0)), images_seen=int(done.get("images_seen", 0)),
               seconds_before=float(done.get("seconds", 0.0)), init_record=done.get("init_from", {}),
               held_out=held_out)


class Publisher:
    """Publishes the run's checkpoint (atomically) with its sample grid and training record, and
    keeps its TensorBoard events (when `cfg.tensorboard`); `close()` it when the run ends.
    In a data-parallel run only rank 0's publisher writes anything."""

    def __init__(self, cfg: TrainConfig, catalogue: Catalogue, run: Run, attrs: list[dict[str, Any]], rows: int,
                 world: World | None = None):
        self.cfg, self.catalogue, self.run, self.rows = cfg, catalogue, run, rows
        self.world = world or World()
        self.grid_conditions, self.grid_columns = grid_conditions(catalogue.schema, attrs)
        self.grids = Path(f"{cfg.out}.samples")
        if self.world.is_main:
            self.grids.mkdir(parents=True, exist_ok=True)
        self.events = (TrainingEvents(Path(f"{cfg.out}.tensorboard"), run.trainer, run.images_seen, cfg.log_every)
                       if cfg.tensorboard and self.world.is_main else None)
        self.started = time.perf_counter()

    def begin_epoch(self) -> None:
        if self.events:
            self.events.begin_epoch()

    def record(self, losses: dict[str, float], images: int) -> None:
        """One optimisation step's losses (`run.images_seen` already counts its `images`)."""
        if self.events:
            self.events.step(self.run.images_seen, losses, images)

    def close(self) -> None:
        if self.events:
            self.events.close()

    def seconds(self) -> float:
        return self.run.seconds_before + time.perf_counter() - self.started

    def publish(self, epochs_done: int, losses: dict[str, float]) -> Path | None:
        cfg, run = self.cfg, self.run
        if not self.world.is_main:
            return None
        grid = sample_grid(run.model, self.grid_conditions, cfg.grid_rows, seed=cfg.seed)
        png = encode_png(grid)
        grid_file = self.grids / f"epoch-{epochs_done:03d}.png"
        partial = grid_file.with_suffix(".png.partial")  # a killed run never leaves half a PNG
        partial.write_bytes(png)
        os.replace(partial, grid_file)
        seconds = self.seconds()
        training = {
            "catalogue": self.catalogue.name, "catalogue_fingerprint": self.catalogue.fingerprint, "split": cfg.split,
            "rows": self.rows, "epochs": epochs_done, "images_seen": run.images_seen, "batch_size": cfg.batch_size,
            "world_size": self.world.size,  # processes; each trained on batch_size rows of every global batch
            "seconds": round(seconds, 1), "images_per_second": round(run.images_seen / max(seconds, 1e-9), 1),
            "seed": cfg.seed, "losses": losses, "grid_columns": self.grid_columns,
            "command": cfg.command or " ".join(sys.argv), "machine": machine_description(),
        }
        if run.init_record:
            training["init_from"] = run.init_record
        if run.held_out:
            training["held_out"] = run.held_out  # combinations never seen in training (`atelier eval` reads them)
        published = save_checkpoint(run.model, cfg.out, training, extra=run.trainer.extra_state(),
                                    files={"samples.png": png})
        if self.events:  # after the checkpoint: what the events show at this step is what it holds
            self.events.epoch(run.images_seen, epochs_done, grid, png)
        return published


def run_epochs(cfg: TrainConfig, run: Run, images: torch.Tensor, conditions: torch.Tensor,
               publisher: Publisher, world: World | None = None) -> None:
    """The epoch loop: shuffled batches through `trainer.step`, a checkpoint after each epoch,
    and one more when --max-steps or --max-seconds stops the run inside an epoch.

    Data-parallel: every process walks the same order in global batches of world-size x the
    batch and trains on its own slice of each."""
    world = world or World()
    start, step, losses = time.perf_counter(), 0, {}
    last_epoch = run.start_epoch + cfg.epochs
    for epoch in range(run.start_epoch, last_epoch):
        # each epoch's order depends on the seed and the epoch alone, so a resumed run (which
        # starts again at the epoch it stopped in) sees the batches an unbroken run would
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(images), generator=generator).to(images.device)
        bar = progress_bar(total=len(images), unit="img", desc=f"epoch {epoch + 1}/{last_epoch}",
                           disable=not cfg.progress or not world.is_main, leave=False)
        position, stopped, epoch_complete = 0, False, True
        epoch_started, epoch_images = time.perf_counter(), 0
        publisher.begin_epoch()
        while True:
            # progressive models change their batch size with the resolution they are at
            batch = (getattr(run.trainer, "batch_size", None) or cfg.batch_size) * world.size
            if position + batch > len(images):
                break
            mine = batch // world.size
            idx = order[position + world.rank * mine : position + (world.rank + 1) * mine]
            position += batch
            losses = run.trainer.step(images[idx], conditions[idx])
            run.images_seen += batch
            epoch_images += batch
            step += 1
            publisher.record(losses, batch)  # the losses are rank 0's slice of the batch
            bar.update(batch)
            if step % 20 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            out_of_time = bool(cfg.max_seconds) and time.perf_counter() - start >= cfg.max_seconds
            if cfg.max_seconds:  # clocks differ: every process stops at the step the first one stops at
                out_of_time = any_rank(world, out_of_time, images.device)
            if (cfg.max_steps and step >= cfg.max_steps) or out_of_time:
                stopped, epoch_complete = True, position + batch > len(images)
                break
        bar.close()
        if any(not np.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"epoch {epoch + 1}: losses became non-finite {losses}; last checkpoint kept")
        # this epoch's speed: the manifest's images_per_second averages the whole run, resumes included
        rate = epoch_images / max(time.perf_counter() - epoch_started, 1e-9)
        publisher.publish(epoch + (1 if epoch_complete else 0), losses)
        if world.is_main:
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
                  + f", {rate:.0f} img/s -> {cfg.out}", file=sys.stderr)  # a line per epoch, bar or not
        if stopped:
            break
