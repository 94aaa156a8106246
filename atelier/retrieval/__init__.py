"""GenerateAndRetrieve in process: validate the request, batch it with others for the same model,
generate, embed, search the FAISS index, merge the candidates; `precision` scores what comes back.

Entry point: `RetrievalService.open(index_dir, {name: checkpoint})`, then
`generate_and_retrieve(RetrievalRequest(...))`. The stage names are in `stages`.
"""

from atelier.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "RetrievalService": "atelier.retrieval.service",
    "RetrievalRequest": "atelier.retrieval.service",
    "RetrievalResult": "atelier.retrieval.service",
    "Product": "atelier.retrieval.service",
    "Limits": "atelier.retrieval.service",
    "InvalidRequest": "atelier.retrieval.service",
    "IncompatibleArtifacts": "atelier.retrieval.service",
    "DeadlineExceeded": "atelier.retrieval.service",
    "Overloaded": "atelier.retrieval.service",
    "BatchPolicy": "atelier.retrieval.batching",
    "precision_at_k": "atelier.retrieval.precision",
})
