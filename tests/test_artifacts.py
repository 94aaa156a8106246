"""Crash-safe batch jobs: SIGKILL `atelier index` and `atelier train` at several points; corrupt images.

The jobs run as real subprocesses. Most kill points are found by watching the filesystem (the
job's staging folder appears, a checkpoint is published). The ones that are too short to hit by
watching (the staging folder complete just before publishing, the new version renamed into
place but the link not yet swapped) are made to wait by a few lines run in the child before
`atelier.cli.main` (CHILD below): they wrap one function, touch a marker file and sleep until
the test kills them. The product code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.generator.checkpoint import load_generator
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.runner import reindex
from atelier.indexer.writer import TooManyFailures

ATELIER = [sys.executable, "-m", "atelier.cli"]
TINY = ["--set", "g_width=8", "--set", "d_width=8", "--set", "embed_dim=8", "--set", "latent_dim=16"]

# Run in the child: pause at PAUSE_AT (touching PAUSE_MARKER), then run the real CLI.
#   batch:N    after the writer received its N-th embedded batch (the reindex half done)
#   publish:N  on entering the N-th artifacts.publish (the staging folder is complete)
#   swap       inside publish: the staging folder is renamed to its version, the link not yet swapped
CHILD = r"""
import os, sys, time
from pathlib import Path
from atelier import artifacts
from atelier.indexer.writer import IndexWriter

where, marker = os.environ["PAUSE_AT"], Path(os.environ["PAUSE_MARKER"])
kind, _, nth = where.partition(":")
calls = [0]

def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(3600)

def nth_call():
    calls[0] += 1
    return calls[0] == int(nth or 1)

if kind == "batch":
    write = IndexWriter.write
    def paused_write(self, batch):
        write(self, batch)
        if nth_call():
            pause()
    IndexWriter.write = paused_write
elif kind == "publish":
    publish = artifacts.publish
    def paused_publish(stage, dest):
        if nth_call():
            pause()
        return publish(stage, dest)
    artifacts.publish = paused_publish
elif kind == "swap":
    symlink = os.symlink
    def paused_symlink(src, dst, *args, **kwargs):
        pause()
        return symlink(src, dst, *args, **kwargs)
    os.symlink = paused_symlink
else:
    raise SystemExit(f"unknown PAUSE_AT {where!r}")

from atelier.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Job:
    """A job in a subprocess, its stderr in a file (shown when it ends before the kill point)."""

    def __init__(self, args: list[str], log: Path, pause_at: str | None = None, marker: Path | None = None):
        self.log, self.marker = log, marker
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [*ATELIER, *args]
        if pause_at:
            env.update(PAUSE_AT=pause_at, PAUSE_MARKER=str(marker))
            command = [sys.executable, "-c", CHILD, *args]
        with open(log, "wb") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def wait_until(self, condition, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the job ended (rc {self.process.returncode}) before {what}:\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.005)

    def wait_for_marker(self) -> None:
        self.wait_until(self.marker.exists, f"the pause point ({self.marker.name})")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        assert self.process.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 180.0) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def staging_folders(dest: Path) -> set[Path]:
    return set(artifacts.versions_dir(dest).glob("staging-*"))


def test_stale_staging_folders_are_removed_live_ones_kept(tmp_path):
    dest = tmp_path / "artifact"
    root = artifacts.versions_dir(dest)
    root.mkdir()
    dead = root / "staging-deadjob00000"  # what a SIGKILLed job leaves: nobody holds its lock
    dead.mkdir()
    (dead / "index.faiss").write_bytes(b"half")
    with artifacts.staging(dest) as live:  # creating one removes the dead one ...
        assert not dead.exists() and live.is_dir()
        assert artifacts.remove_stale_staging(root) == [] and live.is_dir()  # ... never a live one
        (live / "file.txt").write_text("x")
        artifacts.write_manifest(live, "test")
        version = artifacts.publish(live, dest)
    assert artifacts.resolve(dest) == version and staging_folders(dest) == set()


