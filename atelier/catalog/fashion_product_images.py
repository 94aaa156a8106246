"""Fashion Product Images (Small): import the Parquet copy or Kaggle's folder as a catalogue.

Two source layouts, detected from what the folder holds:
- the Parquet copy (`shared/data/fashion_product_images_small/`, see its README): part files
  with the styles.csv columns plus the JPEG bytes in `image`;
- Kaggle's original folder: `styles.csv` + `images/<id>.jpg`. Its quirks, all handled here:
  product names with unquoted commas (a line is split on its first 9 commas only, so the name
  keeps the rest), `NA` and empty fields (missing), ids whose image file does not exist
  (skipped and counted, like undecodable images in either layout).

Which attributes become attribute groups is configuration (`AttributeSelection`, whose rules
are atelier/catalog/selection.py's, shared with the table importer). Each group takes a source
column as is, or derives its values from rules; it may keep only its `top` most frequent values
and values with at least `min_count` rows, and says what happens to the rest (`rare`) and to
rows without a value (`missing`): map them to the selection's `other` value, or leave the row
out. Groups are resolved in order: a group's counts cover the rows that the `where` filter and
the earlier groups kept. The schema lists each group's values by frequency in the catalogue
(descending, then name), `other` last; ties in `top` also break by name.

Presets (`PRESETS`), the seed's experiments and one for everything:
- `apparel-6x6`: masterCategory == Apparel; `type` = subCategory, top 6; `colour` = baseColour,
  top 6. Everything else is dropped (rare and missing): the seed "limited" its data to these
  classes, and an `other` colour that mixes 40 colours is not a class a shopper can ask for.
- `wear-3x3`: `type` = topwear (subCategory Topwear), bottomwear (subCategory Bottomwear) or
  shoes (masterCategory Footwear), other rows dropped; `colour` = baseColour, the top 3 among
  those rows, the rest dropped. (The seed says "the top three colours in the data"; over the
  whole data and over these rows both give Black, White, Blue.)
- `apparel-6x6-all`: all 44,441 products with apparel-6x6's `type` and `colour` vocabulary;
  whatever apparel-6x6 would drop becomes `other`. A model trained on apparel-6x6 serves an
  index of this catalogue: the shopper's request is matched against the whole shop.
- `full`: gender, masterCategory, subCategory, articleType, baseColour, season, usage, as is.
  No row is dropped: missing values and values with fewer than 10 rows become `other` (a class
  with one example teaches a classifier nothing; e.g. masterCategory `Home`, 1 row).

Images are decoded as RGB (the 431 grayscale JPEGs become 3 equal channels), made square with
`images.to_square` (aspect ratio kept, white padding: the photos sit on white) and stored as
PNG. Splits: the dataset has none, so a product's split is a pure function of its id
(`split_of`: sha256 of the id; 10% test, 90% train), stable across imports, layouts and presets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from atelier.catalog import selection as selection_rules
from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.images import ImageDecodeError, decode_image, encode_png, to_square
from atelier.catalog.importers import IMPORTERS
from atelier.catalog.selection import POLICIES, Selected  # noqa: F401  (importable from here, as before)
from atelier.progress import progress_bar

ATTRIBUTE_COLUMNS = (
    "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage", "productDisplayName",
)
STYLES_HEADER = ("id", *ATTRIBUTE_COLUMNS)
MISSING_TOKENS = frozenset({"", "NA"})  # how styles.csv spells a missing value
TEST_PERCENT = 10
SPLIT_RULE = f"sha256(id)[:8] as big-endian int % 100 < {TEST_PERCENT} -> test, else train"  # what split_of does
LAYOUTS = ("parquet", "styles.csv")
MAX_LISTED_IDS = 100  # skipped ids named in the manifest (the counts are always complete)


def split_of(product_id: str) -> str:
    """`test` for 10% of ids, `train` for the rest: a hash, so no file has to remember it."""
    bucket = int.from_bytes(hashlib.sha256(str(product_id).encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


# -- attribute selection ------------------------------------------------------------------------
# The machinery is atelier/catalog/selection.py; here its groups may name styles.csv's columns only,
# checked when a selection is made.
class GroupSelection(selection_rules.GroupSelection):
    """A `selection.GroupSelection` over Fashion Product Images' columns."""

    allowed_columns = ATTRIBUTE_COLUMNS


