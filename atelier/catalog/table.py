"""A shop's own table as a catalogue: CSV, Parquet or JSON Lines; photos as files, bytes or URLs.

Every shop exports its products differently, so nothing here assumes a column name: the caller
names the id column, the image column and the attribute columns, and each attribute column
becomes an attribute group under its own name (`--multi-label tags:|`: that column holds several
values separated by `|`).

Reading. The format comes from the suffix: `.csv` (Python's csv module, UTF-8 with or without a
byte-order mark; quoted fields may hold commas and newlines), `.parquet` (pyarrow), `.jsonl` /
`.ndjson` (one JSON object per line). Every value is trimmed; `NA`, `N/A`, an empty string and
null are missing. Each product needs an id, and no id may appear twice.

Selection. By default every attribute column is taken as is and no product is dropped: a
missing value becomes `other`. A TOML file changes that per group, with the rules of
`atelier/catalog/selection.py` (the ones Fashion Product Images' presets use):

    other = "other"              # what missing and rare values become (default "other")
    [where]                      # keep only the rows whose column holds one of these values
    category = ["Apparel", "Footwear"]
    [groups.colour]              # a group of --attributes; groups not named keep the defaults
    top = 10                     # keep at most the 10 commonest values...
    min_count = 5                # ...that have at least 5 products
    rare = "other"               # the other values: "other", or "drop" the product
    missing = "drop"             # products without a value: "other", or "drop" them

The schema is counted over the selected rows before any image is read, so it does not depend
on which photos a flaky server happened to deliver, nor on `limit`.

Images. A value of the image column is a path relative to `image_root` (default: the table's
folder), an absolute path, a `file://` URI, encoded bytes (a binary Parquet column, or a
`data:` URI), or an http(s) URL (`atelier/catalog/fetch.py`: a thread pool, a timeout, retries,
a cache on disk). Photos are made white-padded squares and stored as PNG, as every importer
does (`fashion_product_images.square_png`). Where the value is an http(s) URL, the catalogue's
`image_uri` column keeps it (the photo's public address, for clients to show; a URL naming a
user or password is left out); other values leave it null, as a local path would tell clients
about the server's file system. A product whose photo is missing, unreachable or
undecodable is skipped and named with its reason in the manifest's `source.skipped`; if more
than `max_failures` of the products are skipped, the import stops with the reasons and
publishes nothing (a table whose photo paths are all wrong should not become a catalogue).

Splits: a column named `split` (train / test) is kept; without one, `split_of` (a hash of the
id, 10% test) decides, as for Fashion Product Images.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import tomllib
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from atelier.catalog.catalogue import IMAGE_URI, Catalogue, write_catalogue
from atelier.catalog.fashion_product_images import SPLIT_RULE, split_of, square_png
from atelier.catalog.fetch import FetchError, ImageFetcher, is_url
from atelier.catalog.importers import IMPORTERS
from atelier.catalog.selection import AttributeSelection, GroupSelection, select_attributes
from atelier.progress import progress_bar

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MISSING_TOKENS = frozenset({"", "NA", "N/A"})
RESERVED = ("id", "split", "image", "image_uri")  # the catalogue's own columns: no attribute group may take their names
SPLITS = ("train", "test")
DEFAULT_RULES = {"top": None, "min_count": 1, "rare": "other", "missing": "other"}
CHUNK_ROWS = 256  # products whose photos are read at once: bounded memory, a full thread pool
MAX_LISTED = 100  # skipped products named in the manifest (the counts are always complete)
MAX_FIELD = 64 * 1024 * 1024  # a CSV field may hold a data: URI photo, far over csv's 128 KiB default


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class SourceTable:
    """A table's columns (name -> one cleaned value per row) and where each row came from."""

    path: Path
    format: str
    columns: dict[str, list]
    locations: list[str]  # "row 3 (line 5)": for messages that send the reader to the file

    @property
    def names(self) -> list[str]:
        return list(self.columns)


