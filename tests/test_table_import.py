"""The table importer on the messy exports shops make: CSV, Parquet, JSON Lines, photos as files, bytes, URLs.

Every table and photo is written here into tmp_path; URL photos come from a real HTTP server on
127.0.0.1 that this file starts (one photo gone, one too slow, one that fails once).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atelier import artifacts
from atelier.catalog import Catalogue
from atelier.catalog.fashion_product_images import split_of
from atelier.catalog.images import decode_image
from atelier.catalog.table import import_table
from atelier.cli import main

SIZE = 16
RED, GREEN, BLUE, YELLOW, CYAN = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 30), (30, 210, 210)


def photo_bytes(rgb, suffix=".png", h=12, w=20) -> bytes:
    """A flat h x w photo of one colour, encoded (cv2 writes BGR)."""
    image = np.full((h, w, 3), rgb[::-1], dtype=np.uint8)
    ok, buffer = cv2.imencode(suffix, image)
    assert ok
    return buffer.tobytes()


def write_photo(path, rgb, suffix=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(photo_bytes(rgb, suffix or path.suffix))
    return path


def rows_by_id(catalogue) -> dict[str, dict]:
    return {r["id"]: r for r in catalogue.read().to_pylist()}


def centre(png: bytes) -> np.ndarray:
    image = decode_image(png, 3)
    assert image.shape == (SIZE, SIZE, 3)
    return image[SIZE // 2, SIZE // 2].astype(int)


def close_to(png: bytes, rgb, tolerance=12) -> bool:
    return bool(np.abs(centre(png) - np.array(rgb)).max() <= tolerance)


def options(**extra):
    return {"size": SIZE, "progress": False, **extra}


# -- a messy CSV ------------------------------------------------------------------------------------
def test_a_messy_csv_becomes_a_catalogue(tmp_path):
    shop = tmp_path / "shop"
    write_photo(shop / "a1.png", RED)
    absolute = write_photo(tmp_path / "elsewhere" / "a2.jpg", GREEN)
    uri = write_photo(tmp_path / "elsewhere" / "a3 photo.png", BLUE).as_uri()  # a space, quoted as %20
    write_photo(shop / "sub" / "a6.png", YELLOW)
    (shop / "corrupt.png").write_bytes(b"\x89PNG this is not an image at all")
    text = (
        " sku , colour ,category,name,photo\n"
        ' A1 , Red ,Tops,"Shirt, blue", a1.png \n'
        f'A2,NA,Tops,"Line one\nline two",{absolute}\n'
        f"A3,,Shoes,Boot,{uri}\n"
        "A4,Red,N/A,Sock,missing.png\n"
        "A5,Blue,Shoes,Sandal,corrupt.png\n"
        ",,,,\n"
        "A6, Blue ,Tops , Tee ,sub/a6.png\n"
    )
    (shop / "products.csv").write_bytes(text.encode("utf-8-sig"))  # with a byte-order mark

    catalogue = import_table(shop / "products.csv", tmp_path / "cat", "sku", "photo", ["colour", "category", "name"],
                             **options(max_failures=0.5))

    rows = rows_by_id(catalogue)
    assert set(rows) == {"A1", "A2", "A3", "A6"}
    assert {i: (r["colour"], r["category"], r["name"]) for i, r in rows.items()} == {
        "A1": ("Red", "Tops", "Shirt, blue"),
        "A2": ("other", "Tops", "Line one\nline two"),
        "A3": ("other", "Shoes", "Boot"),
        "A6": ("Blue", "Tops", "Tee"),
    }
    assert all(r["split"] == split_of(i) for i, r in rows.items())
    for product_id, rgb in {"A1": RED, "A2": GREEN, "A3": BLUE, "A6": YELLOW}.items():
        assert close_to(rows[product_id]["image"], rgb), product_id
    # the vocabulary is counted before photos are read: A4's Red and A5's Blue count, A4's N/A is `other`
    schema = catalogue.schema
    assert schema.group("colour").values == ("Blue", "Red", "other")
    assert schema.group("category").values == ("Tops", "Shoes", "other")
    assert not any(g.multi_label for g in schema.groups)
    skipped = catalogue.manifest["source"]["skipped"]
    assert skipped == {"count": 2, "by_reason": {"missing file": 1, "undecodable": 1},
                       "items": [{"id": "A4", "reason": "missing file"}, {"id": "A5", "reason": "undecodable"}]}


def test_bad_tables_are_refused_with_what_is_wrong(tmp_path):
    write_photo(tmp_path / "p.png", RED)
    dupes = tmp_path / "dupes.csv"
    dupes.write_text("sku,colour,photo\nA,Red,p.png\nB,Red,p.png\nA,Blue,p.png\nC,Red,p.png\nC,Red,p.png\n")
    with pytest.raises(ValueError, match=r"more than once in column 'sku': A, C$"):
        import_table(dupes, tmp_path / "out", "sku", "photo", ["colour"], **options())
    with pytest.raises(ValueError, match=r"no column\(s\) size, material; its columns: sku, colour, photo"):
        import_table(dupes, tmp_path / "out", "sku", "photo", ["colour", "size", "material"], **options())
    no_id = tmp_path / "no_id.csv"
    no_id.write_text('sku,colour,photo\nA,Red,p.png\n"",Blue,"two\nlines"\n NA ,Red,p.png\n')
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has no id"):
        import_table(no_id, tmp_path / "out", "sku", "photo", ["colour"], **options())
    (tmp_path / "products.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"unknown table format '.xlsx'; allowed: .csv, .parquet, .jsonl, .ndjson"):
        import_table(tmp_path / "products.xlsx", tmp_path / "out", "sku", "photo", ["colour"], **options())
    (tmp_path / "short.csv").write_text("sku,colour,photo\nA,Red,p.png\nB,Red\n")
    with pytest.raises(ValueError, match=r"line 3 has 2 fields, the header 3"):
        import_table(tmp_path / "short.csv", tmp_path / "out", "sku", "photo", ["colour"], **options())
    assert not (tmp_path / "out").exists()


# -- Parquet and JSON Lines -------------------------------------------------------------------------
def test_parquet_with_image_bytes_and_its_own_split(tmp_path):
    table = pa.table({
        "product_id": pa.array([101, 102, 103, 104], pa.int64()),  # numbers: their text becomes the id
        "colour": ["Red", "Green", " Red ", None],
        "split": ["train", "test", "TRAIN", "test"],
        "jpeg": pa.array([photo_bytes(RED, ".jpg"), photo_bytes(GREEN), photo_bytes(RED), photo_bytes(CYAN)],
                         pa.binary()),
    })
    pq.write_table(table, tmp_path / "export.parquet")
    catalogue = import_table(tmp_path / "export.parquet", tmp_path / "cat", "product_id", "jpeg", ["colour"], **options())
    rows = rows_by_id(catalogue)
    assert {i: (r["split"], r["colour"]) for i, r in rows.items()} == {
        "101": ("train", "Red"), "102": ("test", "Green"), "103": ("train", "Red"), "104": ("test", "other")}
    assert close_to(rows["101"]["image"], RED, tolerance=20) and close_to(rows["104"]["image"], CYAN)
    assert catalogue.manifest["source"]["split_rule"] == "the table's split column"

    pq.write_table(table.set_column(2, "split", pa.array(["train", "validation", "test", "test"])), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"column 'split' holds 'validation' for id 102.*allowed: train, test"):
        import_table(tmp_path / "bad.parquet", tmp_path / "cat2", "product_id", "jpeg", ["colour"], **options())


def test_json_lines_with_paths_and_a_data_uri(tmp_path):
    write_photo(tmp_path / "img" / "1.png", RED)
    write_photo(tmp_path / "img" / "2.jpg", BLUE)
    inline = "data:image/png;base64," + base64.b64encode(photo_bytes(YELLOW)).decode()
    lines = [
        '{"id": 1, "colour": "Red", "image": "img/1.png"}',
        "",
        '{"id": 2, "colour": null, "image": "img/2.jpg", "extra": {"ignored": true}}',
        f'{{"id": "3", "colour": "N/A", "image": "{inline}"}}',
        '{"id": 4, "colour": "Red", "image": "data:image/png;base64,@@@not base64@@@"}',
    ]
    (tmp_path / "rows.ndjson").write_text("\n".join(lines) + "\n")
    catalogue = import_table(tmp_path / "rows.ndjson", tmp_path / "cat", "id", "image", ["colour"],
                             **options(max_failures=0.25))
    rows = rows_by_id(catalogue)
    assert {i: r["colour"] for i, r in rows.items()} == {"1": "Red", "2": "other", "3": "other"}
    assert close_to(rows["2"]["image"], BLUE, tolerance=20) and close_to(rows["3"]["image"], YELLOW)
    assert catalogue.manifest["source"]["skipped"]["items"] == [{"id": "4", "reason": "bad data uri"}]

    (tmp_path / "broken.jsonl").write_text('{"id": 1, "image": "img/1.png"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2 holds a list; expected one JSON object per line"):
        import_table(tmp_path / "broken.jsonl", tmp_path / "cat2", "id", "image", ["colour"], **options())


# -- multi-label and selection rules ----------------------------------------------------------------
def test_a_multi_label_column(tmp_path):
    write_photo(tmp_path / "p.png", RED)
    (tmp_path / "t.csv").write_text(
        "id,tags,photo\n1,cotton| summer ||,p.png\n2,summer,p.png\n3,,p.png\n4,wool|summer|cotton|summer,p.png\n"
    )
    catalogue = import_table(tmp_path / "t.csv", tmp_path / "cat", "id", "photo", ["tags"],
                             multi_label={"tags": "|"}, **options())
    group = catalogue.schema.group("tags")
    assert group.multi_label and group.values == ("summer", "cotton", "wool", "other")
    assert pa.types.is_list(catalogue.read(["tags"]).schema.field("tags").type)
    assert {i: r["tags"] for i, r in rows_by_id(catalogue).items()} == {
        "1": ["summer", "cotton"], "2": ["summer"], "3": ["other"], "4": ["summer", "cotton", "wool"]}

    rules = {"groups": {"tags": {"top": 2, "rare": "drop", "missing": "drop"}}}  # wool goes, not product 4
    narrow = import_table(tmp_path / "t.csv", tmp_path / "cat2", "id", "photo", ["tags"],
                          multi_label={"tags": "|"}, selection=rules, **options())
    assert narrow.schema.group("tags").values == ("summer", "cotton")
    assert {i: r["tags"] for i, r in rows_by_id(narrow).items()} == {
        "1": ["summer", "cotton"], "2": ["summer"], "4": ["summer", "cotton"]}


SELECTION_TOML = """
other = "misc"
[where]
category = ["Tops", "Shoes"]
[groups.colour]
top = 2
min_count = 2
rare = "other"
missing = "drop"
"""


def test_a_toml_selection(tmp_path):
    write_photo(tmp_path / "p.png", RED)
    data = {"P1": ("Tops", "Red"), "P2": ("Tops", "Red"), "P3": ("Tops", "Blue"), "P4": ("Shoes", "Blue"),
            "P5": ("Shoes", "Green"), "P6": ("Shoes", "NA"), "P7": ("Bags", "Red"), "P8": ("Tops", "Black"),
            "P9": ("Shoes", "Black"), "P10": ("Tops", "Black")}
    (tmp_path / "s.csv").write_text("id,category,colour,photo\n" + "".join(f"{i},{c},{k},p.png\n" for i, (c, k) in data.items()))
    (tmp_path / "rules.toml").write_text(SELECTION_TOML)
    catalogue = import_table(tmp_path / "s.csv", tmp_path / "cat", "id", "photo", ["colour", "category"],
                             selection=tmp_path / "rules.toml", **options())
    # Black 3, Blue 2, Red 2, Green 1 among the Tops and Shoes: the top 2 with 2+ are Black and Blue (a tie by name)
    assert {i: r["colour"] for i, r in rows_by_id(catalogue).items()} == {
        "P1": "misc", "P2": "misc", "P3": "Blue", "P4": "Blue", "P5": "misc", "P8": "Black", "P9": "Black", "P10": "Black"}
    assert catalogue.schema.group("colour").values == ("Black", "Blue", "misc")
    assert catalogue.schema.group("category").values == ("Tops", "Shoes")  # the default: as is
    report = catalogue.manifest["source"]["selection_report"]
    assert report["dropped_by_where"] == 1 and report["rows_out"] == 8
    assert report["groups"]["colour"]["missing"] == 1 and report["groups"]["colour"]["rare_values"] == ["Green", "Red"]

    (tmp_path / "stranger.toml").write_text("[groups.size]\ntop = 3\n")
    with pytest.raises(ValueError, match=r"group\(s\) size not among the attributes \(colour, category\)"):
        import_table(tmp_path / "s.csv", tmp_path / "c2", "id", "photo", ["colour", "category"],
                     selection=tmp_path / "stranger.toml", **options())
    (tmp_path / "typo.toml").write_text("[groups.colour]\nminimum = 3\n")
    with pytest.raises(ValueError, match=r"group 'colour' has unknown key\(s\) minimum; allowed: top, min_count"):
        import_table(tmp_path / "s.csv", tmp_path / "c2", "id", "photo", ["colour"],
                     selection=tmp_path / "typo.toml", **options())
    with pytest.raises(ValueError, match=r"unknown key\(s\) filter; allowed: other, where, groups"):
        import_table(tmp_path / "s.csv", tmp_path / "c2", "id", "photo", ["colour"], selection={"filter": {}}, **options())


# -- URLs -------------------------------------------------------------------------------------------
class PhotoServer:
    """A real HTTP server: /N.png photos, /gone.png 404, /slow.png too slow, /flaky.png a 503 first."""

    def __init__(self, photos: dict[str, bytes], slow_s: float):
        self.photos, self.slow_s, self.requests = photos, slow_s, Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] += 1
                if self.path == "/slow.png":
                    time.sleep(server.slow_s)
                if self.path == "/flaky.png" and server.requests[self.path] == 1:
                    return self.send_error(503)
                body = server.photos.get(self.path.lstrip("/").replace("flaky", "3").replace("slow", "1"))
                if body is None:
                    return self.send_error(404)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting (the slow photo)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.http.shutdown()
        self.http.server_close()


def test_url_photos_are_fetched_retried_skipped_and_cached(tmp_path):
    server = PhotoServer({"1.png": photo_bytes(RED), "2.png": photo_bytes(GREEN), "3.png": photo_bytes(BLUE)}, 2.5)
    try:
        names = {"U1": "1.png", "U2": "2.png", "U3": "flaky.png", "U4": "gone.png", "U5": "slow.png"}
        (tmp_path / "urls.csv").write_text("id,colour,url\n" + "".join(f"{i},Red,{server.base}/{n}\n" for i, n in names.items()))
        fetch = {"fetch_timeout": 0.5, "fetch_retries": 1, "fetch_workers": 4, "image_cache": tmp_path / "cache",
                 "max_failures": 0.4}
        first = import_table(tmp_path / "urls.csv", tmp_path / "cat", "id", "url", ["colour"], **options(**fetch))
        rows = rows_by_id(first)
        assert set(rows) == {"U1", "U2", "U3"}
        assert close_to(rows["U2"]["image"], GREEN) and close_to(rows["U3"]["image"], BLUE)
        skipped = first.manifest["source"]["skipped"]
        assert sorted(map(tuple, (d.values() for d in skipped["items"]))) == [("U4", "http 404"), ("U5", "timeout")]
        # a 404 is final, a timeout and a 503 are tried again (fetch_retries=1)
        assert server.requests["/gone.png"] == 1 and server.requests["/slow.png"] == 2
        assert server.requests["/flaky.png"] == 2
        for name in ("1.png", "2.png", "flaky.png"):
            key = hashlib.sha256(f"{server.base}/{name}".encode()).hexdigest()
            assert (tmp_path / "cache" / key[:2] / key).is_file()
    finally:
        server.stop()

    again = import_table(tmp_path / "urls.csv", tmp_path / "cat2", "id", "url", ["colour"], **options(**fetch))
    assert set(rows_by_id(again)) == {"U1", "U2", "U3"}
    assert again.fingerprint == first.fingerprint  # the same photos, from the cache
    assert {d["reason"] for d in again.manifest["source"]["skipped"]["items"]} == {"connection error"}


# -- failures leave the published catalogue alone ------------------------------------------------------
def test_too_many_failures_publish_nothing(tmp_path):
    for name, rgb in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)):
        write_photo(tmp_path / name, rgb)
    (tmp_path / "good.csv").write_text("id,colour,photo\n1,Red,a.png\n2,Green,b.png\n3,Blue,c.png\n")
    dest = tmp_path / "cat"
    published = import_table(tmp_path / "good.csv", dest, "id", "photo", ["colour"], **options())
    (tmp_path / "worse.csv").write_text("id,colour,photo\n1,Red,a.png\n2,Green,lost.png\n3,Blue,c.png\n4,Red,a.png\n")
    with pytest.raises(ValueError, match=r"1 of the 4 products have no usable image .*1 missing file.*2 \(missing file\)"):
        import_table(tmp_path / "worse.csv", dest, "id", "photo", ["colour"], **options(max_failures=0.0))
    with pytest.raises(ValueError, match=r"more than max_failures=0.2 allows"):  # 1 of 4 is 25%
        import_table(tmp_path / "worse.csv", dest, "id", "photo", ["colour"], **options(max_failures=0.2))
    now = Catalogue.open(dest, verify=True)
    assert now.fingerprint == published.fingerprint and len(now) == 3
    assert [p.name for p in artifacts.versions_dir(dest).iterdir()] == [now.path.name]  # no staging left


# -- the command line -------------------------------------------------------------------------------
def test_the_cli_imports_a_table_and_refuses_options_elsewhere(tmp_path, capsys):
    write_photo(tmp_path / "a.png", RED)
    write_photo(tmp_path / "b.jpg", GREEN)
    (tmp_path / "products.csv").write_text("sku,colour,tags,photo\nX1,Red,a|b,a.png\nX2,Green,b,b.jpg\nX3,Red,,a.png\n")
    (tmp_path / "rules.toml").write_text('[groups.colour]\nmissing = "drop"\n')
    code = main(["import", "table", "--source", str(tmp_path / "products.csv"), "--out", str(tmp_path / "cat"),
                 "--id-column", "sku", "--image-column", "photo", "--attributes", "colour, tags",
                 "--multi-label", "tags:|", "--selection", str(tmp_path / "rules.toml"), "--size", str(SIZE),
                 "--max-failures", "0", "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.startswith("table-products: 3 products -> ")
    catalogue = Catalogue.open(tmp_path / "cat", verify=True)
    assert catalogue.schema.names == ("colour", "tags") and catalogue.schema.group("tags").multi_label
    assert rows_by_id(catalogue)["X3"]["tags"] == ["other"]

    assert main(["import", "fashion-mnist", "--out", str(tmp_path / "m"), "--id-column", "sku"]) == 2
    assert "the fashion-mnist importer has no option id_column" in capsys.readouterr().err
    assert main(["import", "table", "--source", str(tmp_path / "products.csv"), "--out", str(tmp_path / "t")]) == 2
    assert "the table importer needs --id-column, --image-column, --attributes" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "t").exists()
