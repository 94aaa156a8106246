"""`atelier distill`: a one-pass flow that draws what a many-step flow draws.

A trained flow (the teacher) maps noise z and a condition to a drawing by integrating its ODE
in `sample_steps` steps with guidance: 40 network passes per drawing at the defaults (10
midpoint steps, each with a conditional and an unconditional pass). The student is a copy of
the teacher's network trained to make the same map in one Euler step, x = z + v(z, 0, c),
by mean squared error against the teacher's drawings for the same z and c (distillation of
the ODE's end point, Luhman & Luhman 2021; rectified flow's nearly straight paths make that map
smooth, Liu et al. 2022). Guidance is folded in: the student serves with guidance 1, so a
drawing costs one pass, about 1/40 of the teacher's. The teacher may draw with other sampling
options than its checkpoint's (`teacher_sampling`, e.g. a lower guidance for more varied
drawings); the student learns whatever the teacher draws.

Pairs: condition i is training row i's (cycling through the train split), with groups left out
as in the teacher's training (`condition_dropout`, `drop_all`), so the student still takes any
subset of the groups; its noise is drawn from seed i as serving draws it. The teacher's
drawings are computed once, a chunk at a time, each chunk saved as it finishes under
`<out>.pairs/` (a killed run keeps them), and reused by every epoch and by `--resume`.

The student is a checkpoint of the flow family (sample_steps 1, euler, guidance 1): it is
served, evaluated and sampled like any flow; its manifest says which teacher it came from.
It is trained by `atelier train`'s loop (`train.run_epochs`), so it writes the same sample grids
and TensorBoard event files (`<out>.tensorboard/`, `events.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.generator.checkpoint import load_extra, load_generator
from atelier.generator.flow import Flow, FlowTrainer, training_condition
from atelier.generator.train import Publisher, Run, TrainConfig, prepare_data, run_epochs
from atelier.progress import progress_bar

__all__ = ["DistillConfig", "DistillTrainer", "distill", "sampling_tag", "teacher_pairs"]

STUDENT_SAMPLING = {"sample_steps": 1, "solver": "euler", "guidance": 1.0}


@dataclass
class DistillConfig:
    teacher: Path
    catalogue: Path  # the teacher's catalogue: its train split gives the conditions' mix
    out: Path
    teacher_sampling: dict[str, Any] = field(default_factory=dict)  # e.g. {"guidance": 1.2}; else the teacher's own
    pairs: int = 20_000  # teacher drawings to learn from
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    max_seconds: float | None = None
    max_steps: int | None = None
    chunk: int = 250  # teacher drawings per saved chunk
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    progress: bool = True
    command: str | None = None
    tensorboard: bool = True  # event files in `<out>.tensorboard/`, as `atelier train` writes them
    log_every: int = 10


class DistillTrainer(FlowTrainer):
    """FlowTrainer's optimiser, warm-up, clipping and EMA, on the one-step regression loss. A
    batch holds the teacher's drawing and its noise side by side on the channel axis."""

    def step(self, pair: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        channels = pair.shape[1] // 2
        target, noise = pair[:, :channels], pair[:, channels:]
        return self.update(one_step_loss(self.online, noise, condition, target))


def one_step_loss(model: Flow, noise: torch.Tensor, condition: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between one Euler step from the noise, z + v(z, 0, c), and the teacher's drawing."""
    t = torch.zeros(len(noise), device=noise.device)
    return F.mse_loss(noise + model.velocity(noise, t, condition), target)


def pair_conditions(teacher: Flow, conditions: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n condition vectors: the train rows in turn, groups left out as the teacher was trained."""
    rows = conditions[torch.arange(n) % len(conditions)]
    torch.manual_seed(seed)
    cfg = teacher.config
    return training_condition(rows, teacher.embed.sizes, cfg.condition_dropout, cfg.drop_all)


def sampling_tag(teacher: Flow) -> str:
    """A short hash of how the teacher draws, so pairs drawn with other sampling are never reused."""
    return hashlib.sha256(json.dumps(teacher.sampling(), sort_keys=True).encode()).hexdigest()[:8]


def teacher_pairs(teacher: Flow, teacher_sha256: str, conditions: torch.Tensor, folder: Path, chunk: int, seed: int,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, condition, teacher drawing) for each condition row: pair i's noise from seed
    `seed + i`. Chunks already in `folder` from the same teacher weights, sampling options, seed
    and conditions are read back."""
    folder.mkdir(parents=True, exist_ok=True)
    parts, tag = [], sampling_tag(teacher)
    with progress_bar(total=len(conditions), desc="teacher drawings", unit="img", disable=not progress) as bar:
        for start in range(0, len(conditions), chunk):
            cond = conditions[start:start + chunk]
            path = folder / f"pairs-{teacher_sha256[:12]}-{tag}-{seed}-{start:08d}-{len(cond)}.safetensors"
            if path.is_file():
                saved = load_file(path)
                if torch.equal(saved["condition"], cond):
                    parts.append(saved)
                    bar.update(len(cond))
                    continue
            seeds = range(seed + start, seed + start + len(cond))
            noise = torch.stack([torch.randn(teacher.latent_dim, generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
            with torch.inference_mode():
                drawing = teacher(noise, cond)  # the ODE's end point, in [-1, 1]
            part = {"noise": noise.view_as(drawing).contiguous(), "condition": cond.contiguous(),
                    "drawing": drawing.contiguous()}
            partial = path.with_suffix(f".{os.getpid()}.partial")
            save_file(part, str(partial))
            os.replace(partial, path)  # whole chunks only
            parts.append(part)
            bar.update(len(cond))
    return tuple(torch.cat([p[k] for p in parts]) for k in ("noise", "condition", "drawing"))  # type: ignore[return-value]


def _student(cfg: DistillConfig, teacher: Flow, teacher_manifest: dict[str, Any]) -> Run:
    """A new student (the teacher's weights, one-step sampling) or the one at --out (resume)."""
    if cfg.resume and Path(cfg.out).exists():
        student, manifest = load_generator(cfg.out)
        trainer = DistillTrainer(student.train())
        for name, module in trainer.extra_state().items():
            load_extra(cfg.out, name, module)
        done = manifest.get("training", {})
        return Run(student, trainer, start_epoch=int(done.get("epochs", 0)), images_seen=int(done.get("images_seen", 0)),
                   seconds_before=float(done.get("seconds", 0.0)), init_record=done.get("init_from", {}))
    # a cool-down counts the teacher's steps; the student's count starts again at 0, at a constant rate
    config = dataclasses.replace(teacher.config, lr=cfg.lr, cooldown_start=0, cooldown_steps=0, **STUDENT_SAMPLING)
    student = Flow(teacher.schema, config)
    student.load_state_dict(teacher.state_dict())
    student.trained_steps.zero_()  # the student's own step count: its warm-ups start again
    record = {"path": str(cfg.teacher), "weights_sha256": teacher_manifest["weights_sha256"],
              "distilled": {"teacher_sampling": teacher.sampling(),
                            "pairs": cfg.pairs, "seed": cfg.seed},
              "training": teacher_manifest.get("training", {})}
    return Run(student.train(), DistillTrainer(student), init_record=record)


def distill(cfg: DistillConfig) -> Path:
    """Distil the teacher into a one-step flow at `cfg.out`; returns the published checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.pairs < cfg.batch_size:
        raise ValueError(f"--pairs {cfg.pairs} is fewer than one batch of {cfg.batch_size}")
    teacher, teacher_manifest = load_generator(cfg.teacher, sampling=cfg.teacher_sampling or None)
    if teacher.family != "flow":
        raise ValueError(f"{cfg.teacher} holds a {teacher.family!r} model; only a flow can be distilled")
    catalogue = Catalogue.open(cfg.catalogue)
    difference = teacher.schema.describe_difference(catalogue.schema)
    if difference:
        raise ValueError(f"{cfg.teacher} was trained on another schema than {cfg.catalogue}: {difference}")
    _, conditions, attrs = prepare_data(catalogue, "train", None, teacher.image_size)
    wanted = pair_conditions(teacher, conditions, cfg.pairs, cfg.seed)
    noise, condition, drawing = teacher_pairs(teacher, teacher_manifest["weights_sha256"], wanted,
                                              Path(f"{cfg.out}.pairs"), cfg.chunk, cfg.seed, cfg.progress)
    run = _student(cfg, teacher, teacher_manifest)
    train_cfg = TrainConfig(catalogue=cfg.catalogue, out=cfg.out, model="flow", epochs=cfg.epochs,
                            batch_size=cfg.batch_size, max_seconds=cfg.max_seconds, max_steps=cfg.max_steps,
                            seed=cfg.seed, progress=cfg.progress, command=cfg.command,
                            tensorboard=cfg.tensorboard, log_every=cfg.log_every)
    publisher = Publisher(train_cfg, catalogue, run, attrs, rows=len(drawing))
    try:
        run_epochs(train_cfg, run, torch.cat([drawing, noise], dim=1), condition, publisher)
    finally:
        publisher.close()
    return artifacts.resolve(cfg.out)
