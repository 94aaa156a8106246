"""`atelier eval`'s figures as TensorBoard scalars, so evaluations compare side by side there.

`<--out>/tensorboard/` holds one run (a sub-folder) per model of the report, one for the real
products (the references: their IS, the train split's FID against the test split, their
accuracy and diversity) and one per retrieval baseline (random products, query by a real
image, metadata filter: their precision@k). Every figure is one point at step 0, so
TensorBoard's tooltip lists all runs' values together. Tags, with their report.json keys:

  inception_score/<group>, inception_score_std/<group>   results.<run>.inception_score.<group>.mean / std
  fid/judge, fid/judge_intra_mean, fid/inception          fid_judge, intra_fid_judge.mean, fid_inception
  fid_judge_intra/<class>                                  intra_fid_judge.per_class.<class>
  kid/inception, kid/inception_std                         kid_inception.mean / std
  precision_recall_inception/<name>                        precision_recall_inception.<name>
  accuracy/<group|all>, accuracy_seen/..., accuracy_held_out/...   accuracy, accuracy_seen, accuracy_held_out
  diversity                                                diversity
  sampling/images_per_second, training/images_seen         sampling_images_per_second, images_seen
  precision_at_<k>/<group|all>                             retrieval.methods.<run>.<group>.<k>
  precision_at_<k>_seen/..., precision_at_<k>_held_out/... retrieval_by_split.<seen|held_out>.<run>.<group>.<k>

Figures the report does not have (None: no Inception network, no hold-out) are left out. The
folder is written whole beside itself and then swapped in, so a rerun into the same --out
replaces the previous run's events instead of adding to them.
"""

from __future__ import annotations

import numbers
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["figures", "run_folder", "write_events"]


def _put(out: dict[str, float], tag: str, value: Any) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, numbers.Real):  # numpy's floats too
        out[tag] = float(value)


def _generation(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group, score in (result.get("inception_score") or {}).items():
        _put(out, f"inception_score/{group}", score.get("mean"))
        _put(out, f"inception_score_std/{group}", score.get("std"))
    _put(out, "fid/judge", result.get("fid_judge"))
    intra = result.get("intra_fid_judge") or {}
    _put(out, "fid/judge_intra_mean", intra.get("mean"))
    for value, fid in (intra.get("per_class") or {}).items():
        _put(out, f"fid_judge_intra/{value}", fid)
    _put(out, "fid/inception", result.get("fid_inception"))
    kid = result.get("kid_inception") or {}
    _put(out, "kid/inception", kid.get("mean"))
    _put(out, "kid/inception_std", kid.get("std"))
    for name, value in (result.get("precision_recall_inception") or {}).items():
        _put(out, f"precision_recall_inception/{name}", value)
    for key in ("accuracy", "accuracy_seen", "accuracy_held_out"):
        for group, value in (result.get(key) or {}).items():
            _put(out, f"{key}/{group}", value)
    _put(out, "diversity", result.get("diversity"))
    _put(out, "sampling/images_per_second", result.get("sampling_images_per_second"))
    _put(out, "training/images_seen", result.get("images_seen"))
    return out


def _precision(per_group: dict[str, dict[str, Any]], suffix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for group, by_k in per_group.items():
        for k, value in by_k.items():
            _put(out, f"precision_at_{k}{suffix}/{group}", value)
    return out


def figures(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{run name: {tag: value}}: the models, the real products and the retrieval baselines."""
    runs = {name: _generation(result) for name, result in report["results"].items()}
    retrieval = report.get("retrieval") or {}
    for method, per_group in (retrieval.get("methods") or {}).items():
        runs.setdefault(method, {}).update(_precision(per_group))
    for split, methods in (report.get("retrieval_by_split") or {}).items():
        for method, per_group in methods.items():
            runs.setdefault(method, {}).update(_precision(per_group, f"_{split}"))
    return runs


def run_folder(name: str) -> str:
    """A run's sub-folder: its name, with path separators and a leading dot made harmless."""
    safe = name.replace(os.sep, "_").replace("/", "_")
    return f"_{safe}" if safe.startswith(".") or not safe else safe


def write_events(report: dict[str, Any], folder: Path) -> Path:
    """Writes `figures(report)` as event files, one run per sub-folder of `folder`; returns it."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, scalars in figures(report).items():
        writer = SummaryWriter(log_dir=str(partial / run_folder(name)))
        try:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, 0)
        finally:
            writer.close()
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
