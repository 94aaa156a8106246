"""An index directory: the FAISS index, the row -> product map, and the manifest naming both.

    index.faiss       FAISS index; row i is product i of products.arrow
    index.ivfdata     optional (`atelier index --on-disk-lists`): an IVF index's inverted lists,
                      FAISS's OnDiskInvertedLists, memory-mapped read-only when served
    products.arrow    id + attribute columns, in index row order (what a search returns), as an
                      uncompressed Arrow IPC file (older versions: products.parquet); also
                      `image_uri` where the catalogue has it (not an attribute: never filtered,
                      never among a product's attributes)
    thumbnails.arrow  optional: one binary column `thumbnail`, row i = index row i, an encoded
                      PNG or JPEG of at most `thumbnail_size` px (manifest), as an Arrow IPC file
    manifest.json     embedder (name, weights hash, input size), dimension, metric, count,
                      schema, catalogue name + fingerprint, index type and the record of its
                      choice (index_choice: budget, bytes, measured recall@10), thumbnail_size
                      (0: no thumbnails), sha256 of each file

Written by `build_index_directory` into the reindex job's staging folder (the writer calls it)
and published by one atomic rename (atelier.indexer.runner.publish_index, atelier.artifacts),
so a reader never sees half an index. Opened memory-mapped: the FAISS file (IO_FLAG_MMAP_IFC),
the products and the thumbnails (Arrow IPC) are read in place, so the pages are the kernel's page cache,
shared between processes serving one version and never copied.

Filtered search (`rows_matching`, then `search(..., rows=)`): a product matches when, for every
filtered group, its value (any of its values, in a multi-label group) is one of those asked; a
product without a value matches only the value MISSING (""). At most EXACT_FILTER_ROWS matching products are scored exactly,
one query at a time; more go through the index's own search with a FAISS ID selector, at the
index's own search parameters. Either way every returned row matches, and a query scored on
its own gives what it gives in any batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from atelier import artifacts
from atelier.catalog.catalogue import IMAGE_URI  # a products column that is not an attribute
from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_choice import IndexOptions, IndexSpec, apply_search_parameters, build_index

KIND = "index"
INDEX_FILE = "index.faiss"
LISTS_FILE = "index.ivfdata"  # on-disk inverted lists; index.faiss names it, found beside it when read
PRODUCTS_FILE = "products.arrow"
THUMBNAILS_FILE = "thumbnails.arrow"
LEGACY_PRODUCTS_FILE = "products.parquet"  # index versions written before products.arrow
METRIC = "inner_product"  # vectors are L2-normalised, so this is cosine similarity
# Up to this many matching products a filtered search scores them all exactly (a 256-d float
# matrix-vector product over 16k rows is about 1 ms here); beyond, the index's own search.
EXACT_FILTER_ROWS = 16_384
MISSING = ""  # as a filter value: products with no value in that group (metadata not known)


def build_index_directory(
    folder: Path,
    vectors: np.ndarray,
    products: pa.Table,
    embedder: dict[str, Any],
    schema: AttributeSchema,
    catalogue: dict[str, Any],
    choice: IndexSpec,
    extra: dict[str, Any] | None = None,
    options: IndexOptions | None = None,
    thumbnails: pa.Array | pa.ChunkedArray | Sequence[bytes] | None = None,
    thumbnail_size: int = 0,
) -> None:
    """Write the index files and manifest into `folder` (a staging folder, see `artifacts.staging`);
    publishing it is the caller's. `choice`: the index type, from `choose_index`; `options`: memory
    budget, recall target, PCA (atelier.indexer.index_choice); `thumbnails`: one encoded image of at
    most `thumbnail_size` px per product row, written as thumbnails.arrow (None: no thumbnails)."""
    if thumbnails is not None and len(thumbnails) != products.num_rows:
        raise ValueError(f"{len(thumbnails)} thumbnails for {products.num_rows} products")
    if thumbnails is not None and thumbnail_size < 1:
        raise ValueError(f"thumbnails need their size, a positive number of px; got {thumbnail_size}")
    if thumbnails is not None and not isinstance(thumbnails, (pa.Array, pa.ChunkedArray)):
        thumbnails = pa.array(list(thumbnails), pa.binary())
    with RowFiles(folder, with_thumbnails=thumbnails is not None) as rows:
        rows.write(products, thumbnails)
    finish_index_directory(folder, vectors, products.num_rows, embedder, schema, catalogue, choice, extra, options,
                           thumbnail_size if thumbnails is not None else 0)


class RowFiles:
    """products.arrow (and thumbnails.arrow) written batch by batch as Arrow IPC files, so a job
    never holds every product's row or thumbnail in memory at once."""

    def __init__(self, folder: Path, with_thumbnails: bool):
        self.folder, self.with_thumbnails = folder, with_thumbnails
        self.rows = 0
        self._products = self._thumbnails = None

    def __enter__(self) -> RowFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, products: pa.Table, thumbnails: pa.Array | pa.ChunkedArray | None = None) -> None:
        if self.with_thumbnails and (thumbnails is None or len(thumbnails) != products.num_rows):
            raise ValueError(f"{0 if thumbnails is None else len(thumbnails)} thumbnails for {products.num_rows} products")
        if self._products is None:
            self._products = _ipc_file(self.folder / PRODUCTS_FILE, products.schema)
            if self.with_thumbnails:
                self._thumbnails = _ipc_file(self.folder / THUMBNAILS_FILE, pa.schema([("thumbnail", pa.binary())]))
        self._products[1].write_table(products)
        if self.with_thumbnails:
            self._thumbnails[1].write_table(pa.table({"thumbnail": thumbnails}))
        self.rows += products.num_rows

    def close(self) -> None:
        for opened in (self._products, self._thumbnails):
            if opened is not None:
                opened[1].close()
                opened[0].close()
        self._products = self._thumbnails = None