class AttributeSelection(selection_rules.AttributeSelection):
    """A `selection.AttributeSelection` whose `where` names Fashion Product Images' columns."""

    allowed_columns = ATTRIBUTE_COLUMNS


# What apparel-6x6 selects from the real data (test_fashion_product_images checks they agree).
APPAREL_6X6_TYPES = ("Topwear", "Bottomwear", "Innerwear", "Dress", "Loungewear and Nightwear", "Saree")
APPAREL_6X6_COLOURS = ("Blue", "Black", "White", "Grey", "Green", "Red")

PRESETS: dict[str, AttributeSelection] = {
    "apparel-6x6": AttributeSelection(
        "apparel-6x6",
        (GroupSelection("type", "subCategory", top=6), GroupSelection("colour", "baseColour", top=6)),
        where={"masterCategory": ("Apparel",)},
    ),
    "wear-3x3": AttributeSelection(
        "wear-3x3",
        (
            GroupSelection("type", derive={
                "topwear": ("subCategory", "Topwear"),
                "bottomwear": ("subCategory", "Bottomwear"),
                "shoes": ("masterCategory", "Footwear"),
            }),
            GroupSelection("colour", "baseColour", top=3),
        ),
    ),
    # The 44,441-product catalogue with the apparel-6x6 vocabulary: every product is kept, and
    # what the 6x6 selection would drop becomes `other`. An apparel-6x6 model fits within its
    # schema (atelier.catalog.schema.fits_within), so it can search the whole catalogue.
    "apparel-6x6-all": AttributeSelection(
        "apparel-6x6-all",
        (
            GroupSelection("type", derive={v: ("subCategory", v) for v in APPAREL_6X6_TYPES}, missing="other"),
            GroupSelection("colour", derive={v: ("baseColour", v) for v in APPAREL_6X6_COLOURS}, missing="other"),
        ),
        where={},
    ),
    "full": AttributeSelection(
        "full",
        tuple(
            GroupSelection(col, col, min_count=10, rare="other", missing="other")
            for col in ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
        ),
    ),
}


def resolve_selection(selection: str | selection_rules.AttributeSelection) -> selection_rules.AttributeSelection:
    if isinstance(selection, selection_rules.AttributeSelection):
        return selection
    try:
        return PRESETS[selection]
    except KeyError:
        raise ValueError(f"unknown attribute selection {selection!r}; presets: {', '.join(PRESETS)}") from None


def select_attributes(attributes: pa.Table, selection: str | selection_rules.AttributeSelection) -> Selected:
    """Apply a selection (a preset's name or an AttributeSelection) to the source's attribute rows."""
    return selection_rules.select_attributes(attributes, resolve_selection(selection), split_of)


