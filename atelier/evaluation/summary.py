"""`docs/results/summary.json`: the headline figures, written by `atelier eval --summary`, never by hand.

One entry per catalogue (its name without the selection, e.g. "fashion-mnist" or
"fashion-product-images") for the model an evaluation names as
its headline, a "compositional" entry when that model was trained with `--hold-out`, and a
"missing-metadata" entry written by `atelier eval-missing --summary`. Each
entry carries where it came from: the eval command, the report, the date and the settings,
so a figure in the README can be traced to the run that measured it. Other entries in the file
are kept; the file is replaced whole (written beside it, then renamed).

For a catalogue with one single-label group (Fashion-MNIST's category) the accuracy and the
precisions are numbers (`class_accuracy`, `precision_at_5`); with several groups they are
per-group maps (`accuracy`, `precision_at_10`: {"articleType": ..., ...}).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from atelier.evaluation.compare import REAL
from atelier.evaluation.retrieval_quality import REAL_IMAGE
from atelier.retrieval.precision import ALL

__all__ = ["COMPOSITIONAL", "MISSING_METADATA", "catalogue_key", "headline_table", "summary_entries",
           "update_summary"]

COMPOSITIONAL = "compositional"
MISSING_METADATA = "missing-metadata"  # atelier eval-missing: recall when product metadata is missing
NOT_CATALOGUES = (COMPOSITIONAL, MISSING_METADATA)


def _per_group(values: dict[str, Any] | None, groups: list[str]) -> Any:
    values = values or {}
    if len(groups) == 1:
        return values.get(groups[0])
    return {g: values.get(g) for g in groups}


def _precisions(methods: dict[str, Any], method: str, groups: list[str], ks: list[int], prefix: str) -> dict:
    precision = methods.get(method, {})
    return {f"{prefix}{k}": _per_group({g: precision.get(g, {}).get(str(k)) for g in groups}, groups) for k in ks}


def _check_same_model(measured: dict[str, Any], model: str, checkpoint: Path) -> None:
    """Raise unless `checkpoint` holds the model that a report measured (`measured`, its result).

    For naming a committed copy of a working run folder in the summary: the weights' hash must
    match; a report written before reports kept the hash is matched by the training record it
    kept (family, images seen, training seconds: the same training run at the same point).
    """
    from atelier import artifacts
    from atelier.generator.checkpoint import KIND, WEIGHTS

    manifest = artifacts.read_manifest(artifacts.resolve(checkpoint), KIND, verify=True)
    training = manifest.get("training", {})
    if measured.get("weights_sha256"):
        theirs, mine = measured["weights_sha256"], manifest["files"][WEIGHTS]
        if theirs != mine:
            raise ValueError(f"{checkpoint} is not the model the report measured as {model!r}: weights "
                             f"{mine[:12]}, measured {theirs[:12]}")
        return
    pairs = {"family": (measured.get("family"), manifest.get("family")),
             "images seen": (measured.get("images_seen"), training.get("images_seen")),
             "training seconds": (measured.get("training_seconds"), training.get("seconds"))}
    differ = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if differ:
        said = ", ".join(f"{k} {mine} (measured {theirs})" for k, (theirs, mine) in differ.items())
        raise ValueError(f"{checkpoint} is not the model the report measured as {model!r}: {said}")


def summary_entries(report: dict[str, Any], model: str, checkpoint: str, report_path: str | None = None,
                    committed: Path | None = None) -> dict[str, dict[str, Any]]:
    """{key: entry} for `model` of an `atelier eval` report: the catalogue's entry, or, for a model
    trained with held-out combinations, the compositional one. `committed`: a copy of the measured
    `checkpoint` (refused unless it holds the same model) that the entry names instead of it."""
    results = report["results"]
    if model not in results or model == REAL:
        raise ValueError(f"the report has no model {model!r}; it has {[m for m in results if m != REAL]}")
    mine, real, groups = results[model], results[REAL], list(report["groups"])
    origin = {"model": model, "family": mine.get("family"), "checkpoint": checkpoint,
              "version": mine.get("version"), "command": report.get("command"), "report": report_path,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "index_version": report.get("index_version")}
    if committed is not None:
        from atelier import artifacts

        _check_same_model(mine, model, committed)
        origin.update(checkpoint=str(committed), version=artifacts.resolve(committed).name,
                      measured_as={"checkpoint": checkpoint, "version": mine.get("version")})
    if mine.get("held_out"):
        seen, held = mine.get("accuracy_seen") or {}, mine.get("accuracy_held_out") or {}
        return {COMPOSITIONAL: {**origin, "catalogue": report["catalogue"], "held_out": mine["held_out"],
                                "seen_both_accuracy": seen.get(ALL), "held_out_both_accuracy": held.get(ALL)}}
    entry: dict[str, Any] = {**origin, "selection": report.get("selection")}
    entry.update(fid_inception=mine.get("fid_inception"), fid_images=mine.get("fid_images"),
                 real_fid_floor=real.get("fid_inception"), real_fid_floor_images=real.get("fid_inception_images"),
                 kid_inception=(mine.get("kid_inception") or {}).get("mean"),
                 precision_recall_inception=mine.get("precision_recall_inception"))
    accuracy_key = "class_accuracy" if len(groups) == 1 else "accuracy"
    entry[accuracy_key] = _per_group(mine.get("accuracy"), groups)
    entry[f"real_{accuracy_key}"] = _per_group(real.get("accuracy"), groups)
    entry.update(diversity=mine.get("diversity"), real_diversity=real.get("diversity"))
    methods, ks = report["retrieval"]["methods"], list(report["retrieval"]["ks"])
    entry.update(_precisions(methods, model, groups, ks, "precision_at_"))
    entry.update(_precisions(methods, REAL_IMAGE, groups, ks, "real_image_precision_at_"))
    settings = report.get("settings", {})
    entry["settings"] = {k: settings.get(k) for k in ("is_images", "fid_images", "samples", "min_products",
                                                     "retrieval_samples", "retrieval_repeats", "seed")}
    return {catalogue_key(report): entry}


def catalogue_key(report: dict[str, Any]) -> str:
    """The catalogue's name without its selection: "fashion-product-images" for
    "fashion-product-images-full"; the entry's "selection" says which one was measured."""
    name, selection = report["catalogue"], report.get("selection")
    return name.removesuffix(f"-{selection}") if selection else name