def _ipc_file(path: Path, schema: pa.Schema):
    sink = pa.OSFile(str(path), "wb")
    return sink, pa.ipc.new_file(sink, schema)


def finish_index_directory(folder: Path, vectors: np.ndarray, count: int, embedder: dict[str, Any],
                           schema: AttributeSchema, catalogue: dict[str, Any], choice: IndexSpec,
                           extra: dict[str, Any] | None = None, options: IndexOptions | None = None,
                           thumbnail_size: int = 0, scratch: Sequence[Path] = ()) -> None:
    """Build the index over `vectors` (row i: product i of the products file already in `folder`,
    which holds `count` rows) and write index.faiss (and index.ivfdata) and the manifest.
    `scratch`: files in `folder` the build reads (the job's vectors), removed before the manifest."""
    if len(vectors) != count:
        raise ValueError(f"{len(vectors)} vectors for {count} products")
    if len(vectors) == 0:
        raise ValueError("refusing to publish an empty index")
    dimension = int(vectors.shape[1])
    with _quiet_faiss():  # OnDiskInvertedLists prints a line each time its file grows
        built = build_index(vectors, choice, options, lists_file=folder / LISTS_FILE)
    for path in scratch:
        path.unlink()
    faiss.write_index(built.index, str(folder / INDEX_FILE))
    built.record["bytes"] = sum((folder / f).stat().st_size for f in (INDEX_FILE, LISTS_FILE) if (folder / f).is_file())
    artifacts.write_manifest(
        folder, KIND, embedder=embedder, dimension=dimension, metric=METRIC,
        count=count, schema=schema.to_dict(), catalogue=catalogue,
        index_type=built.spec.factory, index_choice=built.record, thumbnail_size=int(thumbnail_size), **(extra or {}),
    )