def read_table(path: Path, binary_column: str | None = None) -> SourceTable:
    """Read a .csv / .parquet / .jsonl / .ndjson file; values trimmed, missing tokens -> None.

    Bytes are kept in `binary_column` (the photos) and read as UTF-8 text elsewhere.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown table format {path.suffix!r}; allowed: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        names, columns, lines = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}[fmt](path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    if len(set(names)) != len(names):
        repeated = sorted(n for n, k in Counter(names).items() if k > 1)
        raise ValueError(f"{path}: the header repeats column(s) {', '.join(repeated)}")
    cleaned = {n: [_clean(v, n == binary_column) for v in values] for n, values in zip(names, columns)}
    rows = len(columns[0]) if columns else 0
    locations = [f"row {i + 1}" + (f" (line {lines[i]})" if lines else "") for i in range(rows)]
    return SourceTable(path, fmt, cleaned, locations)


def _clean(value: Any, keep_bytes: bool) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        if keep_bytes:
            return bytes(value) or None
        value = bytes(value).decode("utf-8", errors="replace")
    if value is None:
        return None
    text = str(value).strip()  # numbers (Parquet, JSON) become their text, like a CSV's
    return None if text in MISSING_TOKENS else text


def _read_csv(path: Path) -> tuple[list[str], list[list], list[int]]:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header row naming the columns")
        names = [h.strip() for h in header]
        records, lines, start = [], [], reader.line_num + 1
        for record in reader:
            if any(field.strip() for field in record):  # blank lines and rows of bare commas say nothing
                if len(record) != len(names):
                    raise ValueError(f"{path}: line {start} has {len(record)} fields, the header {len(names)}")
                records.append(record)
                lines.append(start)
            start = reader.line_num + 1
    return names, [[r[k] for r in records] for k in range(len(names))], lines


def _read_parquet(path: Path) -> tuple[list[str], list[list], list[int]]:
    table = pq.read_table(path)
    return table.column_names, [c.to_pylist() for c in table.columns], []


def _read_jsonl(path: Path) -> tuple[list[str], list[list], list[int]]:
    objects, lines, names = [], [], {}
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {number} holds a {type(obj).__name__}; expected one JSON object per line")
            names.update(dict.fromkeys(obj))
            objects.append(obj)
            lines.append(number)
    return list(names), [[o.get(n) for o in objects] for n in names], lines


# -- selection --------------------------------------------------------------------------------------
def load_rules(selection: str | Path | Mapping | None) -> tuple[str, dict[str, Any]]:
    """A selection TOML file (or its parsed contents) -> (selection name, rules)."""
    if selection is None:
        return "default", {}
    if isinstance(selection, Mapping):
        return "custom", dict(selection)
    path = Path(selection)
    if not path.is_file():
        raise FileNotFoundError(f"selection file {path} does not exist (expected a TOML file; see atelier/catalog/table.py)")
    try:
        with open(path, "rb") as f:
            return path.stem, tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None


def table_selection(
    name: str, rules: Mapping[str, Any], attributes: list[str], multi_label: Mapping[str, str],
) -> AttributeSelection:
    """The selection for these attribute columns: each as is unless `rules` says otherwise."""
    unknown = sorted(set(rules) - {"other", "where", "groups"})
    if unknown:
        raise ValueError(f"selection {name!r}: unknown key(s) {', '.join(unknown)}; allowed: other, where, groups")
    groups_rules, where = rules.get("groups", {}), rules.get("where", {})
    if not isinstance(groups_rules, Mapping) or not all(isinstance(r, Mapping) for r in groups_rules.values()):
        raise ValueError(f"selection {name!r}: groups must be tables, e.g. [groups.colour]")
    strangers = [g for g in groups_rules if g not in attributes]
    if strangers:
        raise ValueError(
            f"selection {name!r}: group(s) {', '.join(strangers)} not among the attributes ({', '.join(attributes)})"
        )
    scalar = (str, int)
    if not isinstance(where, Mapping) or not all(
        isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v)) for v in where.values()
    ):
        raise ValueError(f"selection {name!r}: where must be a table of column = [values], e.g. category = [\"Tops\"]")
    other = rules.get("other", "other")
    if not isinstance(other, str) or not other.strip():
        raise ValueError(f"selection {name!r}: other must be a non-empty string, got {other!r}")
    groups = []
    for column in attributes:
        given = dict(groups_rules.get(column, {}))
        unknown = sorted(set(given) - set(DEFAULT_RULES))
        if unknown:
            raise ValueError(
                f"selection {name!r}: group {column!r} has unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(DEFAULT_RULES)}"
            )
        for key in ("top", "min_count"):
            if key in given and (not isinstance(given[key], int) or isinstance(given[key], bool)):
                raise ValueError(f"selection {name!r}: group {column!r}: {key} must be a whole number, got {given[key]!r}")
        groups.append(GroupSelection(column, column, separator=multi_label.get(column), **{**DEFAULT_RULES, **given}))
    return AttributeSelection(name, tuple(groups), where=where, other=other)


# -- images -----------------------------------------------------------------------------------------
class ImageReader:
    """An image column's value -> a size x size PNG, or the reason there is none."""

    def __init__(self, root: Path, fetcher: ImageFetcher, size: int):
        self.root, self.fetcher, self.size = root, fetcher, size

    def read(self, value: str | bytes | None) -> tuple[bytes | None, str | None]:
        """(encoded bytes, None) or (None, reason)."""
        if value is None:
            return None, "no image"
        if isinstance(value, bytes):
            return value, None
        if is_url(value):
            try:
                return self.fetcher.fetch(value), None
            except FetchError as error:
                return None, error.reason
        if value.startswith("data:"):
            return _data_uri(value)
        path = _local_path(value)
        if path is None:
            return None, "bad file uri"
        try:
            return (self.root / path).read_bytes(), None  # an absolute `path` ignores the root
        except FileNotFoundError:
            return None, "missing file"
        except OSError:
            return None, "unreadable file"

    def square(self, value: str | bytes | None) -> tuple[bytes | None, str | None]:
        data, reason = self.read(value)
        if data is None:
            return None, reason
        png = square_png(data, self.size)
        return (png, None) if png is not None else (None, "undecodable")