def update_summary(path: Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge `entries` into the summary file at `path` (other keys kept); returns the whole summary."""
    path = Path(path)
    summary: dict[str, Any] = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); fix or remove it, it is not overwritten") from None
    summary.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(dict(sorted(summary.items())), indent=2, default=float) + "\n")
    os.replace(partial, path)
    return summary


def _cell(value: Any, decimals: int | None = None) -> str:
    """A figure as the table prints it: `decimals` places where given, else 3 below 10 and 1 above."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v, decimals)}" for k, v in value.items())
    if isinstance(value, float):
        if decimals is None:
            decimals = 3 if abs(value) < 10 else 1
        return f"{value:.{decimals}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


HEADLINE_COLUMNS = (  # (header, entry key, real-products key, decimal places: None for the default rule)
    ("FID (Inception)", "fid_inception", "real_fid_floor", 1), ("FID images", "fid_images", "real_fid_floor_images", None),
    ("class accuracy", "class_accuracy", "real_class_accuracy", None), ("accuracy", "accuracy", "real_accuracy", None),
    ("diversity", "diversity", "real_diversity", None),
    ("precision@5", "precision_at_5", "real_image_precision_at_5", None),
    ("precision@10", "precision_at_10", "real_image_precision_at_10", None),
)


def headline_table(summary: dict[str, Any]) -> str:
    """The README's headline table: per catalogue, the model's figure beside the real products'
    (real images' FID floor, accuracy and diversity; query by a real image for precision)."""
    catalogues = [k for k in summary if k not in NOT_CATALOGUES]
    used = [column for column in HEADLINE_COLUMNS if any(column[1] in summary[c] for c in catalogues)]
    lines = ["| catalogue | model | " + " | ".join(column[0] for column in used) + " |",
             "|" + " --- |" * (len(used) + 2)]
    for c in catalogues:
        entry = summary[c]
        name = c + (f" (`{entry['selection']}`)" if entry.get("selection") else "")
        cells = [f"{_cell(entry.get(key), places)} ({_cell(entry.get(real), places)})" if key in entry else ""
                 for _, key, real, places in used]
        lines.append(f"| {name} | `{entry['model']}` | " + " | ".join(cells) + " |")
    if COMPOSITIONAL in summary:
        entry = summary[COMPOSITIONAL]
        lines += ["", f"Compositional hold-out (`{entry['model']}`, {entry['catalogue']}): both attributes right on "
                      f"held-out pairs {_cell(entry['held_out_both_accuracy'])}, on seen pairs "
                      f"{_cell(entry['seen_both_accuracy'])}."]
    if MISSING_METADATA in summary:
        lines += ["", _missing_metadata_line(summary[MISSING_METADATA])]
    return "\n".join(lines)


def _missing_metadata_line(entry: dict[str, Any]) -> str:
    recall = entry.get(f"recall_at_{entry['k']}") or {}
    return (f"Metadata missing for {entry['fraction_missing']:.0%} of products' {entry['blanked']} "
            f"(`{entry['model']}`, {entry['catalogue']}): recall@{entry['k']} of the metadata filter "
            f"{_cell(recall.get('metadata_filter'))}, generate-and-retrieve {_cell(recall.get('generate_and_retrieve'))}, "
            f"hybrid {_cell(recall.get('hybrid'))}.")


if __name__ == "__main__":  # python -m atelier.evaluation.summary [FILE]: print the headline table
    import sys

    print(headline_table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/summary.json").read_text())))