def test_killed_reindex_leaves_published_index_and_rerun_completes(tmp_path, small_catalogue, mobilenet_weights):
    dest = tmp_path / "index"
    first = reindex(small_catalogue, dest, input_size=32, progress=False)
    before = IndexDirectory.open(dest)
    ids = before.products.column("id").to_pylist()
    args = ["index", "--catalogue", str(small_catalogue), "--out", str(dest), "--input-size", "32",
            "--batch-size", "64", "--threads", "1", "--quiet"]
    batches = -(-len(Catalogue.open(small_catalogue)) // 64)

    def check_published_unchanged(point: str) -> None:
        after = IndexDirectory.open(dest)  # verifies every sha256 and the counts
        assert after.path == first, f"killed at {point}: the published version changed"
        assert after.products.column("id").to_pylist() == ids and len(after) == len(ids)
        assert len(staging_folders(dest)) <= 1, f"killed at {point}: older staging folders were not removed"

    # 1. Right after the start (still importing).
    job = Job(args, tmp_path / "spawn.log")
    time.sleep(0.3)
    job.kill()
    check_published_unchanged("start")

    # 2. Inside publish: the new version folder is in place, the link to it not yet swapped.
    job = Job(args, tmp_path / "swap.log", "swap", tmp_path / "swap.marker")
    try:
        job.wait_for_marker()
        job.kill()
    finally:
        job.finish()
    orphans = {p for p in artifacts.versions_dir(dest).iterdir() if p.is_dir()} - staging_folders(dest) - {first}
    assert len(orphans) == 1 and (next(iter(orphans)) / artifacts.MANIFEST).is_file()
    check_published_unchanged("the link swap")

    # 3. As soon as the real CLI's staging folder appears (the job has loaded and is embedding).
    earlier = staging_folders(dest)
    job = Job(args, tmp_path / "staging.log")
    try:
        job.wait_until(lambda: staging_folders(dest) - earlier, "its staging folder appeared")
        job.kill()
    finally:
        job.finish()
    check_published_unchanged("the start of embedding")

    # 4. Half-way through the images.
    job = Job(args, tmp_path / "batch.log", f"batch:{batches // 2}", tmp_path / "batch.marker")
    try:
        job.wait_for_marker()
        job.kill()
    finally:
        job.finish()
    check_published_unchanged("half-way")

    # 5. Just before publishing: its staging folder holds a complete index with its manifest.
    job = Job(args, tmp_path / "publish.log", "publish:1", tmp_path / "publish.marker")
    try:
        job.wait_for_marker()
        (stale,) = staging_folders(dest)
        assert (stale / artifacts.MANIFEST).is_file() and (stale / "index.faiss").is_file()
        job.kill()
    finally:
        job.finish()
    check_published_unchanged("just before publish")
    assert staging_folders(dest) == {stale}

    # A rerun completes, publishes a new version, and removes the dead jobs' staging folders.
    rerun = subprocess.run([*ATELIER, *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    after = IndexDirectory.open(dest)
    assert after.path not in {first, *orphans} and after.products.column("id").to_pylist() == ids
    assert after.manifest["skipped_count"] == 0 and after.manifest["skipped"] == []
    assert staging_folders(dest) == set() and first.is_dir()  # old version kept for readers that hold it


def _epochs(out: Path) -> int:
    try:
        return int(artifacts.read_manifest(artifacts.resolve(out), "model", verify=False)["training"]["epochs"])
    except (artifacts.ArtifactError, OSError, ValueError, KeyError):
        return 0


def test_killed_training_keeps_last_checkpoint_and_resumes(tmp_path, small_catalogue):
    out = tmp_path / "cgan"
    args = ["train", "--catalogue", str(small_catalogue), "--out", str(out), "--batch-size", "32",
            "--threads", "1", "--quiet"]

    # Killed while publishing its 3rd checkpoint: the 2nd stays the published one.
    job = Job([*args, "--epochs", "50", *TINY], tmp_path / "train-publish.log", "publish:3", tmp_path / "t.marker")
    try:
        job.wait_for_marker()
        job.kill()
    finally:
        job.finish()
    model, manifest = load_generator(out)  # verifies every sha256
    assert manifest["training"]["epochs"] == 2 and model.config_dict()["g_width"] == 8
    assert len(staging_folders(out)) == 1  # the dead job's complete 3rd checkpoint, never published

    # The real CLI resumed, then killed mid-run once it has published two more epochs.
    job = Job([*args, "--epochs", "50", "--resume"], tmp_path / "train-resume.log")
    try:
        job.wait_until(lambda: _epochs(out) >= 4, "two more epochs were published")
        job.kill()
    finally:
        job.finish()
    model, manifest = load_generator(out)
    done = manifest["training"]["epochs"]
    assert done >= 4 and len(staging_folders(out)) <= 1

    # A resumed run completes and counts on from the last published epoch.
    rerun = subprocess.run([*ATELIER, *args, "--epochs", "1", "--resume"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    model, manifest = load_generator(out)
    assert manifest["training"]["epochs"] == done + 1 and staging_folders(out) == set()


def _corrupt_catalogue(tmp_path: Path, small_catalogue: Path, n: int = 100):
    """The first `n` products of the small catalogue with five kinds of broken image bytes."""
    table = Catalogue.open(small_catalogue).read().slice(0, n)
    images = table.column("image").to_pylist()
    png = images[0]
    broken = {
        3: (png[: len(png) // 2], "PNG signature, truncated or corrupt"),       # truncated
        9: (png[:8], "PNG signature, truncated or corrupt"),                   # signature only
        17: (os.urandom(300), "no known image signature"),                      # garbage
        26: (b"", "empty image (0 bytes)"),                                     # empty
        38: (None, "no image bytes"),                                           # missing
    }
    for row, (data, _) in broken.items():
        images[row] = data
    column = table.schema.get_field_index("image")
    table = table.set_column(column, "image", pa.array(images, pa.binary()))
    write_catalogue(tmp_path / "catalogue", "corrupt", SCHEMA, [table], image_channels=1)
    ids = table.column("id").to_pylist()
    return tmp_path / "catalogue", {ids[row]: reason for row, (_, reason) in broken.items()}


def test_corrupt_images_are_skipped_listed_and_bounded(tmp_path, small_catalogue, mobilenet_weights):
    catalogue, expected = _corrupt_catalogue(tmp_path, small_catalogue)
    dest = tmp_path / "index"
    first = reindex(catalogue, dest, input_size=32, batch_size=32, max_failed_fraction=0.05, progress=False)
    index = IndexDirectory.open(dest)
    manifest = index.manifest
    assert {s["id"]: s["reason"] for s in manifest["skipped"]}.keys() == expected.keys()
    for entry in manifest["skipped"]:
        assert entry["reason"].endswith(expected[entry["id"]]), entry
    assert manifest["skipped_count"] == 5 and manifest["images"] == 100 and manifest["max_failed_fraction"] == 0.05
    assert len(index) == 95 and not set(expected) & set(index.products.column("id").to_pylist())

    # Over the allowed fraction: the job fails, publishes nothing, leaves no staging folder.
    with pytest.raises(TooManyFailures, match=r"of 100 images could not be decoded \(allowed fraction 0.04\)"):
        reindex(catalogue, dest, input_size=48, batch_size=32, max_failed_fraction=0.04, progress=False)
    kept = IndexDirectory.open(dest)
    assert kept.path == first and kept.manifest["embedder"]["input_size"] == 32
    assert staging_folders(dest) == set()
    with pytest.raises(ValueError, match="max_failed_fraction"):
        reindex(catalogue, dest, max_failed_fraction=1.5, progress=False)

