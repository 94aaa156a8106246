"""The Fashion Product Images importer: the real Parquet copy, and Kaggle's layout with its quirks.

Kaggle's folder is rebuilt in a temp folder from real rows and real JPEG bytes of the Parquet
copy (plus the quirks: unquoted commas, NA/empty fields, ids without an image, undecodable
files), so both layouts are checked against each other.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from atelier.catalog.fashion_product_images import (
    PRESETS,
    STYLES_HEADER,
    AttributeSelection,
    GroupSelection,
    Source,
    import_fashion_product_images,
    read_styles_csv,
    select_attributes,
    split_of,
    square_png,
)
from atelier.catalog.images import decode_image, to_square

COMMA_IDS = ("44065", "3413", "23101", "23108", "4854", "23109", "23100", "23107", "59768", "23114", "23112",
             "23115", "23124", "3428", "23103", "3418", "23110", "23117", "23116", "23111", "23118", "23127")
GRAYSCALE_IDS = ("7542", "9048")
ODD_SIZE_IDS = {"25299": (80, 53), "1799": (60, 60), "11151": (77, 60), "59593": (80, 54)}  # id -> (h, w)
NO_IMAGE_IDS = ("12347", "39401")  # real styles.csv ids without an image; their attributes are made up here
SYNTHETIC_ID = "99999"  # a flat grey 53x80 block: its footprint after squaring is known exactly
GREY = 128


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_source(fpi_parquet) -> Source:
    return Source.open(fpi_parquet)


@pytest.fixture(scope="session")
def fixture_rows(fpi_parquet) -> pa.Table:
    """Real rows exercising every quirk: comma names, nulls of each kind, grayscale, odd sizes."""
    attrs = pa.concat_tables(pq.read_table(f, columns=list(STYLES_HEADER)) for f in sorted(fpi_parquet.glob("*.parquet")))
    ids = list(COMMA_IDS) + list(GRAYSCALE_IDS) + list(ODD_SIZE_IDS) + attrs.column("id").to_pylist()[:12]
    for col, n in (("baseColour", 3), ("usage", 3), ("season", 2), ("productDisplayName", 2), ("year", 1)):
        ids += attrs.filter(pc.is_null(attrs.column(col))).column("id").to_pylist()[:n]
    ids = list(dict.fromkeys(ids))
    table = pa.concat_tables(pq.read_table(f, filters=[("id", "in", ids)]) for f in sorted(fpi_parquet.glob("*.parquet")))
    assert table.num_rows == len(ids)
    return table


def _csv_field(value, counter: Counter) -> str:
    if value is None:  # both spellings of "missing" that styles.csv uses
        counter["null"] += 1
        return "NA" if counter["null"] % 2 else ""
    return str(value)


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory, fixture_rows) -> Path:
    """Kaggle's layout: styles.csv (unquoted commas, NA and empty fields, unsorted) + images/<id>.jpg."""
    folder = tmp_path_factory.mktemp("kaggle") / "fashion-product-images-small"
    (folder / "images").mkdir(parents=True)
    rows = fixture_rows.drop_columns(["image"]).to_pylist()
    counter: Counter = Counter()
    lines = [",".join(STYLES_HEADER)]
    for row in reversed(rows):
        lines.append(",".join(_csv_field(row[c], counter) for c in STYLES_HEADER))
    lines.append(f"{NO_IMAGE_IDS[0]},Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Made-up Tee, with a comma")
    lines.append(f"{NO_IMAGE_IDS[1]},Women,Footwear,Shoes,Heels,Black,Winter,2013,Formal,Made-up Heels")
    lines.append(f"{SYNTHETIC_ID},Unisex,Apparel,Topwear,Tshirts,Grey,Summer,2012,Casual,Grey block")
    (folder / "styles.csv").write_text("\r\n".join(lines) + "\r\n")  # Kaggle's file has CRLF line ends
    for product_id, data in zip(fixture_rows.column("id").to_pylist(), fixture_rows.column("image").to_pylist()):
        (folder / "images" / f"{product_id}.jpg").write_bytes(data)
    ok, jpeg = cv2.imencode(".jpg", np.full((80, 53, 3), GREY, np.uint8))
    (folder / "images" / f"{SYNTHETIC_ID}.jpg").write_bytes(jpeg.tobytes())
    return folder


