"""Data-parallel training under real torchrun processes (gloo on CPU): two processes train what
one process trains on the same global batches, rank 0 alone publishes, and --resume works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from atelier import artifacts

TINY_FLOW = ["--model", "flow", "--set", "width=8", "--set", "sample_steps=2", "--set", "condition_dropout=0.3"]


def atelier_train(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`atelier train ...` in one process, or under torchrun with `processes` processes."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "atelier", "train", *args, "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = artifacts.resolve(checkpoint)
    return {name: load_file(folder / f"{name}.safetensors") for name in ("weights", "online", "optimizer")}


def training_record(checkpoint: Path) -> dict:
    return json.loads((artifacts.resolve(checkpoint) / "manifest.json").read_text())["training"]


def assert_close(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.allclose(a[name][key].float(), b[name][key].float(), atol=1e-5, rtol=1e-4), (name, key)


def test_two_processes_train_what_one_process_trains_on_the_same_global_batches(tmp_path, small_catalogue):
    common = ["--catalogue", str(small_catalogue), *TINY_FLOW, "--epochs", "1", "--max-steps", "4", "--seed", "3"]
    atelier_train(*common, "--out", str(tmp_path / "ddp"), "--batch-size", "8", processes=2)
    atelier_train(*common, "--out", str(tmp_path / "one"), "--batch-size", "16")
    ddp, one = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert_close(ddp, one)
    # and the comparison can fail: another seed gives other weights
    atelier_train(*common[:-1], "4", "--out", str(tmp_path / "other"), "--batch-size", "16")
    other = weights(tmp_path / "other")["online"]
    assert any(not torch.allclose(other[key].float(), one["online"][key].float(), atol=1e-5) for key in other)

    record = training_record(tmp_path / "ddp")
    assert record["world_size"] == 2 and record["batch_size"] == 8
    assert record["images_seen"] == training_record(tmp_path / "one")["images_seen"] == 64
    # rank 0 alone writes: one checkpoint, one grid folder, no TensorBoard folder per rank
    assert sorted(p.name for p in tmp_path.glob("ddp*")) == ["ddp", "ddp.samples", "ddp.tensorboard"]


def test_resume_under_torchrun_continues_the_run(tmp_path, small_catalogue):
    # 64 rows, global batch 16: 4 steps an epoch; 1 epoch, resumed for 1 more == 2 epochs at once
    common = ["--catalogue", str(small_catalogue), *TINY_FLOW, "--limit", "64", "--batch-size", "8",
              "--no-tensorboard"]
    atelier_train(*common, "--out", str(tmp_path / "whole"), "--epochs", "2", processes=2)
    atelier_train(*common, "--out", str(tmp_path / "parts"), "--epochs", "1", processes=2)
    atelier_train(*common, "--out", str(tmp_path / "parts"), "--epochs", "1", "--resume", processes=2)
    assert_close(weights(tmp_path / "parts"), weights(tmp_path / "whole"))
    record = training_record(tmp_path / "parts")
    assert record["epochs"] == 2 and record["images_seen"] == 128 and record["world_size"] == 2


def test_a_gan_trains_under_torchrun_with_its_two_optimizers(tmp_path, small_catalogue):
    # the GAN's generator step runs backward through the discriminator: every process must still
    # average the same gradients in the same order, or the run hangs or the processes drift apart
    out = tmp_path / "cgan"
    atelier_train("--catalogue", str(small_catalogue), "--model", "cgan", "--set", "g_width=8", "--set", "d_width=8",
                  "--set", "embed_dim=8", "--set", "latent_dim=16", "--epochs", "1", "--max-steps", "3",
                  "--batch-size", "8", "--no-tensorboard", "--out", str(out), processes=2)
    record = training_record(out)
    assert record["world_size"] == 2 and record["images_seen"] == 48
    assert all(torch.isfinite(torch.tensor(v)) for v in record["losses"].values())


def test_world_size_above_one_without_torchrun_says_how_to_start_it(tmp_path, small_catalogue):
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("MASTER_ADDR", None)
    done = subprocess.run([sys.executable, "-m", "atelier", "train", "--catalogue", str(small_catalogue), *TINY_FLOW,
                           "--out", str(tmp_path / "x"), "--max-steps", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "torchrun" in done.stderr
    assert not (tmp_path / "x").exists()
