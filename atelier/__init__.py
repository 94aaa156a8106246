"""atelier: attribute-to-image retrieval.

A shopper describes an item by attributes; a conditional generator draws it, the catalogue's
CNN embeds the drawings and FAISS returns the nearest products, over gRPC. The packages, from
the bottom up: `catalog`, `generator` and `indexer`, `retrieval`, `server`, `evaluation`; the
map is docs/architecture.md. `cli` is the `atelier` command.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
