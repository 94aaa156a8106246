"""Embedders and the batch reindex job: catalogue -> reader -> mapper -> writer -> index directory.

`backbone` holds the one image-to-network-input path (the ImageNet network is atelier.pretrained); `embedders`
the registry of embedders; `attribute_net` the attribute networks (eval judges and in-domain
embedders); `index_choice` picks the FAISS index under a memory budget; `runner.reindex` runs
and publishes the job; `index_directory` opens what it published.
"""

from atelier.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "reindex": "atelier.indexer.runner",
    "IndexDirectory": "atelier.indexer.index_directory",
    "IndexOptions": "atelier.indexer.index_choice",
    "Embedder": "atelier.indexer.embedders",
    "EMBEDDERS": "atelier.indexer.embedders",
    "build_embedder": "atelier.indexer.embedders",
    "ARCHITECTURES": "atelier.indexer.attribute_net",
    "AttributeNet": "atelier.indexer.attribute_net",
    "load_attribute_net": "atelier.indexer.attribute_net",
    "network_input": "atelier.indexer.backbone",
})
