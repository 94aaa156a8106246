"""The reindex on Ray (atelier.indexer.distributed): the local job's index, its accounting, its crash safety.

Ray itself must be installed (the `test` extra has it); each test that runs the job starts a
local Ray of 2 one-CPU workers (or shares the module's), on the 456-product catalogue.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
from conftest import publish_vectors

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.cli import main as cli_main
from atelier.indexer import distributed
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.reader import CatalogueReader, plan_shards
from atelier.indexer.runner import reindex
from atelier.indexer.writer import TooManyFailures


def _vectors_by_id(index: IndexDirectory) -> dict[str, np.ndarray]:
    ids = index.products.column("id").to_pylist()
    return dict(zip(ids, index.vectors(np.arange(len(index)))))


@pytest.mark.slow
def test_ray_reindex_gives_the_local_index(tmp_path, small_catalogue, small_index):
    """2 Ray workers: the local job's products in its order, its vectors within 1e-5, its thumbnails."""
    version = reindex(small_catalogue, tmp_path / "index", input_size=32, batch_size=64, progress=False,
                      distributor="ray", workers=2)
    assert not ray.is_initialized()  # the local Ray the job started is stopped again
    local, on_ray = IndexDirectory.open(small_index), IndexDirectory.open(tmp_path / "index")
    assert on_ray.path == version and len(on_ray) == len(local) == 456
    assert on_ray.products.equals(local.products)  # ids, attributes, order
    expected, got = _vectors_by_id(local), _vectors_by_id(on_ray)
    assert got.keys() == expected.keys()
    assert max(float(np.abs(got[i] - expected[i]).max()) for i in expected) <= 1e-5
    assert on_ray.thumbnails(list(range(456))) == local.thumbnails(list(range(456)))
    for field in ("embedder", "dimension", "metric", "index_type", "catalogue", "skipped", "thumbnail_size"):
        assert on_ray.manifest[field] == local.manifest[field], field
    build = on_ray.manifest["build"]
    assert build["distributor"] == "ray" and build["workers"] == 2 and local.manifest["build"]["distributor"] == "local"
    assert len(build["per_worker"]) == 2 and sum(w["images"] for w in build["per_worker"]) == 456
    assert all(w["shards"] >= 1 and w["images_per_second"] > 0 for w in build["per_worker"])
    assert build["shards"] == len(plan_shards(Catalogue.open(small_catalogue), build["shard_rows"]))


@pytest.fixture()
def own_ray():
    """A local Ray this process is connected to: the job runs on it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_reindex_counts_failures_as_the_local_job(tmp_path, small_catalogue, mobilenet_weights, own_ray):
    table = Catalogue.open(small_catalogue).read().slice(0, 40)
    images = table.column("image").to_pylist()
    images[3], images[29] = b"\x89PNG broken", b""
    broken = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    write_catalogue(tmp_path / "cat", "broken", SCHEMA, [broken], image_channels=1)
    options = dict(input_size=32, batch_size=8, progress=False, distributor="ray", workers=2, shard_rows=8)
    reindex(tmp_path / "cat", tmp_path / "index", max_failed_fraction=0.1, **options)
    assert ray.is_initialized()  # this process's Ray: used, not stopped
    index = IndexDirectory.open(tmp_path / "index")
    ids = table.column("id").to_pylist()
    assert [s["id"] for s in index.manifest["skipped"]] == [ids[3], ids[29]] and len(index) == 38
    assert index.products.column("id").to_pylist() == [i for n, i in enumerate(ids) if n not in (3, 29)]
    assert index.manifest["build"]["shards"] == 5
    # Over the allowed fraction: the job fails, nothing is published, the previous index stays.
    with pytest.raises(TooManyFailures, match="of 40 images could not be decoded"):
        reindex(tmp_path / "cat", tmp_path / "index", max_failed_fraction=0.01, **{**options, "input_size": 48})
    assert IndexDirectory.open(tmp_path / "index").manifest["embedder"]["input_size"] == 32
    assert not list(artifacts.versions_dir(tmp_path / "index").glob("staging-*"))


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.slow
def test_killed_ray_reindex_publishes_nothing(tmp_path, small_catalogue, small_index):
    """SIGKILL the driver once its first shard is written: the previous index still opens and serves."""
    previous = IndexDirectory.open(small_index)
    vectors = previous.vectors(np.arange(len(previous)))
    dest = tmp_path / "index"
    first = publish_vectors(dest, vectors, previous.products, previous.embedder, previous.schema,
                            previous.manifest["catalogue"])
    command = [sys.executable, "-m", "atelier.cli", "-v", "index", "--catalogue", str(small_catalogue), "--out",
               str(dest), "--distributor", "ray", "--workers", "2", "--input-size", "224", "--batch-size", "16",
               "--shard-rows", "32", "--quiet"]  # 15 shards
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group: the local Ray it starts is in it
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(job.stderr, lines), daemon=True).start()
    seen = []
    try:
        while not any("ray: shard 1 of 15 written" in line for line in seen):
            line = lines.get(timeout=600)
            assert line is not None, "the job ended before its first shard was written:\n" + "".join(seen)
            seen.append(line)
        assert job.poll() is None, "the job finished before the kill, so the kill tested nothing"
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        with_leftovers_killed(job)
    after = IndexDirectory.open(dest)  # verifies every sha256
    assert after.path == first and after.manifest["count"] == 456 and "build" not in after.manifest
    assert np.array_equal(after.vectors(np.arange(456)), vectors)
    _, rows = after.search(vectors[:5], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    # The killed job had claimed a staging folder; its lock died with it, so the next job removes it.
    assert len(artifacts.remove_stale_staging(artifacts.versions_dir(dest))) == 1


def with_leftovers_killed(job: subprocess.Popen) -> None:
    """Kill what the job started and left behind (a local Ray's agents outlive a SIGKILLed driver)."""
    if job.poll() is None:
        job.kill()
        job.wait(timeout=60)
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.5)


