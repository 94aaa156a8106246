"""The importer on the real Debian IDX files, checked against the independent Parquet copy."""

import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from atelier.catalog import fashion_mnist
from atelier.catalog.fashion_mnist import CLASS_NAMES, DatasetUnavailable, import_fashion_mnist, locate, read_idx


def test_import_equals_the_shared_parquet_copy(tmp_path, idx_dir, shared_data):
    catalogue = import_fashion_mnist(idx_dir, tmp_path / "fm")
    assert len(catalogue) == 70_000
    ours = catalogue.read(["id", "split", "category", "image"])
    for split, expected_rows in (("train", 60_000), ("test", 10_000)):
        theirs = pq.read_table(shared_data / "fashion_mnist" / f"{split}.parquet")
        mine = ours.filter(np.array(ours.column("split").to_pylist()) == split)
        assert mine.num_rows == theirs.num_rows == expected_rows
        assert mine.column("id").to_pylist() == theirs.column("id").to_pylist()
        assert mine.column("category").to_pylist() == theirs.column("label_name").to_pylist()
        assert [CLASS_NAMES.index(c) for c in mine.column("category").to_pylist()] == theirs.column("label").to_pylist()
        decode = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)  # noqa: E731
        a = np.stack([decode(b) for b in mine.column("image").to_pylist()])
        b = np.stack([decode(b) for b in theirs.column("image").to_pylist()])
        assert a.shape == (expected_rows, 28, 28) and np.array_equal(a, b)


def test_read_idx_checks_its_header(tmp_path):
    good = tmp_path / "x-idx3-ubyte"
    good.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2, 2, 3) + bytes(range(12)))
    assert read_idx(good).shape == (2, 2, 3)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2, 2, 3) + bytes(5))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def test_locate_explains_a_folder_without_the_files(tmp_path):
    with pytest.raises(DatasetUnavailable, match="does not hold the Fashion-MNIST IDX files"):
        locate(tmp_path)


def _upstream_gzip(debian_gz: Path) -> bytes:
    """Debian stripped the gzip FNAME field and changed the mtime; restoring both gives back
    the upstream file (see shared/data/README.md), whose md5 Zalando publishes."""
    data = debian_gz.read_bytes()
    assert data[:3] == b"\x1f\x8b\x08" and not data[3] & 0x08
    name = debian_gz.name[: -len(".gz")]
    mtime = 0x59A7E9F3 if name.startswith("t10k") else 0x59A7E9DE
    return data[:3] + bytes([data[3] | 0x08]) + struct.pack("<I", mtime) + data[8:10] + name.encode() + b"\0" + data[10:]


def test_download_path_verifies_published_md5(tmp_path, idx_dir):
    """The real download code against a local HTTP mirror (no internet here)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in fashion_mnist.FILES:
        (mirror / f"{name}.gz").write_bytes(_upstream_gzip(idx_dir / f"{name}.gz"))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        cache = fashion_mnist.fetch(tmp_path / "cache", mirror=url)
        for name, md5 in fashion_mnist.FILES.items():
            assert hashlib.md5((cache / f"{name}.gz").read_bytes()).hexdigest() == md5
        labels = read_idx(cache / "t10k-labels-idx1-ubyte")
        assert np.array_equal(labels, read_idx(idx_dir / "t10k-labels-idx1-ubyte"))
        # A corrupted mirror file is refused, and what was cached before is kept.
        (mirror / "train-labels-idx1-ubyte.gz").write_bytes(b"not the file")
        (cache / "train-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(DatasetUnavailable, match="does not match its published md5"):
            fashion_mnist.fetch(cache, mirror=url)
        assert (cache / "t10k-labels-idx1-ubyte.gz").exists()
    finally:
        httpd.shutdown()
