"""The reindex job: catalogue -> reader -> mapper -> writer -> published index directory.

The runner owns the job, in clip-retrieval's shape: `reindex` claims the staging folder,
chooses the index type and builds the three stages; `run_stages` drives them (the loop);
`publish_index` has the writer write its files, then publishes them. The stages only do their
part: the reader reads, the mapper embeds, the writer collects and writes the index files into
the folder it is given. `distributor="ray"` runs the reading and embedding on Ray workers over
shards of the catalogue (atelier.indexer.distributed); the writer, the index build and the
publish stay here, so both distributors publish the same index the same way.

The index type is chosen once, before any image is embedded (a budget nothing fits fails at
once, not after the embedding), and handed to the writer, which builds that type.

Crash safety: the job claims its staging folder when it starts and publishes it with one
atomic rename at the end, so a job killed at any point leaves the published index as it was;
the next run removes the dead job's staging folder (atelier.artifacts).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.indexer.distributed import LOCAL, embed_on_ray, settings_for
from atelier.indexer.embedders import (
    AUTO,
    DEFAULT_EMBEDDER,
    DEFAULT_INPUT_SIZE,
    INDEX_EMBEDDER_FOLDER,
    build_embedder,
    embedder_for_catalogue,
)
from atelier.indexer.index_choice import IndexOptions, check_on_disk_lists, choose_index
from atelier.indexer.mapper import EmbeddingMapper
from atelier.indexer.reader import CatalogueReader
from atelier.indexer.writer import IndexWriter
from atelier.progress import progress_bar

log = logging.getLogger("atelier.indexer")
DEFAULT_THUMBNAIL_SIZE = 64  # px; our catalogues' images are 28-64 px, so their own bytes are reused
MAX_THUMBNAIL_SIZE = 256  # a thumbnail, not a photo: bounds thumbnails.arrow and each response


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
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    distributor: str = LOCAL,
    ray_address: str | None = None,
    workers: int | None = None,
    shard_rows: int | None = None,
) -> Path:
    """Embed every catalogue image and publish the index at `dest`; returns the version folder.

    `embedder_name`: an ImageNet backbone's name, a trained embedder's folder, or `auto` (the
    one measured best for this catalogue, see `embedder_for_catalogue`). `index_options`: memory
    budget, recall target, PCA (atelier.indexer.index_choice); the index type is chosen from
    them once, before any image is embedded, so an impossible budget fails first. Raises
    writer.TooManyFailures when more than `max_failed_fraction` of the images cannot be decoded.
    `thumbnail_size`: px of the products' thumbnails kept in the index (0: none), at most
    MAX_THUMBNAIL_SIZE.

    `distributor`: `local` (this process: a decode thread beside the forward, `threads` torch
    threads) or `ray` (atelier.indexer.distributed: `workers` Ray workers of `threads` torch
    threads each, default 1, over shards of `shard_rows` rows; a local Ray started and stopped
    for the job, or the cluster at `ray_address`). Either way the same index, manifest and publish."""
    if not 0.0 <= max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction must be within [0, 1], got {max_failed_fraction}")
    check_thumbnail_size(thumbnail_size)
    ray_settings = settings_for(distributor, ray_address, workers, threads, shard_rows, batch_size)
    if threads:
        torch.set_num_threads(threads)
    catalogue = Catalogue.open(catalogue_path, verify=True)
    index_options = index_options or IndexOptions()
    with artifacts.staging(dest) as stage:  # removed on failure; a killed job's is removed by the next run
        if embedder_name == AUTO:
            embedder_name = embedder_for_catalogue(catalogue.name)
        embedder = build_embedder(embedder_name, input_size)
        # The one choice, before embedding: a budget nothing fits fails now. It counts every row;
        # images skipped later only make the index smaller.
        choice = choose_index(len(catalogue), embedder.dim, index_options)
        check_on_disk_lists(choice, index_options)
        embedder.copy_files(stage / INDEX_EMBEDDER_FOLDER)  # hashed into the manifest with the index files
        writer = IndexWriter(
            stage, catalogue.schema, embedder.describe(),
            {"name": catalogue.name, "fingerprint": catalogue.fingerprint, "rows": len(catalogue)},
            choice, index_options, max_failed_fraction, thumbnail_size,
        )
        if ray_settings is not None:
            build = embed_on_ray(catalogue, embedder, writer, ray_settings, batch_size, thumbnail_size, progress)
        else:
            mapper = EmbeddingMapper(embedder, catalogue.image_channels, thumbnail_size=thumbnail_size)
            build = {"distributor": LOCAL, **run_stages(CatalogueReader(catalogue, batch_size), mapper, writer, progress)}
        return publish_index(writer, dest, extra={"build": build})


def check_thumbnail_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_THUMBNAIL_SIZE:
        raise ValueError(f"thumbnail size must be a whole number of px from 1 to {MAX_THUMBNAIL_SIZE}, "
                         f"or 0 for an index without thumbnails; got {size!r}")


def run_stages(reader: CatalogueReader, mapper: EmbeddingMapper, writer: IndexWriter,
               progress: bool = True) -> dict[str, Any]:
    """Drive reader -> mapper -> writer to the end of the catalogue; returns the manifest's
    `build` record (wall time, images per second, batch size, threads, the mapper's timings)."""
    start = time.perf_counter()
    try:
        with progress_bar(total=len(reader), desc="embedding", unit="img", disable=not progress) as bar:
            for embedded in mapper.map(reader):
                writer.write(embedded)
                bar.update(len(embedded.vectors) + len(embedded.skipped))
    finally:
        mapper.close()  # its decode thread, also when the writer gives up part-way
    seconds = time.perf_counter() - start
    if writer.skipped:
        log.warning("%d of %d images could not be decoded and were skipped (listed in the manifest's "
                    "'skipped'), e.g. %s", len(writer.skipped), len(reader), writer.skipped[0])
    return {
        "seconds": round(seconds, 2), "images_per_second": round(len(reader) / seconds, 1),
        "batch_size": reader.batch_size, "torch_threads": torch.get_num_threads(),
        **{k: round(v, 3) for k, v in mapper.timings.items()},
    }


def publish_index(writer: IndexWriter, dest: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the writer's index into its folder, then make that folder the current version of
    `dest` with one atomic rename; returns the version folder.

    The one way an index gets published: the reindex job ends here, and so do the tests'
    indexes over ready vectors. The writer's folder must be a staging folder of `dest`,
    claimed by the caller (`artifacts.staging(dest)`), which also removes it if this fails.
    `extra`: more manifest fields."""
    writer.close(extra)
    return artifacts.publish(writer.folder, dest)
