"""The reindex job: catalogue -> reader -> mapper -> writer -> published index directory.

Follows clip-retrieval's shape: the runner wires the three stages; `sequential` is the only
distributor for now (one process; a Spark or Slurm distributor would split the catalogue's
Parquet files across workers and merge the writers' outputs).

Crash safety: the job claims its staging folder when it starts and publishes it with one
atomic rename at the end, so a job killed at any point leaves the published index as it was;
the next run removes the dead job's staging folder (atelier.artifacts).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.indexer.embedders import (
    AUTO, DEFAULT_EMBEDDER, DEFAULT_INPUT_SIZE, INDEX_EMBEDDER_FOLDER, build_embedder, embedder_for_catalogue,
)
from atelier.indexer.index_choice import IndexOptions, choose_index
from atelier.indexer.mapper import EmbeddingMapper
from atelier.indexer.reader import CatalogueReader
from atelier.indexer.writer import IndexWriter
from atelier.progress import progress_bar

log = logging.getLogger("atelier.indexer")


def reindex(
    catalogue_path: Path,
    dest: Path,
    embedder_name: str = DEFAULT_EMBEDDER,
    input_size: int = DEFAULT_INPUT_SIZE,
    batch_size: int = 64,
    max_failed_fraction: float = 0.01,
    threads: int | None = None,
    progress: bool = True,
    index_options: IndexOptions | None = None,
) -> Path:
    """Embed every catalogue image and publish the index at `dest`; returns the version folder.

    `embedder_name`: an ImageNet backbone's name, a trained embedder's folder, or `auto` (the
    one measured best for this catalogue, see `embedder_for_catalogue`). `index_options`: memory
    budget, recall target, PCA (atelier.indexer.index_choice); an impossible budget fails before
    any image is embedded."""
    if not 0.0 <= max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction must be within [0, 1], got {max_failed_fraction}")
    if threads:
        torch.set_num_threads(threads)
    catalogue = Catalogue.open(catalogue_path, verify=True)
    index_options = index_options or IndexOptions()
    with artifacts.staging(dest) as stage:  # removed on failure; a killed job's is removed by the next run
        if embedder_name == AUTO:
            embedder_name = embedder_for_catalogue(catalogue.name)
        embedder = build_embedder(embedder_name, input_size)
        choose_index(len(catalogue), embedder.dim, index_options)  # a budget nothing fits: say so now, not after embedding
        embedder.copy_files(stage / INDEX_EMBEDDER_FOLDER)  # hashed into the manifest with the index files
        reader = CatalogueReader(catalogue, batch_size)
        mapper = EmbeddingMapper(embedder, catalogue.image_channels)
        writer = IndexWriter(
            stage, dest, catalogue.schema, embedder.describe(),
            {"name": catalogue.name, "fingerprint": catalogue.fingerprint, "rows": len(catalogue)},
            max_failed_fraction, index_options,
        )
        start = time.perf_counter()
        try:
            with progress_bar(total=len(reader), desc="embedding", unit="img", disable=not progress) as bar:
                for embedded in mapper.map(reader):
                    writer.write(embedded)
                    bar.update(len(embedded.vectors) + len(embedded.skipped))
        finally:
            mapper.close()
        seconds = time.perf_counter() - start
        if writer.skipped:
            log.warning("%d of %d images could not be decoded and were skipped (listed in the manifest's "
                        "'skipped'), e.g. %s", len(writer.skipped), len(catalogue), writer.skipped[0])
        return writer.close(extra={"build": {
            "seconds": round(seconds, 2), "images_per_second": round(len(catalogue) / seconds, 1),
            "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
            **{k: round(v, 3) for k, v in mapper.timings.items()},
        }})
