"""Products a client can show: thumbnails kept in the index folder and the catalogue's image URI.

The real reindex job on real Fashion-MNIST images and on a shop's table whose photos come from a
real HTTP server on 127.0.0.1 (tests/test_table_import.py's PhotoServer), served by the real gRPC
server; every thumbnail is compared with the catalogue image of the product it came back with.
"""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pyarrow as pa
import pytest

from atelier import artifacts
from atelier.catalog import Catalogue
from atelier.catalog.images import decode_image, encode_png, to_square
from atelier.catalog.table import import_table, public_uri
from atelier.cli import main
from atelier.indexer.index_directory import THUMBNAILS_FILE, IndexDirectory
from atelier.indexer.mapper import thumbnail
from atelier.indexer.runner import reindex
from atelier.retrieval.service import InvalidRequest, Limits, RetrievalRequest, RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient
from tests.conftest import write_fashion_mnist_subset
from tests.test_table_import import PhotoServer, photo_bytes, write_photo

LIMITS = Limits(max_num_samples=8, max_top_k=20, max_candidates=100)
PNG, JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def catalogue_images(path) -> dict[str, bytes]:
    table = Catalogue.open(path).read(["id", "image"])
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))


@pytest.fixture(scope="module")
def tiny_catalogue(tmp_path_factory, idx_dir):
    """A few real Fashion-MNIST products, for the indexes this file builds itself."""
    dest = tmp_path_factory.mktemp("thumbs") / "fm-tiny"
    write_fashion_mnist_subset(dest, idx_dir, {"train": 24, "test": 8})
    return dest


@pytest.fixture()
def serve(tiny_model):
    """serve(index) -> a client of the real gRPC server serving that index with the tiny model."""
    running = []

    def start(index):
        server = start_server(RetrievalService.open(index, {"cgan": tiny_model}, LIMITS), "127.0.0.1:0", max_workers=4)
        running.append(server)
        client = AtelierClient(server.target, timeout=60)
        client.wait_ready()
        return client

    yield start
    for server in running:
        server.stop(grace=1)


# -- the index ----------------------------------------------------------------------------------
def test_reindex_keeps_the_catalogue_images_as_thumbnails(small_index, small_catalogue):
    index = IndexDirectory.open(small_index)
    assert index.has_thumbnails and index.thumbnail_size == index.manifest["thumbnail_size"] == 64
    assert THUMBNAILS_FILE in index.manifest["files"]  # hashed, so checked on load like every file
    images = catalogue_images(small_catalogue)
    ids = index.products.column("id").to_pylist()
    thumbnails = index.thumbnails(list(range(len(index))))
    assert len(thumbnails) == len(images) == len(index)
    for product_id, data in zip(ids, thumbnails):
        assert data == images[product_id]  # 28 px <= 64: the catalogue's own PNG, not re-encoded
        assert np.array_equal(decode_image(data, 1), decode_image(images[product_id], 1))
    assert not index.has_image_uri and index.image_uris([0, 1]) == [None, None]


def test_a_smaller_thumbnail_size_gives_thumbnails_of_that_size(tmp_path, tiny_catalogue, mobilenet_weights):
    reindex(tiny_catalogue, tmp_path / "index", input_size=32, progress=False, thumbnail_size=16)
    index = IndexDirectory.open(tmp_path / "index")
    assert index.thumbnail_size == 16
    images = catalogue_images(tiny_catalogue)
    ids = index.products.column("id").to_pylist()
    for product_id, data in zip(ids, index.thumbnails(list(range(len(index))))):
        assert data.startswith(PNG)  # grey: PNG
        small = decode_image(data, 1)
        assert small.shape == (16, 16, 1)
        assert np.array_equal(small, to_square(decode_image(images[product_id], 1), 16))


def test_thumbnail_reuses_small_images_and_squares_large_ones():
    grey = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20, 1)
    data = encode_png(grey)
    assert thumbnail(data, grey, 30) == data  # no larger: the bytes as they are
    assert decode_image(thumbnail(data, grey, 10), 1).shape == (10, 10, 1)
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[..., 0] = 200  # red, in RGB
    small = thumbnail(encode_png(colour), colour, 8)
    assert small.startswith(JPEG)
    pixels = decode_image(small, 3)
    assert pixels.shape == (8, 8, 3) and abs(int(pixels[4, 4, 0]) - 200) <= 8 and pixels[4, 4, 2] <= 8


