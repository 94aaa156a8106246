"""TensorBoard event files of `atelier train` and `atelier distill` (atelier/generator/events.py),
read back with TensorBoard's own reader: the tags, their steps (images seen), one grid per epoch,
a resumed run going on from its checkpoint's count, and nothing inside the published checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from atelier import artifacts
from atelier.cli import main
from atelier.generator.train import TrainConfig, train

TINY = {"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}


def config(catalogue: Path, out: Path, **options) -> TrainConfig:
    """The tiny CGAN on the small catalogue's 256 train rows: 8 steps of 32 images an epoch."""
    return TrainConfig(catalogue=catalogue, out=out, batch_size=32, progress=False, model_overrides=TINY, **options)


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in accumulator.Scalars(tag)]


def event_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "tfevents" in p.name]


def wait_for_the_next_second(folder: Path) -> None:
    """Event file names start with their second: a later process's file must sort after."""
    newest = max(int(p.name.split(".")[3]) for p in event_files(folder))
    while int(time.time()) <= newest:
        time.sleep(0.05)


def test_training_logs_losses_rate_lr_and_a_grid_per_epoch_beside_the_checkpoint(small_catalogue, tmp_path):
    out = tmp_path / "cgan"
    published = train(config(small_catalogue, out, epochs=2, log_every=3))
    log = events(tmp_path / "cgan.tensorboard")
    losses = artifacts.read_manifest(published)["training"]["losses"]
    scalars = set(log.Tags()["scalars"])
    assert {f"loss/{name}" for name in losses} <= scalars and {f"epoch/loss/{name}" for name in losses} <= scalars
    assert {"images_per_second", "lr/g", "lr/d", "epoch/images_per_second", "epoch/epochs"} <= scalars
    # every 3 steps, and an epoch's left-over steps at its end; the step is images seen
    logged = [96, 192, 256, 352, 448, 512]
    for tag in (*(f"loss/{name}" for name in losses), "images_per_second", "lr/g", "lr/d"):
        assert steps(log, tag) == logged, tag
    assert all(e.value > 0 for e in log.Scalars("images_per_second"))
    assert [e.value for e in log.Scalars("lr/g")] == pytest.approx([2e-4] * 6)
    assert steps(log, "epoch/images_per_second") == [256, 512]
    assert [(e.step, e.value) for e in log.Scalars("epoch/epochs")] == [(256, 1.0), (512, 2.0)]
    # one grid an epoch, the very PNG of <out>.samples/
    grids = log.Images("samples")
    assert [g.step for g in grids] == [256, 512]
    for grid, epoch in zip(grids, (1, 2)):
        assert grid.encoded_image_string == (tmp_path / "cgan.samples" / f"epoch-{epoch:03d}.png").read_bytes()
    # a logged point is the mean over its steps (3, 3 and 2 in epoch 2), the epoch's tag over the epoch
    points = [e.value for e in log.Scalars("loss/loss_d")[3:]]
    epoch_mean = (3 * points[0] + 3 * points[1] + 2 * points[2]) / 8
    assert log.Scalars("epoch/loss/loss_d")[-1].value == pytest.approx(epoch_mean, rel=1e-5)
    # never inside the published (hashed) checkpoint, nor among its versions
    assert not event_files(published) and not event_files(tmp_path / ".cgan.versions")
    assert "samples.png" in artifacts.read_manifest(published)["files"]


def test_a_resumed_run_goes_on_from_its_checkpoints_count_and_hides_what_a_killed_run_logged_after_it(
        small_catalogue, tmp_path):
    out, folder = tmp_path / "cgan", tmp_path / "cgan.tensorboard"
    train(config(small_catalogue, out, epochs=1, log_every=4))
    wait_for_the_next_second(folder)
    # a process killed after that checkpoint had logged past it
    orphan = SummaryWriter(log_dir=str(folder))
    orphan.add_scalar("loss/loss_g", 99.0, 400)
    orphan.close()
    wait_for_the_next_second(folder)
    train(config(small_catalogue, out, epochs=1, log_every=4, resume=True))
    assert len(event_files(folder)) == 3
    log = events(folder)
    assert steps(log, "loss/loss_g") == [128, 256, 384, 512]  # no reset to 0, the orphan's 400 gone
    assert 99.0 not in [e.value for e in log.Scalars("loss/loss_g")]
    assert [g.step for g in log.Images("samples")] == [256, 512]
    assert [e.value for e in log.Scalars("epoch/epochs")] == [1.0, 2.0]
    assert artifacts.read_manifest(artifacts.resolve(out))["training"]["images_seen"] == 512


def test_no_tensorboard_writes_no_event_files_and_a_bad_interval_is_refused(small_catalogue, tmp_path, capsys):
    out = tmp_path / "quiet"
    args = ["train", "--catalogue", str(small_catalogue), "--out", str(out), "--batch-size", "32", "--max-steps", "2",
            *(x for k, v in TINY.items() for x in ("--set", f"{k}={v}")), "--quiet"]
    assert main([*args, "--no-tensorboard"]) == 0
    assert not (tmp_path / "quiet.tensorboard").exists() and not event_files(tmp_path)
    assert (tmp_path / "quiet.samples" / "epoch-000.png").is_file()  # stopped inside epoch 1
    assert main([*args, "--out", str(tmp_path / "bad"), "--log-every", "0"]) == 2
    assert "--log-every 0 must be at least 1" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "logged"), "--log-every", "1"]) == 0
    log = events(tmp_path / "logged.tensorboard")
    assert steps(log, "loss/loss_g") == [32, 64] and [g.step for g in log.Images("samples")] == [64]


def test_a_failing_run_still_leaves_what_it_logged_on_disk(small_catalogue, tmp_path, monkeypatch):
    from atelier.generator.cgan import CGANTrainer

    step, calls = CGANTrainer.step, []

    def failing(self, images, condition):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine caught fire")
        return step(self, images, condition)

    monkeypatch.setattr(CGANTrainer, "step", failing)
    with pytest.raises(RuntimeError, match="caught fire"):
        train(config(small_catalogue, tmp_path / "cgan", epochs=1, log_every=5))
    log = events(tmp_path / "cgan.tensorboard")
    assert steps(log, "loss/loss_g") == [64]  # the two steps before the failure, written on close
    assert log.Tags()["images"] == []  # no epoch ended


def test_distill_shares_the_loop_and_its_event_files(flow_checkpoint, small_catalogue, tmp_path):
    from atelier.generator.distill import DistillConfig, distill

    out = tmp_path / "student"
    distill(DistillConfig(teacher=flow_checkpoint, catalogue=small_catalogue, out=out, pairs=48, epochs=1,
                          batch_size=16, chunk=48, progress=False, log_every=2))
    log = events(tmp_path / "student.tensorboard")
    assert steps(log, "loss/loss") == [32, 48] and steps(log, "lr") == [32, 48]  # the flow's one optimizer
    assert [g.step for g in log.Images("samples")] == [48]
    assert not event_files(artifacts.resolve(out))
    distill(DistillConfig(teacher=flow_checkpoint, catalogue=small_catalogue, out=tmp_path / "none", pairs=48,
                          epochs=1, batch_size=16, chunk=48, progress=False, tensorboard=False))
    assert not (tmp_path / "none.tensorboard").exists()