def _local_path(value: str) -> Path | None:
    if not value.lower().startswith("file:"):
        return Path(value)
    uri = urllib.parse.urlparse(value)
    if uri.netloc not in ("", "localhost"):
        return None  # another machine's file
    return Path(urllib.request.url2pathname(uri.path))


def _data_uri(value: str) -> tuple[bytes | None, str | None]:
    header, comma, payload = value[5:].partition(",")
    if not comma:
        return None, "bad data uri"
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload), None
    try:
        return base64.b64decode("".join(payload.split()), validate=True), None
    except binascii.Error:
        return None, "bad data uri"


def public_uri(value: str | bytes | None) -> str | None:
    """An image column's value as the catalogue's `image_uri`: an http(s) URL without user or
    password, else None (file paths, file: and data: URIs and bytes are not addresses a client can use)."""
    if not isinstance(value, str) or not is_url(value):
        return None
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return None
    return None if parts.username is not None or parts.password is not None or not parts.hostname else value


class ProductImages:
    """The selected products with their photos, read and squared by a thread pool, as batches.

    A product without a usable photo is left out and counted; once more than `max_failures`
    of all products are, the batches stop with a ValueError, before anything is published.
    """

    def __init__(self, table: pa.Table, images: list, reader: ImageReader, workers: int, max_failures: float):
        self.table, self.images, self.reader = table, images, reader
        self.workers, self.max_failures = workers, max_failures
        self.skipped: list[tuple[str, str]] = []

    def batches(self, bar) -> Iterator[pa.Table]:
        chunk = max(CHUNK_ROWS, 4 * self.workers)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, self.table.num_rows, chunk):
                part = self.table.slice(start, chunk)
                results = list(pool.map(self.reader.square, self.images[start : start + chunk]))
                ids = part.column("id").to_pylist()
                self.skipped += [(ids[k], reason) for k, (png, reason) in enumerate(results) if png is None]
                self._check(start + part.num_rows)
                bar.update(part.num_rows)
                kept = [k for k, (png, _) in enumerate(results) if png is not None]
                if kept:
                    uris = [public_uri(self.images[start + k]) for k in kept]
                    yield (part.take(kept).append_column("image", pa.array([results[k][0] for k in kept], pa.binary()))
                           .append_column(IMAGE_URI, pa.array(uris, pa.string())))

    def _check(self, read: int) -> None:
        total = self.table.num_rows
        if len(self.skipped) <= self.max_failures * total:
            return
        report = self.report()
        reasons = ", ".join(f"{n} {reason}" for reason, n in report["by_reason"].items())
        examples = ", ".join(f"{i} ({reason})" for i, reason in self.skipped[:5])
        raise ValueError(
            f"{len(self.skipped)} of the {total} products have no usable image (after reading {read}): {reasons}; "
            f"more than max_failures={self.max_failures:g} allows; e.g. {examples}. Nothing was published"
        )

    def report(self) -> dict[str, Any]:
        by_reason = Counter(reason for _, reason in self.skipped)
        return {
            "count": len(self.skipped),
            "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            "items": [{"id": i, "reason": reason} for i, reason in self.skipped[:MAX_LISTED]],
        }