@contextlib.contextmanager
def _quiet_faiss():
    """FAISS's C++ code prints to the process's stdout (file descriptor 1), which a job's output
    (and a server's) should not carry: send it to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class IndexDirectory:
    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    products: pa.Table
    thumbnail_table: pa.Table | None = None  # thumbnails.arrow, memory-mapped; None: the index has none
    _columns: dict[str, tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> IndexDirectory:
        folder = artifacts.resolve(path)
        manifest = artifacts.read_manifest(folder, KIND, verify=verify)
        if (folder / LISTS_FILE).is_file():  # the lists are memory-mapped by FAISS itself, from beside the index
            with _quiet_faiss():
                index = faiss.read_index(str(folder / INDEX_FILE),
                                         faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
        else:
            index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        apply_search_parameters(index, manifest.get("index_choice", {}).get("search_parameters", {}))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # reconstruct() by row, for the merge's mean similarity
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if isinstance(lists, faiss.OnDiskInvertedLists):
                # its prefetch starts threads on every search: 25x slower per query here, for
                # pages the kernel's read-ahead and page cache already bring
                lists.prefetch_nthread = 0
        if (folder / PRODUCTS_FILE).is_file():
            products = pa.ipc.open_file(pa.memory_map(str(folder / PRODUCTS_FILE))).read_all()  # zero-copy
        else:
            products = pq.read_table(folder / LEGACY_PRODUCTS_FILE)
        if index.ntotal != manifest["count"] or products.num_rows != manifest["count"]:
            raise artifacts.ArtifactError(
                f"{folder}: manifest says {manifest['count']} products, index has {index.ntotal}, map has {products.num_rows}"
            )
        thumbnails = None
        if (folder / THUMBNAILS_FILE).is_file():
            thumbnails = pa.ipc.open_file(pa.memory_map(str(folder / THUMBNAILS_FILE))).read_all()  # zero-copy
            if thumbnails.num_rows != manifest["count"] or thumbnails.column_names != ["thumbnail"]:
                raise artifacts.ArtifactError(
                    f"{folder}: {THUMBNAILS_FILE} has {thumbnails.num_rows} rows of {thumbnails.column_names}; "
                    f"expected {manifest['count']} rows of ['thumbnail']"
                )
        return cls(folder, manifest, index, products, thumbnails)

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def schema(self) -> AttributeSchema:
        return AttributeSchema.from_dict(self.manifest["schema"])

    @property
    def embedder(self) -> dict[str, Any]:
        return self.manifest["embedder"]

    @property
    def has_thumbnails(self) -> bool:
        return self.thumbnail_table is not None

    @property
    def thumbnail_size(self) -> int:
        """The px bound of the thumbnails; 0 for an index without them (older ones, or --thumbnail-size 0)."""
        return int(self.manifest.get("thumbnail_size", 0)) if self.has_thumbnails else 0

    @property
    def has_image_uri(self) -> bool:
        return IMAGE_URI in self.products.column_names

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n_queries, k), best first; rows are -1 where fewer than k exist.
        `rows` (from `rows_matching`): search only among these index rows."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if rows is None:
            return self.index.search(vectors, min(k, len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        found = np.full((len(vectors), k), -1, dtype=np.int64)
        want = min(k, len(rows))
        if want == 0:
            return scores, found
        exact = np.ones(len(vectors), dtype=bool)
        if len(rows) > EXACT_FILTER_ROWS:
            s, f = self.index.search(vectors, want, params=self._selector_parameters(rows))
            scores[:, :want], found[:, :want] = s, f
            exact = (f < 0).any(axis=1)  # an approximate search that came back short: score those exactly
        if exact.any():
            stored = self.vectors(rows)
            for q in np.flatnonzero(exact):
                similarity = stored @ vectors[q]
                best = np.argsort(-similarity, kind="stable")[:want]
                scores[q, :want], found[q, :want] = similarity[best], rows[best]
        return scores, found

    def _selector_parameters(self, rows: np.ndarray) -> faiss.SearchParameters:
        """Search parameters that keep to `rows`, carrying the index's own nprobe / efSearch
        (parameters passed to a search replace the index's, defaults included)."""
        selector = faiss.IDSelectorBatch(rows)
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexPreTransform) else self.index
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
        elif isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=selector)
        params.keep_alive = selector  # the Python wrapper does not own the selector
        if isinstance(self.index, faiss.IndexPreTransform):
            outer = faiss.SearchParametersPreTransform(index_params=params)
            outer.keep_alive = params
            return outer
        return params

    def row_of(self, product_id: str) -> int | None:
        """The index row of a product, None when the index has no product of that id."""
        row = pc.index(self.products.column("id"), pa.scalar(product_id, pa.string())).as_py()
        return None if row < 0 else int(row)

    def rows_matching(self, filters: Mapping[str, Sequence[str]]) -> np.ndarray:
        """Index rows, ascending, whose product has one of the given values in every given group
        (any of its values, in a multi-label group); the value MISSING matches a product with no
        value in that group. Groups must be columns of the products."""
        mask = np.ones(len(self), dtype=bool)
        for group, values in filters.items():
            codes, owners, code_of, missing = self._column_codes(group)
            wanted = [code_of[v] for v in values if v in code_of]
            hit = missing.copy() if MISSING in values else np.zeros(len(self), dtype=bool)
            hit[owners[np.isin(codes, wanted)]] = True
            mask &= hit
        return np.flatnonzero(mask).astype(np.int64)

    def _column_codes(self, group: str) -> tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]:
        """A products column as (value codes, the row each code belongs to, value -> code, rows
        with no value); nulls left out of the codes, lists flattened. Built once per column."""
        if group not in self._columns:
            column = self.products.column(group).combine_chunks()
            rows = len(column)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                owners = pc.list_parent_indices(column).to_numpy().astype(np.int64)
                column = pc.list_flatten(column)
            else:
                owners = np.arange(rows, dtype=np.int64)
            encoded = pc.dictionary_encode(column)
            present = ~np.asarray(pc.is_null(encoded.indices).to_numpy(zero_copy_only=False))
            codes = encoded.indices.to_numpy(zero_copy_only=False)[present].astype(np.int64)
            owners = owners[present]
            code_of = {v: i for i, v in enumerate(encoded.dictionary.to_pylist())}
            missing = np.ones(rows, dtype=bool)  # null, an empty list, or a list of nulls
            missing[owners] = False
            self._columns[group] = (codes, owners, code_of, missing)
        return self._columns[group]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of the given rows (exact for Flat and HNSW,Flat; decoded, so
        approximate, for SQ8 / PQ codes and after PCA)."""
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def product_rows(self, rows: list[int]) -> list[dict[str, Any]]:
        """id + attribute columns of these rows (`image_uri` is not an attribute: `image_uris`)."""
        products = self.products.drop_columns([IMAGE_URI]) if self.has_image_uri else self.products
        return products.take(pa.array(rows, type=pa.int64())).to_pylist()

    def image_uris(self, rows: list[int]) -> list[str | None]:
        """The catalogue's image URI of each row (None where it has none, or keeps no URIs)."""
        if not self.has_image_uri:
            return [None] * len(rows)
        return self.products.column(IMAGE_URI).take(pa.array(rows, type=pa.int64())).to_pylist()

    def thumbnails(self, rows: list[int]) -> list[bytes]:
        """The encoded thumbnail of each row; ValueError for an index without thumbnails."""
        if self.thumbnail_table is None:
            raise ValueError(f"index {self.version} has no thumbnails")
        return self.thumbnail_table.column("thumbnail").take(pa.array(rows, type=pa.int64())).to_pylist()