def undecodable_ids(fixture_rows: pa.Table) -> tuple[str, str]:
    plain = [i for i in fixture_rows.column("id").to_pylist() if i not in (*COMMA_IDS, *GRAYSCALE_IDS, *ODD_SIZE_IDS)]
    return plain[0], plain[1]


@pytest.fixture(scope="session")
def broken_kaggle_dir(tmp_path_factory, kaggle_dir, fixture_rows) -> Path:
    """The Kaggle fixture with two images made undecodable (garbage, empty)."""
    import shutil

    folder = tmp_path_factory.mktemp("kaggle-broken") / "fpi"
    shutil.copytree(kaggle_dir, folder)
    garbage, empty = undecodable_ids(fixture_rows)
    (folder / "images" / f"{garbage}.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (folder / "images" / f"{empty}.jpg").write_bytes(b"")
    return folder


LOSSLESS = AttributeSelection("lossless", (
    GroupSelection("gender", "gender"),
    GroupSelection("subCategory", "subCategory"),
    GroupSelection("baseColour", "baseColour", missing="other"),
    GroupSelection("usage", "usage", missing="other"),
))


@pytest.fixture(scope="session")
def kaggle_import(tmp_path_factory, broken_kaggle_dir):
    dest = tmp_path_factory.mktemp("out") / "kaggle"
    return import_fashion_product_images(broken_kaggle_dir, dest, LOSSLESS, size=48, progress=False)


def rows_by_id(catalogue) -> dict[str, dict]:
    return {r["id"]: r for r in catalogue.read().to_pylist()}


def non_white_box(image: np.ndarray, threshold: int = 235) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the pixels darker than near-white."""
    ys, xs = np.nonzero((image < threshold).any(axis=2))
    return ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


# -- the real Parquet copy ----------------------------------------------------------------------------
def test_real_parquet_counts_under_the_full_preset(real_source):
    assert real_source.layout == "parquet" and real_source.attributes.num_rows == 44_441
    selected = select_attributes(real_source.attributes, "full")
    table, report = selected.table, selected.report
    assert table.num_rows == 44_441 and report["rows_out"] == 44_441  # `full` drops nothing
    count = lambda col: dict(Counter(table.column(col).to_pylist()))  # noqa: E731
    assert count("gender") == {"Men": 22_160, "Women": 18_632, "Unisex": 2_164, "Boys": 830, "Girls": 655}
    assert count("masterCategory") == {"Apparel": 21_395, "Accessories": 11_289, "Footwear": 9_222, "Personal Care": 2_404,
                                       "Free Items": 105, "Sporting Goods": 25, "other": 1}  # Home: 1 row < min_count 10
    assert report["groups"]["masterCategory"]["rare_values"] == ["Home"]
    assert report["groups"]["baseColour"]["missing"] == 15
    assert report["groups"]["season"]["missing"] == 21 and count("season")["other"] == 21
    assert report["groups"]["usage"]["missing"] == 317 and report["groups"]["usage"]["rare_values"] == ["Home"]
    assert count("usage")["other"] == 317 + 1
    # every value with >= 10 rows is its own value, the rest is `other`
    articles = Counter(real_source.attributes.column("articleType").to_pylist())
    kept = {v for v, n in articles.items() if n >= 10}
    assert set(selected.schema.group("articleType").values) == kept | {"other"}
    assert count("articleType")["other"] == sum(n for v, n in articles.items() if n < 10)
    # schema order: frequency descending, then name; `other` last
    for g in selected.schema.groups:
        counts = count(g.name)
        real = [v for v in g.values if v != "other"]
        assert real == sorted(real, key=lambda v: (-counts[v], v))
        assert list(g.values) == real + (["other"] if "other" in counts else [])
    assert selected.schema.group("gender").values == ("Men", "Women", "Unisex", "Boys", "Girls")


def test_splits_are_a_function_of_the_id(real_source):
    full = select_attributes(real_source.attributes, "full").table
    splits = Counter(full.column("split").to_pylist())
    assert set(splits) == {"train", "test"} and 0.09 < splits["test"] / full.num_rows < 0.11
    apparel = select_attributes(real_source.attributes, "apparel-6x6").table
    by_id = dict(zip(full.column("id").to_pylist(), full.column("split").to_pylist()))
    assert all(by_id[i] == s for i, s in zip(apparel.column("id").to_pylist(), apparel.column("split").to_pylist()))
    assert [split_of(i) for i in ("1163", "44065")] == [by_id["1163"], by_id["44065"]]


def test_apparel_6x6_preset(real_source, tmp_path):
    selected = select_attributes(real_source.attributes, "apparel-6x6")
    schema = selected.schema
    assert schema.names == ("type", "colour")
    assert schema.group("type").values == ("Topwear", "Bottomwear", "Innerwear", "Dress", "Loungewear and Nightwear", "Saree")
    assert schema.group("colour").values == ("Blue", "Black", "White", "Grey", "Green", "Red")
    assert selected.table.num_rows == 13_870
    src = {r["id"]: r for r in real_source.attributes.select(["id", "masterCategory", "subCategory", "baseColour"]).to_pylist()}
    for r in selected.table.to_pylist():  # only Apparel, values untouched (nothing mapped to `other`)
        s = src[r["id"]]
        assert (s["masterCategory"], s["subCategory"], s["baseColour"]) == ("Apparel", r["type"], r["colour"])
    assert len({(r["type"], r["colour"]) for r in selected.table.to_pylist()}) == 36
    report = selected.report
    assert report["dropped_by_where"] == 44_441 - 21_395
    assert report["groups"]["type"]["rare_values"] == ["Apparel Set", "Socks"] and report["groups"]["colour"]["missing"] == 6

    catalogue = import_fashion_product_images(real_source.path, tmp_path / "apparel", "apparel-6x6", limit=300, progress=False)
    assert len(catalogue) == 300 and catalogue.schema == schema  # a limited import keeps the full schema
    assert catalogue.read(["id"]).column("id").to_pylist() == selected.table.column("id").to_pylist()[:300]


def test_apparel_6x6_all_keeps_every_product_and_fits_the_6x6_schema(real_source):
    narrow = select_attributes(real_source.attributes, "apparel-6x6")
    wide = select_attributes(real_source.attributes, "apparel-6x6-all")
    assert wide.table.num_rows == 44_441
    for name in ("type", "colour"):  # the listed vocabulary is what apparel-6x6 derives from the data
        assert set(wide.schema.group(name).values) == {*narrow.schema.group(name).values, "other"}
    assert narrow.schema.fits_within(wide.schema) is None
    narrow_rows = {r["id"]: r for r in narrow.table.to_pylist()}
    for r in wide.table.to_pylist():
        if r["id"] in narrow_rows:
            assert (r["type"], r["colour"]) == (narrow_rows[r["id"]]["type"], narrow_rows[r["id"]]["colour"])
    src = {r["id"]: r for r in real_source.attributes.select(["id", "subCategory"]).to_pylist()}
    assert all(r["type"] == "other" for r in wide.table.to_pylist() if src[r["id"]]["subCategory"] in ("Shoes", "Watches"))


def test_wear_3x3_preset(real_source):
    selected = select_attributes(real_source.attributes, "wear-3x3")
    assert selected.schema.group("type").values == ("topwear", "shoes", "bottomwear")
    assert selected.schema.group("colour").values == ("Black", "White", "Blue")
    src = {r["id"]: r for r in real_source.attributes.select(["id", "masterCategory", "subCategory", "baseColour"]).to_pylist()}
    rows = selected.table.to_pylist()
    for r in rows:
        s = src[r["id"]]
        expected = {"topwear": s["subCategory"] == "Topwear", "bottomwear": s["subCategory"] == "Bottomwear",
                    "shoes": s["masterCategory"] == "Footwear"}
        assert expected[r["type"]] and s["baseColour"] == r["colour"]
    wear = [s for s in src.values() if s["subCategory"] in ("Topwear", "Bottomwear") or s["masterCategory"] == "Footwear"]
    assert len(rows) == sum(s["baseColour"] in ("Black", "White", "Blue") for s in wear) == 13_148
    assert selected.report["groups"]["type"]["missing"] == 44_441 - len(wear)


def test_import_aligns_ids_with_their_images_across_batches(real_source, tmp_path):
    """Small batches and a limit: each stored image is the squared image of its own id."""
    catalogue = import_fashion_product_images(real_source.path, tmp_path / "full", "full", size=32, limit=450,
                                              progress=False, batch_size=100)
    table = catalogue.read()
    assert table.num_rows == 450 and catalogue.image_channels == 3
    ids = table.column("id").to_pylist()
    source = {i: d for i, d in real_source.image_bytes(ids)}
    for product_id, png in zip(ids, table.column("image").to_pylist()):
        bgr = cv2.imdecode(np.frombuffer(source[product_id], np.uint8), cv2.IMREAD_COLOR)
        expected = to_square(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 32)  # colour kept, RGB order
        assert np.array_equal(decode_image(png, 3), expected)
    assert square_png(b"not an image", 32) is None
    # attribute encode -> decode round trip on every imported row
    schema = catalogue.schema
    for row in table.drop_columns(["image"]).to_pylist():
        attributes = {name: row[name] for name in schema.names}
        assert schema.decode(schema.encode(attributes)) == attributes
    assert catalogue.manifest["source"]["undecodable_images"]["count"] == 0


# -- Kaggle's layout ----------------------------------------------------------------------------------
def test_styles_csv_quirks_are_read_like_the_parquet_copy(kaggle_dir, fixture_rows):
    raw = (kaggle_dir / "styles.csv").read_text()
    line = next(x for x in raw.splitlines() if x.startswith("44065,"))
    assert line.endswith(",Boss Men Perfume, After Shave Balm and Shower Gel Set") and '"' not in line
    assert ",," in raw and ",NA," in raw
    table = read_styles_csv(kaggle_dir / "styles.csv")
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["44065"]["productDisplayName"] == "Boss Men Perfume, After Shave Balm and Shower Gel Set"
    assert by_id[NO_IMAGE_IDS[0]]["productDisplayName"] == "Made-up Tee, with a comma"
    assert table.schema.field("year").type == pa.int16()
    for expected in fixture_rows.drop_columns(["image"]).select(list(STYLES_HEADER)).to_pylist():
        assert by_id[expected["id"]] == expected  # commas rebuilt, NA and "" -> null, year a number
    names = [by_id[i]["productDisplayName"] for i in COMMA_IDS]
    assert all("," in n for n in names)


def test_kaggle_import_skips_and_counts_missing_and_undecodable_images(kaggle_import, fixture_rows):
    source = kaggle_import.manifest["source"]
    assert source["layout"] == "styles.csv"
    assert source["missing_images"] == {"count": 2, "ids": list(NO_IMAGE_IDS)}
    assert source["undecodable_images"]["count"] == 2
    assert set(source["undecodable_images"]["ids"]) == set(undecodable_ids(fixture_rows))
    rows = rows_by_id(kaggle_import)
    expected = set(fixture_rows.column("id").to_pylist()) - set(undecodable_ids(fixture_rows)) | {SYNTHETIC_ID}
    assert set(rows) == expected and len(kaggle_import) == len(expected)
    # missing values became `other` as configured; attributes round-trip through the schema
    schema = kaggle_import.schema
    assert "other" in schema.group("baseColour").values and "other" in schema.group("usage").values
    for r in rows.values():
        attributes = {name: r[name] for name in schema.names}
        assert schema.decode(schema.encode(attributes)) == attributes


def test_kaggle_images_are_white_padded_squares_of_the_requested_size(kaggle_import, fixture_rows):
    rows = rows_by_id(kaggle_import)
    images = {i: decode_image(r["image"], 3) for i, r in rows.items()}
    assert {im.shape for im in images.values()} == {(48, 48, 3)}
    for product_id in GRAYSCALE_IDS:  # grayscale JPEGs: three equal channels
        im = images[product_id]
        assert np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])
    # the flat grey 53x80 block: 53/80 * 48 = 31.8 -> 32 columns, centred, the rest pure white
    block = images[SYNTHETIC_ID]
    top, left, h, w = non_white_box(block)
    assert (top, left, h, w) == (0, 8, 48, 32)
    assert (block[:, :8] == 255).all() and (block[:, 40:] == 255).all()
    assert np.abs(block[:, 9:39].astype(int) - GREY).max() <= 3
    # real odd-sized photos: padding white, the product's footprint scaled, not stretched
    source = dict(zip(fixture_rows.column("id").to_pylist(), fixture_rows.column("image").to_pylist()))
    for product_id, (h0, w0) in ODD_SIZE_IDS.items():
        original = decode_image(source[product_id], 3)
        assert original.shape[:2] == (h0, w0)
        scale = 48 / max(h0, w0)
        nw, nh = round(w0 * scale), round(h0 * scale)
        out = images[product_id]
        pad_x, pad_y = (48 - nw) // 2, (48 - nh) // 2
        assert (out[:, :pad_x] == 255).all() and (out[:, pad_x + nw :] == 255).all()
        assert (out[:pad_y] == 255).all() and (out[pad_y + nh :] == 255).all()
        _, _, oh, ow = non_white_box(original)
        _, _, sh, sw = non_white_box(out)
        assert abs(sh - oh * scale) <= 2 and abs(sw - ow * scale) <= 2
        assert abs(sw / sh - ow / oh) < 0.08


def test_both_layouts_give_the_same_catalogue(tmp_path, kaggle_dir, fixture_rows):
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    pq.write_table(fixture_rows, parquet_dir / "part-00.parquet")
    from_parquet = import_fashion_product_images(parquet_dir, tmp_path / "a", LOSSLESS, size=40, progress=False)
    from_kaggle = import_fashion_product_images(kaggle_dir, tmp_path / "b", LOSSLESS, size=40, progress=False)
    a, b = rows_by_id(from_parquet), rows_by_id(from_kaggle)
    assert set(b) == set(a) | {SYNTHETIC_ID}
    for product_id, row in a.items():
        assert {k: v for k, v in row.items() if k != "image"} == {k: v for k, v in b[product_id].items() if k != "image"}
        assert np.array_equal(decode_image(row["image"], 3), decode_image(b[product_id]["image"], 3))


def test_rare_values_become_other_or_are_dropped_as_configured(tmp_path, kaggle_dir):
    table = read_styles_csv(kaggle_dir / "styles.csv")
    with_image = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(list(NO_IMAGE_IDS)))))
    counts = Counter(with_image.column("subCategory").to_pylist())
    frequent = {v for v, n in counts.items() if n >= 3}
    assert frequent and len(frequent) < len(counts)  # the fixture has both kinds
    source = {r["id"]: r["subCategory"] for r in with_image.to_pylist()}

    as_other = AttributeSelection("t", (GroupSelection("type", "subCategory", min_count=3, rare="other"),), other="misc")
    catalogue = import_fashion_product_images(kaggle_dir, tmp_path / "other", as_other, size=16, progress=False)
    rows = catalogue.read(["id", "type"]).to_pylist()
    assert len(rows) == with_image.num_rows
    assert all(r["type"] == (source[r["id"]] if source[r["id"]] in frequent else "misc") for r in rows)
    assert catalogue.schema.group("type").values[-1] == "misc"
    assert set(catalogue.schema.group("type").values) == frequent | {"misc"}

    dropped = AttributeSelection("t", (GroupSelection("type", "subCategory", min_count=3, rare="drop"),))
    catalogue = import_fashion_product_images(kaggle_dir, tmp_path / "drop", dropped, size=16, progress=False)
    rows = catalogue.read(["id", "type"]).to_pylist()
    assert {r["id"] for r in rows} == {i for i, v in source.items() if v in frequent}
    assert all(r["type"] == source[r["id"]] for r in rows)
    report = catalogue.manifest["source"]["selection_report"]["groups"]["type"]
    assert report["rare"] == sum(n for v, n in counts.items() if v not in frequent)
    assert report["rare_values"] == sorted(set(counts) - frequent)


# -- errors that say what was expected ----------------------------------------------------------------
def test_a_folder_of_neither_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Parquet part files.*styles.csv and images/<id>.jpg"):
        import_fashion_product_images(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "styles.csv").write_text(",".join(STYLES_HEADER) + "\n")
    with pytest.raises(ValueError, match=r"no images/ folder"):
        Source.open(tmp_path)


def test_styles_csv_errors_name_the_line(tmp_path):
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("id,gender,masterCategory\n1,Men,Apparel\n")
    with pytest.raises(ValueError, match="expected 'id,gender,masterCategory,subCategory"):
        read_styles_csv(bad_header)
    short = tmp_path / "b.csv"
    short.write_text(",".join(STYLES_HEADER) + "\n1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Tee\n2,Men,Apparel\n")
    with pytest.raises(ValueError, match=r"b.csv:3: 3 fields, expected 10"):
        read_styles_csv(short)


def test_selection_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="presets: apparel-6x6, wear-3x3, apparel-6x6-all, full"):
        import_fashion_product_images(Path("."), Path("/nonexistent"), "apparel")
    with pytest.raises(ValueError, match="allowed: other, drop"):
        GroupSelection("type", "subCategory", rare="keep")
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        GroupSelection("colour", "colour")
    assert set(PRESETS) == {"apparel-6x6", "wear-3x3", "apparel-6x6-all", "full"}
