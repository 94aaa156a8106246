"""TensorBoard event files of a training run, in `<out>.tensorboard/` beside the checkpoint.

Never inside the checkpoint folder: that one is hashed and published whole each epoch. The
global step of every event is the number of training images seen (the manifest's
`images_seen`), so runs with other batch sizes, and a progressive model whose batch changes
with its resolution, share one x axis, and a `--resume`d run goes on from the count its
checkpoint recorded. Each process's file starts with a restart marker one past that count:
TensorBoard hides whatever a killed process logged after its last checkpoint.

Every `log_every` optimisation steps (and at the end of each epoch, for the steps left over):
`loss/<name>` for each value the trainer's `step` returned (the mean over those steps),
`images_per_second` (over those steps' wall time) and `lr` (`lr/<optimizer>` for a trainer
with several), read from the trainer's `torch.optim` optimizers. Each epoch: `samples` (the
PNG of `<out>.samples/epoch-NNN.png`, byte for byte), `epoch/loss/<name>` (the means over the
epoch), `epoch/images_per_second` and `epoch/epochs` (epochs done); then the file is flushed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["TrainingEvents", "learning_rates"]


def learning_rates(trainer: object) -> dict[str, float]:
    """The current learning rate of each `torch.optim` optimizer the trainer holds, by tag."""
    optimizers = {name: value for name, value in vars(trainer).items() if isinstance(value, torch.optim.Optimizer)}
    if len(optimizers) == 1:
        return {"lr": next(iter(optimizers.values())).param_groups[0]["lr"]}
    return {f"lr/{name.removeprefix('opt_')}": opt.param_groups[0]["lr"] for name, opt in sorted(optimizers.items())}


class _Means:
    """Running sums of the losses, images and seconds of some steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = self.images = 0

    def add(self, losses: dict[str, float], images: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class TrainingEvents:
    """Writes a run's scalars and sample grids; `close()` it at the end, or when the run fails."""

    def __init__(self, folder: Path, trainer: object, images_seen: int, log_every: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        if log_every < 1:
            raise ValueError(f"--log-every {log_every} must be at least 1")
        self.folder, self.trainer, self.log_every = Path(folder), trainer, log_every
        # one past the checkpoint's count: a killed process's later events are hidden, the
        # checkpointed epoch's own are kept
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=images_seen + 1)
        self.images_seen = images_seen
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Start the clocks (publishing the previous epoch's checkpoint is not training time)."""
        self.interval, self.epoch_means = _Means(), _Means()
        self.interval_start = self.epoch_start = self.last_step = time.perf_counter()

    def step(self, images_seen: int, losses: dict[str, float], images: int) -> None:
        """One optimisation step of `images` images, after which `images_seen` have been seen."""
        self.last_step, self.images_seen = time.perf_counter(), images_seen
        self.interval.add(losses, images)
        self.epoch_means.add(losses, images)
        if self.interval.steps >= self.log_every:
            self._write_interval(images_seen)

    def _write_interval(self, images_seen: int) -> None:
        seconds = self.last_step - self.interval_start
        for name, value in self.interval.means().items():
            self.writer.add_scalar(f"loss/{name}", value, images_seen)
        self.writer.add_scalar("images_per_second", self.interval.images / max(seconds, 1e-9), images_seen)
        for tag, value in learning_rates(self.trainer).items():
            self.writer.add_scalar(tag, value, images_seen)
        self.interval, self.interval_start = _Means(), self.last_step

    def epoch(self, images_seen: int, epochs_done: int, grid: np.ndarray, png: bytes) -> None:
        """The epoch's sample grid (`png` encodes `grid`, H x W x C) and its averages; flushed."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self.interval.steps:
            self._write_interval(images_seen)
        height, width, channels = grid.shape
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag="samples", image=image)]), images_seen)
        for name, value in self.epoch_means.means().items():
            self.writer.add_scalar(f"epoch/loss/{name}", value, images_seen)
        if self.epoch_means.steps:
            seconds = self.last_step - self.epoch_start
            self.writer.add_scalar("epoch/images_per_second", self.epoch_means.images / max(seconds, 1e-9), images_seen)
        self.writer.add_scalar("epoch/epochs", epochs_done, images_seen)
        self.writer.flush()

    def close(self) -> None:
        """Writes the steps not logged yet (a run that failed inside an epoch shows its last losses)."""
        if self.interval.steps:
            self._write_interval(self.images_seen)
        self.writer.close()