# -- the import -------------------------------------------------------------------------------------
@IMPORTERS.register("table")
def import_table(
    source: Path | None,
    dest: Path,
    id_column: str,
    image_column: str,
    attributes: list[str],
    multi_label: Mapping[str, str] | None = None,
    image_root: Path | None = None,
    selection: str | Path | Mapping | None = None,
    size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    fetch_workers: int = 8,
    fetch_timeout: float = 10.0,
    fetch_retries: int = 2,
    image_cache: Path | None = None,
    max_failures: float = 0.05,
) -> Catalogue:
    """A CSV / Parquet / JSON Lines file -> catalogue of size x size RGB PNGs (see the module)."""
    attributes, multi_label = list(attributes), dict(multi_label or {})
    _check_options(source, attributes, multi_label, size, limit, fetch_workers, max_failures)
    fetcher = ImageFetcher(image_cache, timeout=fetch_timeout, retries=fetch_retries)
    name, rules = load_rules(selection)
    chosen = table_selection(name, rules, attributes, multi_label)
    table = read_table(Path(source), binary_column=image_column)
    _check_columns(table, [id_column, image_column, *attributes, *chosen.where])
    ids = _ids(table, id_column)
    rows = pa.table({**{c: pa.array(table.columns[c], pa.string()) for c in chosen.source_columns},
                     "id": pa.array(ids, pa.string())})  # "id" last: the products' ids, whatever the file's columns
    selected = select_attributes(rows, chosen, _split_rule(table, ids))
    products = selected.table if limit is None else selected.table.slice(0, limit)
    image_of = dict(zip(ids, table.columns[image_column]))
    root = Path(image_root).expanduser().resolve() if image_root is not None else table.path.resolve().parent
    images = ProductImages(products, [image_of[i] for i in products.column("id").to_pylist()],
                           ImageReader(root, fetcher, size), fetch_workers, max_failures)
    info: dict[str, Any] = {
        "dataset": "table", "path": str(table.path.resolve()), "format": table.format, "id_column": id_column,
        "image_column": image_column, "attributes": attributes, "multi_label": multi_label, "image_root": str(root),
        "selection": chosen.to_dict(), "image_size": size, "limit": limit, "max_failures": max_failures,
        "split_rule": "the table's split column" if "split" in table.columns else SPLIT_RULE,
        "fetch": {"workers": fetch_workers, "timeout": fetch_timeout, "retries": fetch_retries,
                  "cache": str(fetcher.cache_dir)},
        "selection_report": selected.report,
    }

    def batches() -> Iterator[pa.Table]:
        with progress_bar(total=products.num_rows, desc=f"table {table.path.name}", unit="img",
                          disable=not progress) as bar:
            yield from images.batches(bar)
        info["skipped"] = images.report()  # write_catalogue writes the manifest after the last batch

    return write_catalogue(dest, f"table-{table.path.stem}", selected.schema, batches(), image_channels=3, source=info,
                           image_uri=True)


def _check_options(source: Path | None, attributes: list[str], multi_label: dict[str, str], size: int,
                   limit: int | None, fetch_workers: int, max_failures: float) -> None:
    if source is None:
        raise ValueError(f"a source file is needed: a table ({', '.join(FORMATS)}) with one row per product")
    if not attributes:
        raise ValueError("name at least one attribute column (attributes, e.g. --attributes colour,category)")
    reserved = [a for a in attributes if a in RESERVED]
    if reserved:
        raise ValueError(f"attribute column(s) {reserved} would clash with the catalogue's own columns {', '.join(RESERVED)}")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes repeat a column: {attributes}")
    strangers = [c for c in multi_label if c not in attributes]
    if strangers:
        raise ValueError(f"multi-label column(s) {strangers} are not among the attributes {attributes}")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if fetch_workers < 1:
        raise ValueError(f"fetch_workers must be >= 1, got {fetch_workers}")
    if not 0 <= max_failures <= 1:
        raise ValueError(f"max_failures is a fraction of the products, from 0 to 1; got {max_failures}")


def _check_columns(table: SourceTable, needed: list[str]) -> None:
    absent = [c for c in dict.fromkeys(needed) if c not in table.columns]
    if absent:
        raise ValueError(f"{table.path} has no column(s) {', '.join(absent)}; its columns: {', '.join(table.names)}")


def _ids(table: SourceTable, id_column: str) -> list[str]:
    ids = table.columns[id_column]
    for i, product_id in enumerate(ids):
        if product_id is None:
            raise ValueError(f"{table.path}: {table.locations[i]} has no id (column {id_column!r} is empty or NA)")
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
        raise ValueError(
            f"{table.path}: id(s) appearing more than once in column {id_column!r}: {', '.join(repeated[:10])}{more}"
        )
    return ids


def _split_rule(table: SourceTable, ids: list[str]) -> Callable[[str], str]:
    """The table's own split column if it has one, else the hash of the id."""
    if "split" not in table.columns:
        return split_of
    splits = {i: None if s is None else s.lower() for i, s in zip(ids, table.columns["split"])}
    wrong = [(i, s) for i, s in splits.items() if s not in SPLITS]
    if wrong:
        raise ValueError(
            f"{table.path}: column 'split' holds {wrong[0][1]!r} for id {wrong[0][0]} ({len(wrong)} such rows); allowed: "
            f"{', '.join(SPLITS)} (without a split column, a hash of the id decides)"
        )
    return splits.__getitem__