def test_thumbnail_size_0_gives_an_index_without_thumbnails_that_serves(tmp_path, tiny_catalogue, mobilenet_weights,
                                                                         serve, capsys):
    code = main(["index", "--catalogue", str(tiny_catalogue), "--out", str(tmp_path / "index"), "--embedder",
                 "mobilenet_v2", "--input-size", "32", "--thumbnail-size", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    index = IndexDirectory.open(tmp_path / "index")
    assert not index.has_thumbnails and index.thumbnail_size == 0 and index.manifest["thumbnail_size"] == 0
    assert not (index.path / THUMBNAILS_FILE).exists()
    client = serve(tmp_path / "index")
    response = client.generate_and_retrieve({"category": "Bag"}, num_samples=2, top_k=5, seed=1)
    assert len(response.products) == 5 and not any(p.thumbnail for p in response.products)
    assert client.get_schema().index.thumbnail_size == 0
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve({"category": "Bag"}, num_samples=2, top_k=5, return_thumbnails=True)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"index version {index.version} has no thumbnails" in error.value.details()
    assert "atelier index --thumbnail-size" in error.value.details()
    client.close()


def test_an_index_published_before_thumbnails_still_opens_and_serves(tmp_path, small_index, tiny_model):
    """A copy of the session's index as older versions were: no thumbnails.arrow, no thumbnail_size."""
    source, dest = artifacts.resolve(small_index), tmp_path / "old"
    with artifacts.staging(dest) as stage:
        for file in source.iterdir():
            if file.name != THUMBNAILS_FILE:
                shutil.copy2(file, stage / file.name)
        manifest = artifacts.read_manifest(stage, verify=False)
        fields = {k: v for k, v in manifest.items() if k not in ("kind", "created", "files", "thumbnail_size")}
        artifacts.write_manifest(stage, manifest["kind"], **fields)
        artifacts.publish(stage, dest)
    service = RetrievalService.open(dest, {"cgan": tiny_model}, LIMITS)
    assert not service.index.has_thumbnails and service.describe()["index"]["thumbnail_size"] == 0
    result = service.generate_and_retrieve(RetrievalRequest({"category": "Coat"}, num_samples=2, top_k=3, seed=3))
    assert len(result.products) == 3 and all(p.thumbnail is None and p.image_uri is None for p in result.products)
    with pytest.raises(InvalidRequest, match="reindex with `atelier index --thumbnail-size"):
        service.generate_and_retrieve(RetrievalRequest({"category": "Coat"}, return_thumbnails=True))


def test_the_cli_refuses_a_negative_or_huge_thumbnail_size(tmp_path, small_catalogue, capsys):
    for size in ("-1", "257"):
        code = main(["index", "--catalogue", str(small_catalogue), "--out", str(tmp_path / "index"),
                     "--thumbnail-size", size, "--quiet"])
        assert code == 2
        assert f"thumbnail size must be a whole number of px from 1 to 256, or 0 for an index without thumbnails; " \
               f"got {size}" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


# -- serving ------------------------------------------------------------------------------------
def test_return_thumbnails_gives_each_product_its_catalogue_image(client, small_catalogue):
    images = catalogue_images(small_catalogue)
    assert client.get_schema().index.thumbnail_size == 64
    asked = client.generate_and_retrieve({"category": "Sneaker"}, num_samples=3, top_k=8, seed=5, return_thumbnails=True)
    assert len(asked.products) == 8
    for product in asked.products:
        assert product.thumbnail == images[product.id]  # the product's own image, whatever its rank
        assert not product.image_uri and "image_uri" not in product.attributes
    plain = client.generate_and_retrieve({"category": "Sneaker"}, num_samples=3, top_k=8, seed=5)
    assert [p.id for p in plain.products] == [p.id for p in asked.products]  # thumbnails change no result
    assert not any(p.thumbnail for p in plain.products)


def test_atelier_query_writes_the_thumbnails(server, small_catalogue, tmp_path, capsys):
    images = catalogue_images(small_catalogue)
    out = tmp_path / "thumbs"
    assert main(["query", "--target", server.target, "--attr", "category=Bag", "--top-k", "4", "--num-samples", "2",
                 "--seed", "9", "--thumbnails-out", str(out)]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line[:4].strip().rstrip(".").isdigit()]
    assert len(listed) == 4
    assert sorted(p.name for p in out.iterdir()) == [f"{rank:02d}-{pid}.png" for rank, pid in enumerate(listed, 1)]
    assert all((out / f"{rank:02d}-{pid}.png").read_bytes() == images[pid] for rank, pid in enumerate(listed, 1))


# -- a shop's table with photo URLs -------------------------------------------------------------
CATEGORIES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def shop_catalogue(tmp_path_factory):
    """A table of products whose categories are Fashion-MNIST's (so the tiny model fits its
    schema): ten photos by URL from a real HTTP server, two as local files."""
    tmp = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    colours = [tuple(int(c) for c in rng.integers(20, 230, 3)) for _ in CATEGORIES]
    server = PhotoServer({f"{k}.png": photo_bytes(rgb, h=24, w=18) for k, rgb in enumerate(colours)}, 0.0)
    urls = {f"U{k}": f"{server.base}/{k}.png" for k in range(len(CATEGORIES))}
    write_photo(tmp / "local" / "a.png", (200, 30, 30))
    lines = [f"{pid},{CATEGORIES[k]},Blue,{url}" for k, (pid, url) in enumerate(urls.items())]
    lines += ["L1,Bag,Red,local/a.png", f"L2,Coat,Red,{(tmp / 'local' / 'a.png').as_uri()}"]
    (tmp / "products.csv").write_text("sku,category,colour,photo\n" + "\n".join(lines) + "\n")
    try:
        catalogue = import_table(tmp / "products.csv", tmp / "catalogue", "sku", "photo", ["category", "colour"],
                                 size=16, progress=False, image_cache=tmp / "cache", max_failures=0.0)
    finally:
        server.stop()
    return catalogue.path, {**urls, "L1": None, "L2": None}


def test_the_table_importer_keeps_http_urls_as_image_uri(shop_catalogue):
    path, uris = shop_catalogue
    catalogue = Catalogue.open(path, verify=True)
    assert catalogue.has_image_uri and "image_uri" not in catalogue.schema.names
    rows = catalogue.read(["id", "image_uri"]).to_pylist()
    assert {r["id"]: r["image_uri"] for r in rows} == uris  # local paths and file: URIs stay null
    assert public_uri("https://shop.example/p/1.jpg?w=400") == "https://shop.example/p/1.jpg?w=400"
    for value in ("/srv/photos/1.jpg", "file:///srv/1.jpg", "data:image/png;base64,AAAA", b"\x89PNG", None,
                  "https://user:secret@shop.example/1.jpg", "http://"):
        assert public_uri(value) is None, value
    with pytest.raises(ValueError, match="clash with the catalogue's own columns id, split, image, image_uri"):
        import_table(path / "products.csv", path / "x", "sku", "photo", ["image_uri"])


def test_image_uris_and_thumbnails_come_back_through_index_and_server(tmp_path, shop_catalogue, mobilenet_weights,
                                                                       serve):
    path, uris = shop_catalogue
    reindex(path, tmp_path / "index", embedder_name="mobilenet_v2", input_size=32, progress=False)
    index = IndexDirectory.open(tmp_path / "index")
    assert index.has_image_uri and "image_uri" in index.products.column_names
    assert "image_uri" not in index.schema.names and all("image_uri" not in r for r in index.product_rows([0, 1]))
    client = serve(tmp_path / "index")
    response = client.generate_and_retrieve({"category": "Bag"}, num_samples=2, top_k=len(uris), seed=2,
                                            return_thumbnails=True)
    images = catalogue_images(path)
    assert {p.id for p in response.products} == set(uris)
    for product in response.products:
        assert product.image_uri == (uris[product.id] or "")
        assert set(product.attributes) == {"category", "colour"}
        assert product.thumbnail == images[product.id]  # 16 px <= 64: the catalogue's own PNG
    assert {g.name for g in client.get_schema().filter_groups} == {"category", "colour"}
    with pytest.raises(grpc.RpcError) as error:
        client.generate_and_retrieve({"category": "Bag"}, filters={"image_uri": uris["U0"]})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown filter group 'image_uri'" in error.value.details()
    client.close()


def test_colour_thumbnails_larger_than_asked_are_squared_jpegs(tmp_path, shop_catalogue, mobilenet_weights):
    path, _ = shop_catalogue
    reindex(path, tmp_path / "index", embedder_name="mobilenet_v2", input_size=32, progress=False, thumbnail_size=8)
    index = IndexDirectory.open(tmp_path / "index")
    images = catalogue_images(path)
    ids = index.products.column("id").to_pylist()
    for product_id, data in zip(ids, index.thumbnails(list(range(len(index))))):
        assert data.startswith(JPEG)
        small = decode_image(data, 3)
        expected = to_square(decode_image(images[product_id], 3), 8)
        error = np.abs(small.astype(int) - expected)
        # JPEG (4:2:0 chroma) blurs colour at the photo's edge against its white padding; the middle is the photo's
        assert small.shape == (8, 8, 3) and error[3:5, 3:5].max() <= 12 and error.mean() <= 20


def test_the_writer_needs_one_thumbnail_per_row(tmp_path):
    from atelier.catalog.fashion_mnist import SCHEMA
    from atelier.indexer.index_choice import IndexOptions, choose_index
    from atelier.indexer.mapper import Embedded
    from atelier.indexer.writer import IndexWriter

    rows = pa.table({"id": ["a", "b"], "category": ["Bag", "Coat"]})
    vectors = np.eye(2, 4, dtype=np.float32)
    writer = IndexWriter(tmp_path, SCHEMA, {}, {"rows": 2}, choose_index(2, 4, IndexOptions()), thumbnail_size=8)
    with pytest.raises(ValueError, match="a batch of 2 rows brings 1 thumbnails; this index has 8 px thumbnails"):
        writer.write(Embedded(rows, vectors, [], [b"x"]))
    with pytest.raises(ValueError, match="a batch of 2 rows brings no thumbnails"):
        writer.write(Embedded(rows, vectors, []))