def test_ray_options_are_checked_before_any_work(tmp_path, capsys):
    nowhere = tmp_path / "no-catalogue"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["index", "--catalogue", str(nowhere), "--out", str(tmp_path / "i"), "--distributor", "ray",
                  "--workers", "0"])
    assert exit_info.value.code == 2 and "--workers: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    for kwargs, message in (
        (dict(distributor="ray", workers=0), "number of Ray workers must be a whole number >= 1, got 0"),
        (dict(distributor="ray", workers=True), "got True"),
        (dict(distributor="ray", shard_rows=100), r"multiple of the batch size \(64\), got 100"),
        (dict(workers=2), "workers: only with the ray distributor"),
        (dict(ray_address="auto"), "ray address: only with the ray distributor"),
        (dict(distributor="spark"), "unknown distributor 'spark'; available: local, ray"),
    ):
        with pytest.raises(ValueError, match=message):
            reindex(nowhere, tmp_path / "i", **kwargs)
    assert not (tmp_path / "i").exists() and not artifacts.versions_dir(tmp_path / "i").exists()


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(distributed.RayUnavailable, match=r"pip install 'atelier\[ray\]'"):
        reindex(tmp_path / "no-catalogue", tmp_path / "i", distributor="ray", workers=2)
    assert cli_main(["index", "--catalogue", str(tmp_path / "c"), "--out", str(tmp_path / "i"),
                     "--distributor", "ray"]) == 2
    assert "pip install 'atelier[ray]'" in capsys.readouterr().err


def test_shards_cover_the_catalogue_in_order(small_catalogue):
    catalogue = Catalogue.open(small_catalogue)  # one file, row groups of 256 and 200 rows
    whole = pa.concat_tables(b.rows for b in CatalogueReader(catalogue, 16))
    for rows in (16, 64, 96, 4096):
        shards = plan_shards(catalogue, rows)
        assert all(0 < len(s) <= rows for s in shards) and sum(len(s) for s in shards) == 456
        assert [s.start for s in shards[1:]] == [s.stop for s in shards[:-1]]
        read = [b for s in shards for b in CatalogueReader(catalogue, 16, s)]
        assert all(b.rows.num_rows <= 16 for b in read)
        assert pa.concat_tables(b.rows for b in read).equals(whole), rows
    assert [(s.start, s.stop) for s in plan_shards(catalogue, 96)] == [(0, 96), (96, 192), (192, 256), (256, 352),
                                                                       (352, 448), (448, 456)]
    assert distributed.default_shard_rows(456, 2, 64) == 64 and distributed.default_shard_rows(10**7, 8, 64) == 4096