# -- sources --------------------------------------------------------------------------------------
def read_styles_csv(path: Path) -> pa.Table:
    """Kaggle's styles.csv -> a table typed like the Parquet copy (year int16, missing -> null).

    Names hold unquoted commas, so each line is split on its first 9 commas only.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = tuple(h.strip() for h in lines[0].split(",")) if lines else ()
    if header != STYLES_HEADER:
        raise ValueError(f"{path}: header is {','.join(header)!r}, expected {','.join(STYLES_HEADER)!r}")
    rows: dict[str, list] = {c: [] for c in STYLES_HEADER}
    seen: set[str] = set()
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",", len(STYLES_HEADER) - 1)
        if len(fields) < len(STYLES_HEADER):
            raise ValueError(
                f"{path}:{lineno}: {len(fields)} fields, expected {len(STYLES_HEADER)} ({','.join(STYLES_HEADER)}): {line!r}"
            )
        *attrs, name = fields
        attrs = [a.strip() for a in attrs]
        product_id = attrs[0]
        if not product_id.isdigit():
            raise ValueError(f"{path}:{lineno}: id {product_id!r} is not a Kaggle product id (digits)")
        if product_id in seen:
            raise ValueError(f"{path}:{lineno}: id {product_id} appears twice")
        seen.add(product_id)
        if len(name) >= 2 and name[0] == name[-1] == '"':  # tolerate a quoted copy of the file
            name = name[1:-1].replace('""', '"')
        for col, value in zip(STYLES_HEADER, [*attrs, name]):
            rows[col].append(None if value.strip() in MISSING_TOKENS else value)
        year = rows["year"][-1]
        if year is not None:
            try:
                rows["year"][-1] = int(float(year))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: year {year!r} is not a number") from None
    return pa.table({c: pa.array(v, pa.int16() if c == "year" else pa.string()) for c, v in rows.items()})


@dataclass
class Source:
    """A detected source: its attribute rows (one per product with an image) and its images."""

    layout: str
    path: Path
    attributes: pa.Table
    missing_images: list[str] = field(default_factory=list)  # ids with attributes but no image
    images_without_row: int = 0
    files: list[Path] = field(default_factory=list)  # the Parquet part files

    @classmethod
    def open(cls, path: Path) -> Source:
        path = Path(path)
        if (path / "styles.csv").is_file():
            return cls._open_styles(path)
        files = _parquet_files(path)
        if files:
            return cls._open_parquet(path, files)
        raise ValueError(
            f"{path} is not a Fashion Product Images source: expected either a folder of Parquet part files "
            f"(columns id, image, {', '.join(ATTRIBUTE_COLUMNS)}) or Kaggle's folder with styles.csv and images/<id>.jpg"
        )

    @classmethod
    def _open_parquet(cls, path: Path, files: list[Path]) -> Source:
        tables = []
        for f in files:
            names = pq.ParquetFile(f).schema_arrow.names
            absent = [c for c in ("id", "image") if c not in names]
            if absent:
                raise ValueError(
                    f"{f} has no column(s) {absent}; a Fashion Product Images part file has "
                    f"id, image, {', '.join(ATTRIBUTE_COLUMNS)}"
                )
            tables.append(pq.read_table(f, columns=[c for c in STYLES_HEADER if c in names]))
        return cls("parquet", path, pa.concat_tables(tables, promote_options="default"), files=files)

    @classmethod
    def _open_styles(cls, path: Path) -> Source:
        images = path / "images"
        if not images.is_dir():
            raise ValueError(f"{path} has styles.csv but no images/ folder; expected images/<id>.jpg beside styles.csv")
        table = read_styles_csv(path / "styles.csv")
        files = {name for name in os.listdir(images) if name.endswith(".jpg")}
        ids = table.column("id").to_pylist()
        has_image = pa.array([f"{i}.jpg" in files for i in ids])
        missing = [i for i in ids if f"{i}.jpg" not in files]
        return cls("styles.csv", path, table.filter(has_image), missing, len(files - {f"{i}.jpg" for i in ids}))

    def image_bytes(self, ids: Iterable[str]) -> Iterator[tuple[str, bytes | None]]:
        """(id, encoded image or None) for the wanted ids, in source order (`ids` must follow it)."""
        if self.layout == "styles.csv":
            for product_id in ids:
                yield product_id, (self.path / "images" / f"{product_id}.jpg").read_bytes()
            return
        wanted = iter(ids)
        target = next(wanted, None)
        for f in self.files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["id", "image"]):
                if target is None:
                    return
                for product_id, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    if product_id == target:
                        yield product_id, data
                        target = next(wanted, None)
                        if target is None:
                            return
        if target is not None:
            raise RuntimeError(f"{self.path}: id {target} not found in source order; was the source modified during the import?")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    return sorted(path.glob("*.parquet")) if path.is_dir() else []


# -- images ---------------------------------------------------------------------------------------
def square_png(data: bytes, size: int) -> bytes | None:
    """Encoded image -> PNG of a size x size RGB square; None when the bytes do not decode."""
    try:
        image = decode_image(data, 3)
    except ImageDecodeError:
        return None
    return encode_png(to_square(image, size))


def _square_pngs(items: list[bytes], size: int) -> list[bytes | None]:
    return [square_png(d, size) for d in items]


# -- the import -----------------------------------------------------------------------------------
@IMPORTERS.register("fashion-product-images")
def import_fashion_product_images(
    source: Path | None,
    dest: Path,
    selection: str | AttributeSelection = "apparel-6x6",
    size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    workers: int = 2,
    batch_size: int = 1024,
) -> Catalogue:
    """Source folder (Parquet copy or Kaggle's) -> catalogue of size x size RGB PNGs.

    The schema comes from the selection over the whole source, so an import with `limit` (the
    first `limit` selected products, for tests and quick runs) has the full import's schema.
    Images are decoded by `workers` threads (OpenCV releases the GIL), a batch at a time, and
    written as they come, so memory stays bounded. The manifest's `source` counts every skip.
    """
    if source is None:
        raise ValueError("a source folder is needed: the Parquet copy, or Kaggle's folder with styles.csv + images/")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    selection = resolve_selection(selection)
    src = Source.open(source)
    selected = select_attributes(src.attributes, selection)
    table = selected.table if limit is None else selected.table.slice(0, limit)
    decoder = _SquareDecoder(src, table, ["split", *selected.schema.names], size, workers, batch_size)
    info: dict[str, Any] = {
        "dataset": "Fashion Product Images (Small), Kaggle paramaggarwal/fashion-product-images-small",
        "layout": src.layout, "path": str(Path(source).resolve()), "selection": selection.to_dict(),
        "image_size": size, "limit": limit,
        "split_rule": SPLIT_RULE,
        "images_without_row": src.images_without_row, "selection_report": selected.report,
    }

    def batches() -> Iterator[pa.RecordBatch]:
        with progress_bar(total=len(decoder.rows), desc=f"fashion-product-images {selection.name}", unit="img",
                          disable=not progress, dynamic_ncols=True) as bar:
            yield from decoder.batches(bar)
        # write_catalogue writes the manifest after it has consumed every batch, so these land in it
        info["missing_images"] = {"count": len(decoder.missing), "ids": decoder.missing[:MAX_LISTED_IDS]}
        info["undecodable_images"] = {"count": len(decoder.undecodable), "ids": decoder.undecodable[:MAX_LISTED_IDS]}

    return write_catalogue(
        dest, f"fashion-product-images-{selection.name}", selected.schema, batches(), image_channels=3, source=info,
    )


class _SquareDecoder:
    """The selected rows' images decoded and squared by a thread pool, as record batches.

    One batch decodes while the previous one is written. Products without an image file go to
    `missing`, images that do not decode to `undecodable`."""

    def __init__(self, src: Source, table: pa.Table, columns: list[str], size: int, workers: int, batch_size: int):
        self.src, self.size, self.workers, self.batch_size = src, size, workers, batch_size
        self.rows = {product_id: i for i, product_id in enumerate(table.column("id").to_pylist())}
        self.columns = {name: table.column(name).to_pylist() for name in columns}
        self.missing: list[str] = list(src.missing_images)
        self.undecodable: list[str] = []

    def batches(self, bar) -> Iterator[pa.RecordBatch]:
        stream = self.src.image_bytes(self.rows)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending = None
            while chunk := list(islice(stream, self.batch_size)):
                ids, datas = [], []
                for product_id, data in chunk:
                    if data is None:
                        self.missing.append(product_id)
                    else:
                        ids.append(product_id)
                        datas.append(data)
                step = -(-len(datas) // (4 * self.workers)) or 1
                parts = [pool.submit(_square_pngs, datas[k : k + step], self.size) for k in range(0, len(datas), step)]
                if pending is not None and (batch := self._finish(*pending)) is not None:
                    yield batch
                pending = (ids, parts)
                bar.update(len(chunk))
            if pending is not None and (batch := self._finish(*pending)) is not None:
                yield batch

    def _finish(self, ids: list[str], parts: list[Future]) -> pa.RecordBatch | None:
        pngs = [png for part in parts for png in part.result()]
        kept = []
        for product_id, png in zip(ids, pngs):
            if png is None:
                self.undecodable.append(product_id)
            else:
                kept.append((self.rows[product_id], product_id, png))
        if not kept:
            return None
        return pa.record_batch({
            "id": pa.array([k[1] for k in kept], pa.string()),
            **{c: pa.array([values[k[0]] for k in kept], pa.string()) for c, values in self.columns.items()},
            "image": pa.array([k[2] for k in kept], pa.binary()),
        })
