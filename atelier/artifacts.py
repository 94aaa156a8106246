"""Artifact directories: a folder of files plus `manifest.json`, published atomically.

Every artifact atelier writes (a catalogue, a model, an index) is a directory whose
`manifest.json` records what made it and the sha256 of every file in it. A job writes into a
fresh staging folder beside the destination and then publishes it:

    dest                  -> a symlink, swapped with one atomic rename(2)
    .dest.versions/<ver>  -> the real folders, the newest few kept

so a reader either sees the old version or the new one, never half of one, and a job killed
at any point leaves the last published version untouched. Readers resolve the link once
(`resolve`) and read every file from that one version.

A job holds an exclusive flock(2) on its staging folder for as long as it runs; the kernel
drops the lock when the process dies, however it dies (SIGKILL included). So a staging folder
nobody holds belongs to a dead job: the next `staging` or `publish` for the same destination
removes it, and live jobs' folders are left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMITTED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"  # trained weights in the repository
MANIFEST = "manifest.json"
KEEP_VERSIONS = 3  # old versions kept so readers that resolved one just before a swap finish


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or its files do not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions_dir(dest: Path) -> Path:
    dest = Path(dest)
    return dest.parent / f".{dest.name}.versions"


@contextlib.contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A fresh folder to build the next version of `dest` in; removed if the job fails.

    The folder stays locked while the job runs; leftovers of dead jobs are removed first.
    """
    root = versions_dir(dest)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    stage, lock = _claim_staging(root)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        os.close(lock)  # after a publish `stage` is the new version; the lock goes with the fd


def _claim_staging(root: Path) -> tuple[Path, int]:
    """Create and lock a new staging folder; retried if a concurrent clean-up took it first."""
    for _ in range(100):
        stage = root / f"staging-{uuid.uuid4().hex[:12]}"
        stage.mkdir()
        try:
            fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # another job's clean-up removed it between mkdir and open
        if _try_lock(fd) is False or not _same_folder(stage, fd):
            os.close(fd)  # a clean-up holds it (and is removing it), or already has
            continue
        return stage, fd
    raise ArtifactError(f"could not claim a staging folder in {root}")


def _try_lock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem cannot tell."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_folder(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_staging(root: Path) -> list[Path]:
    """Remove the staging folders of jobs that are no longer running; returns what was removed."""
    removed = []
    for stage in sorted(Path(root).glob("staging-*")):
        try:
            fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _try_lock(fd) and _same_folder(stage, fd):  # nobody holds it: its job is dead
                shutil.rmtree(stage, ignore_errors=True)
                removed.append(stage)
        finally:
            os.close(fd)
    return removed


def write_manifest(folder: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Hash every file in `folder` and write the manifest that names them."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    manifest["files"] = files
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def publish(stage: Path, dest: Path) -> Path:
    """Make `stage` the current version of `dest` with one atomic rename; returns the version path."""
    stage, dest = Path(stage), Path(dest)
    if not (stage / MANIFEST).is_file():
        raise ArtifactError(f"refusing to publish {stage}: it has no {MANIFEST}")
    root = versions_dir(dest)
    version = root / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    os.rename(stage, version)
    if dest.exists() and not dest.is_symlink():
        # A plain folder (e.g. copied from elsewhere): keep it as an old version, then link.
        os.rename(dest, root / f"adopted-{uuid.uuid4().hex[:8]}")
    link = dest.parent / f".{dest.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(version, dest.parent), link)
    os.replace(link, dest)  # the atomic step
    remove_stale_staging(root)
    _prune(root, keep=version)
    return version


def _prune(root: Path, keep: Path) -> None:
    versions = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("staging-")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in versions[:-KEEP_VERSIONS]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: Path) -> Path:
    """The concrete folder of the current version (follows the publish link once)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    return path.resolve()


def read_manifest(folder: Path, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Read a manifest; with `verify`, check every listed file's sha256."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not an atelier artifact: no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')!r}, expected a {kind!r}")
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"{folder}: {name} is listed in the manifest but missing")
            if sha256_file(file) != expected:
                raise ArtifactError(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest
