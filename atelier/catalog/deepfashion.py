"""DeepFashion (Category and Attribute Prediction benchmark): parse its annotations, import it.

DeepFashion is not redistributable: a user downloads the benchmark from its authors and names
the folder that holds `Anno/`, `Eval/` and `img/`. Every annotation file has the same frame:
a line with the row count, a line of column names, then one row per line, columns separated by
runs of spaces. The parsers check that frame (the count included) and each value's range, and
name the file and line of anything that does not fit, so a truncated download fails loudly
instead of importing a silently smaller catalogue.

The seed reduced the 1,000 attributes to the groups its generators condition on: `category`
(single-label), and the multi-label `shape`, `texture`, `fabric` and `part`; `style` (type 5)
was dropped. We keep per group the attributes common enough to learn (`build_schema`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from atelier.catalog.catalogue import Catalogue, arrow_schema, write_catalogue
from atelier.catalog.grabcut import crop_centre_resize, segment_garment
from atelier.catalog.images import ImageDecodeError, decode_image, encode_png
from atelier.catalog.importers import IMPORTERS
from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.progress import progress_bar

log = logging.getLogger(__name__)

CATEGORY_TYPES = {1: "upper-body", 2: "lower-body", 3: "full-body"}
ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}
LANDMARKS_PER_CLOTHES_TYPE = {1: 6, 2: 4, 3: 8}  # upper-body, lower-body, full-body
LANDMARK_VISIBILITY = {0: "visible", 1: "occluded", 2: "truncated"}
MAX_LANDMARKS = max(LANDMARKS_PER_CLOTHES_TYPE.values())
SPLITS = ("train", "val", "test")
GROUPS = ("shape", "texture", "fabric", "part")  # schema order after `category`; style dropped
ATTRIBUTE_LABELS = {-1: False, 0: False, 1: True}  # -1 absent (the published files), 0 absent too

DEFAULT_MIN_COUNT = 100
DEFAULT_TOP_N = 100
BATCH_ROWS = 256

FILES = {  # what load_annotations reads, relative to the benchmark folder
    "category_cloth": "Anno/list_category_cloth.txt",
    "category_img": "Anno/list_category_img.txt",
    "attr_cloth": "Anno/list_attr_cloth.txt",
    "attr_img": "Anno/list_attr_img.txt",
    "bbox": "Anno/list_bbox.txt",
    "landmarks": "Anno/list_landmarks.txt",
    "eval_partition": "Eval/list_eval_partition.txt",
}


class AnnotationFormatError(ValueError):
    """An annotation file does not follow the published format; the message names file and line."""


@dataclass(frozen=True)
class Category:
    name: str
    type: int  # CATEGORY_TYPES

    @property
    def type_name(self) -> str:
        return CATEGORY_TYPES[self.type]


@dataclass(frozen=True)
class Attribute:
    name: str  # may hold spaces: "peter pan collar"
    type: int  # ATTRIBUTE_TYPES

    @property
    def group(self) -> str:
        return ATTRIBUTE_TYPES[self.type]


@dataclass(frozen=True)
class Landmarks:
    clothes_type: int  # CATEGORY_TYPES
    variation_type: int  # pose / zoom-in, 1..5 in the benchmark
    points: np.ndarray  # int (K, 3): visibility, x, y; K from LANDMARKS_PER_CLOTHES_TYPE


@dataclass(frozen=True)
class AttributeLabels:
    """list_attr_img.txt: image names and a bool (images, attributes) matrix of presence."""

    image_names: tuple[str, ...]
    present: np.ndarray
    row: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.row:
            object.__setattr__(self, "row", {name: i for i, name in enumerate(self.image_names)})

    def of(self, image_name: str) -> np.ndarray:
        return self.present[self.row[image_name]]


@dataclass(frozen=True)
class Annotations:
    """Everything in `Anno/` and `Eval/`, checked to describe the same images."""

    categories: tuple[Category, ...]
    attributes: tuple[Attribute, ...]
    image_category: dict[str, int]  # image name -> 1-based category label, in file order
    attribute_labels: AttributeLabels
    bboxes: dict[str, tuple[int, int, int, int]]
    landmarks: dict[str, Landmarks]
    partition: dict[str, str]

    @property
    def image_names(self) -> list[str]:
        return list(self.image_category)

    def category_of(self, image_name: str) -> Category:
        return self.categories[self.image_category[image_name] - 1]


# -- the published files ------------------------------------------------------------------------
def _table(path: Path, first_column: str) -> tuple[int, Iterator[tuple[int, str]]]:
    """(declared row count, iterator of (line number, stripped row)); checks count and header.

    The iterator raises at its end when the rows it gave do not match the declared count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepFashion annotation file not found: {path}")
    handle = open(path, encoding="utf-8")
    try:
        first = handle.readline().strip()
        try:
            count = int(first)
        except ValueError:
            raise AnnotationFormatError(f"{path}:1: expected the row count, got {first[:40]!r}") from None
        header = handle.readline().split()
        if not header or header[0] != first_column:
            raise AnnotationFormatError(
                f"{path}:2: expected a header line starting with {first_column!r}, got {' '.join(header)[:80]!r}"
            )
    except BaseException:
        handle.close()
        raise

    def rows() -> Iterator[tuple[int, str]]:
        n = 0
        with handle:
            for number, line in enumerate(handle, start=3):
                line = line.strip()
                if line:
                    n += 1
                    yield number, line
        if n != count:
            raise AnnotationFormatError(f"{path}: the first line says {count} rows, the file holds {n}")

    return count, rows()


