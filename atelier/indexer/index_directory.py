"""An index directory: the FAISS index, the row -> product map, and the manifest naming both.

    index.faiss       FAISS index; row i is product i of products.parquet
    products.parquet  id + attribute columns, in index row order (what a search returns)
    manifest.json     embedder (name, weights hash, input size), dimension, metric, count,
                      schema, catalogue name + fingerprint, index type, sha256 of each file

Built by `build_index_directory` in a staging folder and published by atomic rename
(atelier.artifacts), so a reader never sees half an index.
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

KIND = "index"
INDEX_FILE = "index.faiss"
PRODUCTS_FILE = "products.parquet"
METRIC = "inner_product"  # vectors are L2-normalised, so this is cosine similarity


def build_faiss_index(vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product search. (Index choice under a memory budget is future work.)"""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def write_index_directory(
    dest: Path,
    vectors: np.ndarray,
    products: pa.Table,
    embedder: dict[str, Any],
    schema: AttributeSchema,
    catalogue: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Build the FAISS index over `vectors` (row i = products row i) and publish it at `dest`."""
    with artifacts.staging(dest) as stage:
        build_index_directory(stage, vectors, products, embedder, schema, catalogue, extra)
        return artifacts.publish(stage, dest)


def build_index_directory(
    stage: Path,
    vectors: np.ndarray,
    products: pa.Table,
    embedder: dict[str, Any],
    schema: AttributeSchema,
    catalogue: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the index files and manifest into a staging folder (see `artifacts.staging`)."""
    if len(vectors) != products.num_rows:
        raise ValueError(f"{len(vectors)} vectors for {products.num_rows} products")
    if len(vectors) == 0:
        raise ValueError("refusing to publish an empty index")
    index = build_faiss_index(vectors)
    faiss.write_index(index, str(stage / INDEX_FILE))
    pq.write_table(products, stage / PRODUCTS_FILE)
    artifacts.write_manifest(
        stage, KIND, embedder=embedder, dimension=int(vectors.shape[1]), metric=METRIC,
        count=int(len(vectors)), schema=schema.to_dict(), catalogue=catalogue,
        index_type=type(index).__name__, **(extra or {}),
    )


@dataclass
class IndexDirectory:
    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    products: pa.Table

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> "IndexDirectory":
        folder = artifacts.resolve(path)
        manifest = artifacts.read_manifest(folder, KIND, verify=verify)
        index = faiss.read_index(str(folder / INDEX_FILE))
        products = pq.read_table(folder / PRODUCTS_FILE)
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
        """The stored vectors of the given rows (exact for a flat index)."""
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def product_rows(self, rows: list[int]) -> list[dict[str, Any]]:
        return self.products.take(pa.array(rows, type=pa.int64())).to_pylist()
