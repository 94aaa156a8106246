"""An index directory: the FAISS index, the row -> product map, and the manifest naming both.

    index.faiss       FAISS index; row i is product i of products.arrow
    products.arrow    id + attribute columns, in index row order (what a search returns), as an
                      uncompressed Arrow IPC file (older versions: products.parquet)
    manifest.json     embedder (name, weights hash, input size), dimension, metric, count,
                      schema, catalogue name + fingerprint, index type and the record of its
                      choice (index_choice: budget, bytes, measured recall@10), sha256 of each file

Written by `build_index_directory` into the reindex job's staging folder (the writer calls it)
and published by one atomic rename (atelier.indexer.runner.publish_index, atelier.artifacts),
so a reader never sees half an index. Opened memory-mapped: the FAISS file (IO_FLAG_MMAP_IFC)
and the products (Arrow IPC) are read in place, so the pages are the kernel's page cache,
shared between processes serving one version and never copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atelier import artifacts
from atelier.catalog.schema import AttributeSchema
from atelier.indexer.index_choice import IndexOptions, IndexSpec, apply_search_parameters, build_index

KIND = "index"
INDEX_FILE = "index.faiss"
PRODUCTS_FILE = "products.arrow"
LEGACY_PRODUCTS_FILE = "products.parquet"  # index versions written before products.arrow
METRIC = "inner_product"  # vectors are L2-normalised, so this is cosine similarity


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
) -> None:
    """Write the index files and manifest into `folder` (a staging folder, see `artifacts.staging`);
    publishing it is the caller's. `choice`: the index type, from `choose_index`; `options`: memory
    budget, recall target, PCA (atelier.indexer.index_choice)."""
    if len(vectors) != products.num_rows:
        raise ValueError(f"{len(vectors)} vectors for {products.num_rows} products")
    if len(vectors) == 0:
        raise ValueError("refusing to publish an empty index")
    built = build_index(vectors, choice, options)
    faiss.write_index(built.index, str(folder / INDEX_FILE))
    built.record["bytes"] = (folder / INDEX_FILE).stat().st_size
    with pa.OSFile(str(folder / PRODUCTS_FILE), "wb") as sink, pa.ipc.new_file(sink, products.schema) as writer:
        writer.write_table(products)
    artifacts.write_manifest(
        folder, KIND, embedder=embedder, dimension=int(vectors.shape[1]), metric=METRIC,
        count=int(len(vectors)), schema=schema.to_dict(), catalogue=catalogue,
        index_type=built.spec.factory, index_choice=built.record, **(extra or {}),
    )


@dataclass
class IndexDirectory:
    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    products: pa.Table

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> IndexDirectory:
        folder = artifacts.resolve(path)
        manifest = artifacts.read_manifest(folder, KIND, verify=verify)
        index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        apply_search_parameters(index, manifest.get("index_choice", {}).get("search_parameters", {}))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # reconstruct() by row, for the merge's mean similarity
        if (folder / PRODUCTS_FILE).is_file():
            products = pa.ipc.open_file(pa.memory_map(str(folder / PRODUCTS_FILE))).read_all()  # zero-copy
        else:
            products = pq.read_table(folder / LEGACY_PRODUCTS_FILE)
        if index.ntotal != manifest["count"] or products.num_rows != manifest["count"]:
            raise artifacts.ArtifactError(
                f"{folder}: manifest says {manifest['count']} products, index has {index.ntotal}, map has {products.num_rows}"
            )
        return cls(folder, manifest, index, products)

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def schema(self) -> AttributeSchema:
        return AttributeSchema.from_dict(self.manifest["schema"])

    @property
    def embedder(self) -> dict[str, Any]:
        return self.manifest["embedder"]

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n_queries, k), best first; rows are -1 where fewer than k exist."""
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self)))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of the given rows (exact for Flat and HNSW,Flat; decoded, so
        approximate, for SQ8 / PQ codes and after PCA)."""
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def product_rows(self, rows: list[int]) -> list[dict[str, Any]]:
        return self.products.take(pa.array(rows, type=pa.int64())).to_pylist()