def _rows(path: Path, first_column: str) -> Iterator[tuple[int, str]]:
    return _table(path, first_column)[1]


def _int(path: Path, number: int, text: str, what: str, allowed: dict[int, str] | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise AnnotationFormatError(f"{path}:{number}: {what} {text!r} is not an integer") from None
    if allowed is not None and value not in allowed:
        shown = ", ".join(f"{k} ({v})" for k, v in allowed.items())
        raise AnnotationFormatError(f"{path}:{number}: {what} {value} not allowed; allowed: {shown}")
    return value


def _split_name_type(path: Path, number: int, line: str) -> tuple[str, str]:
    # Names may hold spaces ("peter pan collar"): the type is the last token.
    parts = line.rsplit(None, 1)
    if len(parts) != 2:
        raise AnnotationFormatError(f"{path}:{number}: expected a name and a type, got {line[:80]!r}")
    return parts[0], parts[1]


def _unique(path: Path, number: int, name: str, seen: dict) -> None:
    if name in seen:
        raise AnnotationFormatError(f"{path}:{number}: image {name!r} is listed twice")


def read_category_cloth(path: Path) -> list[Category]:
    """list_category_cloth.txt: category_name category_type (1 upper, 2 lower, 3 full body)."""
    result = []
    for number, line in _rows(path, "category_name"):
        name, kind = _split_name_type(path, number, line)
        result.append(Category(name, _int(path, number, kind, "category_type", CATEGORY_TYPES)))
    return result


def read_category_img(path: Path) -> dict[str, int]:
    """list_category_img.txt: image_name category_label (1-based into list_category_cloth)."""
    result: dict[str, int] = {}
    for number, line in _rows(path, "image_name"):
        parts = line.split()
        if len(parts) != 2:
            raise AnnotationFormatError(f"{path}:{number}: expected image_name category_label, got {line[:80]!r}")
        _unique(path, number, parts[0], result)
        result[parts[0]] = _int(path, number, parts[1], "category_label")
    return result


def read_attr_cloth(path: Path) -> list[Attribute]:
    """list_attr_cloth.txt: attribute_name (spaces allowed) attribute_type (1 texture .. 5 style)."""
    result = []
    for number, line in _rows(path, "attribute_name"):
        name, kind = _split_name_type(path, number, line)
        result.append(Attribute(name, _int(path, number, kind, "attribute_type", ATTRIBUTE_TYPES)))
    return result


def read_attr_img(path: Path, n_attributes: int | None = None) -> AttributeLabels:
    """list_attr_img.txt: image_name then one label per attribute (-1 or 0 absent, 1 present).

    Streamed and parsed by NumPy row by row: the real file is ~290k rows of 1,000 labels.
    """
    count, rows = _table(path, "image_name")
    names: list[str] = []
    present: np.ndarray | None = None
    with warnings.catch_warnings():
        # NumPy warns (rather than raises) on text it cannot parse; we want the row's number.
        warnings.simplefilter("error", DeprecationWarning)
        for number, line in rows:
            parts = line.split(None, 1)
            try:
                labels = np.fromstring(parts[1] if len(parts) == 2 else "", dtype=np.int16, sep=" ")
            except (ValueError, DeprecationWarning):
                raise AnnotationFormatError(f"{path}:{number}: attribute labels must be integers -1, 0 or 1") from None
            if n_attributes is None:
                n_attributes = len(labels)
            if len(labels) != n_attributes or not n_attributes:
                raise AnnotationFormatError(
                    f"{path}:{number}: {len(labels)} attribute labels, expected {n_attributes} (one per attribute)"
                )
            if labels.min() < -1 or labels.max() > 1:  # cheaper than np.isin on ~290k rows
                bad = sorted(set(labels.tolist()) - set(ATTRIBUTE_LABELS))
                raise AnnotationFormatError(f"{path}:{number}: attribute labels {bad} not allowed; allowed: -1, 0, 1")
            if present is None:
                present = np.zeros((count, n_attributes), dtype=bool)
            if len(names) < count:
                present[len(names)] = labels == 1
            names.append(parts[0])
    if present is None:
        present = np.zeros((0, n_attributes or 0), dtype=bool)
    result = AttributeLabels(tuple(names), present)
    if len(result.row) != len(names):
        twice = next(n for i, n in enumerate(names) if result.row[n] != i)
        raise AnnotationFormatError(f"{path}: image {twice!r} is listed twice")
    return result


def read_bbox(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """list_bbox.txt: image_name x_1 y_1 x_2 y_2 (pixels of the image in img/)."""
    result: dict[str, tuple[int, int, int, int]] = {}
    for number, line in _rows(path, "image_name"):
        parts = line.split()
        if len(parts) != 5:
            raise AnnotationFormatError(f"{path}:{number}: expected image_name x_1 y_1 x_2 y_2, got {line[:80]!r}")
        x1, y1, x2, y2 = (_int(path, number, v, c) for v, c in zip(parts[1:], ("x_1", "y_1", "x_2", "y_2")))
        if x2 <= x1 or y2 <= y1 or min(x1, y1) < 0:
            raise AnnotationFormatError(f"{path}:{number}: bounding box {(x1, y1, x2, y2)} is empty or negative")
        _unique(path, number, parts[0], result)
        result[parts[0]] = (x1, y1, x2, y2)
    return result


def read_landmarks(path: Path) -> dict[str, Landmarks]:
    """list_landmarks.txt: image_name clothes_type variation_type, then (visibility x y) per landmark.

    A row holds as many triples as its clothes type has landmarks (6 upper, 4 lower, 8 full
    body); trailing all-zero triples up to 8 are accepted as padding.
    """
    result: dict[str, Landmarks] = {}
    for number, line in _rows(path, "image_name"):
        parts = line.split()
        if len(parts) < 3:
            raise AnnotationFormatError(f"{path}:{number}: expected image_name clothes_type variation_type ..., got {line[:80]!r}")
        clothes = _int(path, number, parts[1], "clothes_type", CATEGORY_TYPES)
        variation = _int(path, number, parts[2], "variation_type")
        k = LANDMARKS_PER_CLOTHES_TYPE[clothes]
        values = [_int(path, number, v, "landmark value") for v in parts[3:]]
        padded = len(values) == 3 * MAX_LANDMARKS and not any(values[3 * k :])
        if len(values) != 3 * k and not padded:
            raise AnnotationFormatError(
                f"{path}:{number}: clothes_type {clothes} has {k} landmarks (visibility x y each, {3 * k} values), "
                f"got {len(values)} values"
            )
        points = np.array(values[: 3 * k], dtype=np.int32).reshape(k, 3)
        bad = sorted(set(points[:, 0].tolist()) - set(LANDMARK_VISIBILITY))
        if bad:
            raise AnnotationFormatError(f"{path}:{number}: landmark visibility {bad} not allowed; allowed: 0 visible, 1 occluded, 2 truncated")
        _unique(path, number, parts[0], result)
        result[parts[0]] = Landmarks(clothes, variation, points)
    return result


def read_eval_partition(path: Path) -> dict[str, str]:
    """Eval/list_eval_partition.txt: image_name evaluation_status (train, val or test)."""
    result: dict[str, str] = {}
    for number, line in _rows(path, "image_name"):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in SPLITS:
            raise AnnotationFormatError(
                f"{path}:{number}: expected image_name evaluation_status ({', '.join(SPLITS)}), got {line[:80]!r}"
            )
        _unique(path, number, parts[0], result)
        result[parts[0]] = parts[1]
    return result


def load_annotations(root: Path) -> Annotations:
    """Read all of `root/Anno` and `root/Eval`; every file must describe the same images."""
    root = Path(root)
    paths = {key: root / rel for key, rel in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"not a DeepFashion Category and Attribute Prediction folder (expected Anno/, Eval/, img/): missing {', '.join(missing)}"
        )
    categories = read_category_cloth(paths["category_cloth"])
    attributes = read_attr_cloth(paths["attr_cloth"])
    image_category = read_category_img(paths["category_img"])
    bad = next((n for n, label in image_category.items() if not 1 <= label <= len(categories)), None)
    if bad is not None:
        raise AnnotationFormatError(
            f"{paths['category_img']}: image {bad!r} has category_label {image_category[bad]}; "
            f"allowed: 1..{len(categories)} (the rows of {FILES['category_cloth']})"
        )
    annotations = Annotations(
        categories=tuple(categories),
        attributes=tuple(attributes),
        image_category=image_category,
        attribute_labels=read_attr_img(paths["attr_img"], len(attributes)),
        bboxes=read_bbox(paths["bbox"]),
        landmarks=read_landmarks(paths["landmarks"]),
        partition=read_eval_partition(paths["eval_partition"]),
    )
    images = set(image_category)
    for key, listed in (
        ("attr_img", annotations.attribute_labels.row), ("bbox", annotations.bboxes),
        ("landmarks", annotations.landmarks), ("eval_partition", annotations.partition),
    ):
        if set(listed) != images:
            lacking = sorted(images - set(listed))[:3]
            extra = sorted(set(listed) - images)[:3]
            raise AnnotationFormatError(
                f"{paths[key]} and {paths['category_img']} list different images"
                + (f"; not in the first: {lacking}" if lacking else "")
                + (f"; not in the second: {extra}" if extra else "")
            )
    return annotations


# -- the seed's vocabulary ------------------------------------------------------------------------
def _columns(annotations: Annotations, group: str) -> dict[str, list[int]]:
    """Attribute name -> its columns in list_attr_img.txt, for one group, in file order.

    A name listed twice within a group is one value, present when any of its columns is.
    """
    columns: dict[str, list[int]] = {}
    for i, attribute in enumerate(annotations.attributes):
        if attribute.group == group:
            columns.setdefault(attribute.name, []).append(i)
    return columns


def group_columns(annotations: Annotations, schema: AttributeSchema) -> dict[str, list[tuple[str, list[int]]]]:
    """Per multi-label group of `schema`: (value, the attribute columns that mean it)."""
    result = {}
    for group in schema.groups:
        if group.multi_label:
            columns = _columns(annotations, group.name)
            result[group.name] = [(value, columns[value]) for value in group.values]
    return result


def build_schema(
    annotations: Annotations,
    image_names: list[str] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    top_n: int | None = DEFAULT_TOP_N,
    all_categories: bool = False,
) -> AttributeSchema:
    """`category` + the multi-label `shape`, `texture`, `fabric`, `part` (style dropped).

    Counted over `image_names` (default: all): per group, the attributes present in at least
    `min_count` images, at most the `top_n` most frequent of them (None: no cap), in file
    order. Defaults (100, 100) give at most 400 attribute values plus the 50 categories, the
    size of the seed's 486-value vocabulary, each value seen often enough to be learned.
    `category` holds the categories the images have, or all 50 with `all_categories`.
    """
    names = annotations.image_names if image_names is None else list(image_names)
    if not names:
        raise ValueError("no images to build the DeepFashion schema from")
    if min_count < 1 or (top_n is not None and top_n < 1):
        raise ValueError(f"min_count and top_n must be at least 1, got {min_count} and {top_n}")
    labels = annotations.attribute_labels
    present = labels.present[[labels.row[n] for n in names]]
    if all_categories:
        categories = [c.name for c in annotations.categories]
    else:
        used = {annotations.image_category[n] for n in names}
        categories = [c.name for i, c in enumerate(annotations.categories, start=1) if i in used]
    groups = [AttributeGroup("category", tuple(dict.fromkeys(categories)))]
    for group in GROUPS:
        columns = _columns(annotations, group)
        counts = {value: int(present[:, cols].any(axis=1).sum()) for value, cols in columns.items()}
        common = [v for v in columns if counts[v] >= min_count]
        if top_n is not None:
            # the most frequent first, ties in file order; then back to file order
            keep = set(sorted(common, key=lambda v: -counts[v])[:top_n])
            common = [v for v in common if v in keep]
        if not common:
            best = max(counts.values(), default=0)
            raise ValueError(
                f"no {group} attribute is present in {min_count} or more of the {len(names)} images "
                f"(the most frequent is in {best}); lower min_count"
            )
        groups.append(AttributeGroup(group, tuple(common), multi_label=True))
    return AttributeSchema(tuple(groups))


# -- import ----------------------------------------------------------------------------------------
def prepare_image(
    image_rgb: np.ndarray, bbox: tuple[int, int, int, int], landmarks: Landmarks | None, size: int, grabcut: bool = True
) -> np.ndarray:
    """A photo -> the garment on white, centred in a size x size square (uint8, RGB)."""
    if grabcut:
        mask = segment_garment(image_rgb, bbox, None if landmarks is None else landmarks.points)
    else:  # the bounding box only: crop, no background removed
        h, w = image_rgb.shape[:2]
        x1, y1, x2, y2 = bbox
        mask = np.zeros((h, w), dtype=bool)
        mask[max(y1, 0) : min(y2, h), max(x1, 0) : min(x2, w)] = True
        if not mask.any():
            mask[:] = True
    return crop_centre_resize(image_rgb, mask, size)


@IMPORTERS.register("deepfashion")
def import_deepfashion(
    source: Path | None,
    dest: Path,
    size: int = 64,
    limit: int | None = None,
    grabcut: bool = True,
    progress: bool = True,
    min_count: int = DEFAULT_MIN_COUNT,
    top_n: int | None = DEFAULT_TOP_N,
    all_categories: bool = False,
) -> Catalogue:
    """The benchmark folder -> catalogue (id, split, category, shape, texture, fabric, part, image).

    Ids are image names without extension (`img/Sheer_Pleated-Front_Blouse/img_00000001`).
    `limit` takes the first images of list_category_img.txt. Images whose file is missing or
    cannot be decoded are skipped; their count is logged and kept in the manifest's
    `source.skipped_images`. The vocabulary (`build_schema`) is counted over the images whose
    file exists.
    """
    if source is None:
        raise ValueError("a source folder is needed: the DeepFashion benchmark folder holding Anno/, Eval/ and img/")
    root = Path(source)
    annotations = load_annotations(root)
    names = annotations.image_names[:limit] if limit is not None else annotations.image_names
    present = [n for n in names if (root / n).is_file()]
    skipped = {"missing": len(names) - len(present), "undecodable": 0}
    if not present:
        raise FileNotFoundError(f"none of the {len(names)} images listed in {FILES['category_img']} is under {root}")
    schema = build_schema(annotations, present, min_count=min_count, top_n=top_n, all_categories=all_categories)
    columns = group_columns(annotations, schema)
    target = arrow_schema(schema)

    def row_of(name: str) -> dict:
        labels = annotations.attribute_labels.of(name)
        row = {"id": str(PurePosixPath(name).with_suffix("")), "split": annotations.partition[name],
               "category": annotations.category_of(name).name}
        for group, values in columns.items():
            row[group] = [value for value, cols in values if labels[cols].any()]
        return row

    def batches():
        rows: list[dict] = []
        for name in progress_bar(present, desc="deepfashion", unit="img", disable=not progress):
            try:
                image = decode_image((root / name).read_bytes(), 3)
            except (OSError, ImageDecodeError):
                skipped["undecodable"] += 1
                continue
            try:
                square = prepare_image(image, annotations.bboxes[name], annotations.landmarks[name], size, grabcut)
            except ValueError as error:  # a box outside the photo: annotations of other images?
                raise ValueError(f"{root / name}: {error}") from error
            rows.append({**row_of(name), "image": encode_png(square)})
            if len(rows) == BATCH_ROWS:
                yield pa.RecordBatch.from_pylist(rows, schema=target)
                rows = []
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=target)
        if skipped["missing"] or skipped["undecodable"]:
            log.warning("deepfashion: skipped %d missing and %d undecodable images", skipped["missing"], skipped["undecodable"])

    # write_catalogue writes the manifest after the last batch, so `skipped` is final by then.
    source = {
        "dataset": "DeepFashion Category and Attribute Prediction", "root": str(root), "size": size,
        "limit": limit, "grabcut": grabcut, "min_count": min_count, "top_n": top_n,
        "all_categories": all_categories, "skipped_images": skipped,
    }
    return write_catalogue(dest, "deepfashion", schema, batches(), image_channels=3, source=source)
