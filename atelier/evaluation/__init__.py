"""`atelier eval`: grade generators with an independent judge and measure what the service returns.

IS, FID / KID (TF-Inception and judge features), conditioning accuracy, diversity, retrieval
precision@k beside three baselines (random products, query by a real image, metadata filter),
the compositional hold-out; JSON, Markdown and HTML reports. Method: docs/evaluation.md.
"""

from atelier.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "EvalSettings": "atelier.evaluation.compare",
    "compare_models": "atelier.evaluation.compare",
    "write_report": "atelier.evaluation.compare",
    "evaluate_retrieval": "atelier.evaluation.retrieval_quality",
    "FidInception": "atelier.evaluation.fid_inception",
    "frechet_distance": "atelier.evaluation.metrics",
    "inception_score": "atelier.evaluation.metrics",
    "kernel_inception_distance": "atelier.evaluation.metrics",
})
