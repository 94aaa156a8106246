"""Data-parallel training: one process per share of the machine (or per GPU) under torchrun.

    torchrun --standalone --nproc_per_node 2 -m atelier train --model flow --catalogue ... --out ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `join()` reads them and
joins the process group (gloo on CPU, NCCL on CUDA). Without them (a plain `atelier train`) it
returns a world of one and nothing below costs anything.

What each process does (`train.run_epochs`): the same epoch order (it depends on the seed and the
epoch alone), a global batch of `world_size x --batch-size` consecutive rows of it, and its own
slice of that batch. Gradients are averaged over the processes as each parameter's gradient is
accumulated in the backward pass (`average_gradients`), so every optimizer step, gradient
clipping included, sees the gradient of the whole global batch and every process takes the same
step. This is DistributedDataParallel's all-reduce, done with parameter hooks instead of the
`DistributedDataParallel` wrapper: a family's trainer owns several networks and optimizers (a
GAN's discriminator is run on real and generated images in one step, and the generator's step
runs backward through it), and the wrapper would also rename every weight in the checkpoint.

What is not the same as one process on the global batch:
- BatchNorm statistics are each process's own (as under DDP without SyncBatchNorm, which runs
  on GPUs only); the GAN families normalise over the local batch.
- Random draws: a trainer that draws through `StepRandom` (the flow) draws for the whole global
  batch from a generator seeded by the step, and takes its rows, so its run equals one process's
  run on the same global batches. Other families draw from each process's own seed (seed + rank).

Rank 0 alone writes checkpoints, sample grids, TensorBoard events and the per-epoch line; the
others only train. A run resumed under torchrun (`--resume`) loads the checkpoint in every process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "StepRandom", "join", "finish_together", "leave", "broadcast_from_main", "average_gradients", "any_rank"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def join(device_type: str) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1; the backend follows the device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 without RANK and MASTER_ADDR: start distributed training with "
                           "torchrun (e.g. torchrun --standalone --nproc_per_node 2 -m atelier train ...)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        # a long timeout: rank 0 samples the epoch's grid and writes the checkpoint while the
        # others already wait in the next step's all-reduce
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 backend=backend)


def finish_together(world: World) -> None:
    """Wait until every process is done (rank 0's last checkpoint is published) after a run that
    succeeded; never on an error path, where the others may be waiting in an all-reduce."""
    if world.is_distributed:
        dist.barrier()


def leave(world: World) -> None:
    if world.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def _unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def broadcast_from_main(world: World, modules: Iterable[nn.Module]) -> None:
    """Every process starts from rank 0's weights and buffers (its initialisation, or the checkpoint)."""
    if not world.is_distributed:
        return
    with torch.no_grad():
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)


def average_gradients(world: World, modules: Iterable[nn.Module]) -> None:
    """Average each parameter's gradient over the processes as soon as the backward pass has
    accumulated it, so whatever the trainer does next (clipping, the step) sees the global one.

    All-reduce is linear, so a trainer that calls backward several times before a step still ends
    with the average of the sums; parameters that get no gradient in a step are not touched.
    """
    if not world.is_distributed:
        return

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world.size)

    for p in _unique_parameters(modules):
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True when the flag is true in any process (a time budget must stop every process at once)."""
    if not world.is_distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StepRandom:
    """One training step's random draws for the whole global batch, of which this process holds a slice.

    Seeded by (seed, step) alone, so processes agree without talking, a resumed run draws what an
    unbroken one would, and a world of two processes with batch B draws exactly what one process
    with batch 2B draws: each process draws the global shape and keeps its own rows.
    """

    def __init__(self, seed: int, step: int, world: World, rows: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))
        self.world, self.rows, self.device = world, rows, device

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        start = self.world.rank * self.rows
        return full[start : start + self.rows]

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) of shape (rows, *shape)."""
        full = torch.rand((self.rows * self.world.size, *shape), generator=self.generator, device=self.device)
        return self._mine(full)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal of shape (rows, *shape)."""
        full = torch.randn((self.rows * self.world.size, *shape), generator=self.generator, device=self.device)
        return self._mine(full)
