"""`atelier eval`: models side by side on one index, graded by an independent judge.

For a catalogue, an index, a judge (`atelier train-attributes --architecture judge_cnn`) and
one or more generators it measures:

  generation  Inception Score with the judge's head of each single-label group (N images in S
              splits, conditions drawn from the held-out split's own attribute rows, so the label
              mix is the real one), FID on judge features and intra-class FID (per value of the
              first group), FID and KID with the standard TF-Inception network, conditioning
              accuracy per group and for all groups (judge's answer == asked), diversity (mean
              pairwise cosine distance of judge features within a condition)
  retrieval   attribute precision@k of GenerateAndRetrieve (the real service, in process) beside
              random products, query by a real held-out image, and an exact metadata filter
  hold-out    for a model trained with `--hold-out`, accuracy and precision on the held-out
              combinations beside the seen ones

The real held-out (test split) images are the reference throughout: their IS is the ceiling,
and the train split against them gives the FID a perfect copy of the training data would get.
Writes report.json, report.md and report.html (grids, per-condition rows, retrieved products).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atelier.catalog.catalogue import Catalogue
from atelier.catalog.images import image_grid
from atelier.evaluation.conditioning import combinations_in_index, mean_pairwise_cosine_distance, score
from atelier.evaluation.feature_store import FeatureStore
from atelier.evaluation.fid_inception import FEATURE_DIM
from atelier.evaluation.metrics import (
    FeatureStatistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from atelier.evaluation.report_html import write_html
from atelier.evaluation.retrieval_quality import evaluate_retrieval
from atelier.generator.base import ConditionalGenerator
from atelier.indexer.attribute_net import load_attribute_net
from atelier.progress import progress_bar
from atelier.retrieval.precision import ALL
from atelier.retrieval.service import Limits, RetrievalService

REAL = "real products"


@dataclass
class EvalSettings:
    samples: int = 16  # images per condition: accuracy, diversity, the report's rows
    min_products: int = 20  # conditions: combinations with at least this many products in the index
    # the groups requests name (and the judge grades): () = every single-label group; fewer need
    # models that take partial requests (the others are drawn from what the model learned)
    groups: tuple[str, ...] = ()
    ks: tuple[int, ...] = (1, 5, 10)
    is_images: int = 20_000  # the seed's 20,000 in 5 splits
    is_splits: int = 5
    fid_images: int = 10_000  # TF-Inception FID/KID per model (Fashion-MNIST's whole test split); 0: none
    kid_subset: int = 1_000
    retrieval_samples: int = 4  # images generated per GenerateAndRetrieve request
    retrieval_repeats: int = 5  # each condition asked this many times (seeds seed, seed + 1, ...)
    seed: int = 0
    batch_size: int = 250
    progress: bool = True
    # real images' Inception features are kept here, keyed by catalogue, rows and network, so the
    # reference is computed once per catalogue; None: not cached
    feature_cache: str | None = str(Path("~/.cache/atelier/inception").expanduser())


def generate(model: ConditionalGenerator, conditions: list[dict[str, Any]], seed: int, batch_size: int,
             progress: bool = False, desc: str = "sampling") -> tuple[np.ndarray, float]:
    """One image per condition (image i from seed `seed + i`); returns (images, seconds)."""
    vectors = np.stack([model.schema.encode(c, require_all=not model.accepts_partial) for c in conditions])
    out, seconds = [], 0.0
    for start in progress_bar(range(0, len(conditions), batch_size), desc=desc, disable=not progress, leave=False):
        batch = vectors[start : start + batch_size]
        began = time.perf_counter()
        out.append(model.sample_conditions(batch, range(seed + start, seed + start + len(batch))))
        seconds += time.perf_counter() - began
    return np.concatenate(out), seconds


def _first(rows: list[int], n: int, seed: list[int]) -> np.ndarray:
    """The first n of a permutation of `rows` drawn by a generator of their own, in row order:
    the same rows every run, and a smaller n's rows are among a larger n's."""
    return np.sort(np.random.default_rng(seed).permutation(np.asarray(rows))[:n])


def _intra_class_fid(features: np.ndarray, classes: list[str], real: np.ndarray, real_classes: list[str],
                     minimum: int = 50) -> dict[str, float]:
    """FID on judge features within each class with at least `minimum` images on both sides."""
    out = {}
    for value in sorted(set(real_classes)):
        mine = features[[i for i, c in enumerate(classes) if c == value]]
        theirs = real[[i for i, c in enumerate(real_classes) if c == value]]
        if len(mine) >= minimum and len(theirs) >= minimum:
            out[value] = frechet_distance(FeatureStatistics.of(mine), FeatureStatistics.of(theirs))
    return out


class Evaluation:
    """One run of `atelier eval`; `run()` returns the report (JSON-ready) and the HTML visuals."""

    def __init__(self, index_path: Path, catalogue_path: Path, models: Mapping[str, Path], judge_path: Path,
                 settings: EvalSettings, sampling: Mapping[str, Mapping[str, Any]] | None = None):
        self.settings = s = settings
        if not models:
            raise ValueError("name at least one model: --model NAME=CHECKPOINT")
        if min(s.samples, s.is_images, s.is_splits) < 1 or s.fid_images < 0:
            raise ValueError("--samples, --is-images and --is-splits must be positive, --fid-images >= 0")
        if s.fid_images > s.is_images:  # the FID's drawings are the first of the IS drawings
            raise ValueError(f"--fid-images {s.fid_images} needs at least as many --is-images (got {s.is_images}): "
                             f"the FID is measured on the first --fid-images of those drawings")
        self.service = RetrievalService.open(index_path, models, Limits(
            max_num_samples=max(64, s.retrieval_samples), max_top_k=max(100, max(s.ks)),
            max_candidates=max(1000, s.retrieval_samples * max(s.ks))), sampling=sampling)
        self.index = self.service.index
        self.judge, self.judge_manifest = load_attribute_net(judge_path)
        self.catalogue = Catalogue.open(catalogue_path)
        self.models = {name: loaded.generator for name, loaded in self.service.models.items()}
        schema = next(iter(self.models.values())).schema
        self.groups = self._asked_groups(schema)
        for name in self.groups:
            if name not in self.judge.schema.names or self.judge.schema.group(name).values != schema.group(name).values:
                raise ValueError(f"judge {judge_path} does not judge group {name!r} with the models' values; "
                                 f"train it on the models' catalogue (it knows {self.judge.schema.names})")
        self.class_group = self.groups[0]
        self.held_out = self._held_out()
        # held-out combinations were drawn among those with enough training rows, so they are here too
        self.conditions = [c for c in combinations_in_index(self.index, schema, s.min_products, self.groups)
                           if all(c[g] in m.schema.group(g).values for m in self.models.values() for g in c)]
        if not self.conditions:
            raise ValueError(f"no attribute combination has {s.min_products} products in {index_path}; "
                             "lower --min-products")

    def _asked_groups(self, schema) -> tuple[str, ...]:
        every = tuple(g.name for g in schema.groups if not g.multi_label)
        asked = tuple(self.settings.groups) or every
        unknown = [g for g in asked if g not in every]
        if unknown:
            raise ValueError(f"--groups {unknown} are not single-label groups of the models; they have {', '.join(every)}")
        whole = [name for name, m in self.models.items() if not m.accepts_partial]
        if set(asked) != set(every) and whole:
            raise ValueError(f"--groups names {len(asked)} of the {len(every)} groups, but model(s) {whole} need "
                             "every group in a request")
        return asked

    def _held_out(self) -> list[dict[str, str]]:
        held: list[dict[str, str]] = []
        for loaded in self.service.models.values():
            for c in loaded.manifest.get("training", {}).get("held_out", []):
                if c not in held:
                    held.append(dict(c))
        return held

    def run(self) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.settings
        started = time.perf_counter()
        images, rows = self.catalogue.load_images()
        attrs = rows.select(["id", "split", *self.groups]).to_pylist()
        test = [i for i, a in enumerate(attrs) if a["split"] == "test"]
        train = [i for i, a in enumerate(attrs) if a["split"] == "train"]
        if len(test) < s.is_splits:
            raise ValueError(f"catalogue {self.catalogue.name!r} has {len(test)} test images: too few to compare with")
        rng = np.random.default_rng(s.seed)
        self.by_id = {a["id"]: i for i, a in enumerate(attrs)}
        self.images = images

        # the real held-out images: the reference of every measure
        real_features, real_probs = self.judge.run(images[test])
        real_classes = [attrs[i][self.class_group] for i in test]
        real_stats = FeatureStatistics.of(real_features)
        draw = rng.choice(test, size=s.is_images, replace=len(test) < s.is_images)
        asked_mix = [{g: attrs[i][g] for g in self.groups} for i in draw]  # the real label mix, N times
        inception = self._inception() if s.fid_images else None
        # the real rows of the FID depend on the seed and the size alone (their own generators), so
        # every run at a size reads the same rows, and a smaller size's rows are among a larger one's
        fid_real_rows = _first(test, min(s.fid_images, len(test)), [s.seed, 1]) if inception else None
        inception_real = self._real_features(inception, images, fid_real_rows) if inception else None
        inception_real_stats = FeatureStatistics.of(inception_real) if inception else None

        real: dict[str, Any] = {"images": len(test)}
        real["inception_score"] = {g: self._is(real_probs[g]) for g in self.groups}
        floor_rows = _first(train, min(len(train), len(test)), [s.seed, 2]) if train else []
        if len(floor_rows):
            train_features, _ = self.judge.run(images[floor_rows])
            real["fid_judge"] = frechet_distance(FeatureStatistics.of(train_features), real_stats)
            real["fid_judge_images"] = len(floor_rows)
            if inception:
                # the floor: as many train images as real test images, through the same network
                some = _first(train, len(fid_real_rows), [s.seed, 2])
                train_inception = self._real_features(inception, images, some)
                real["fid_inception"] = frechet_distance(FeatureStatistics.of(train_inception), inception_real_stats)
                real["fid_inception_images"] = len(some)
                real["kid_inception"] = self._kid(train_inception, inception_real)
                real["precision_recall_inception"] = precision_recall(inception_real, train_inception)
        real_rows = self._real_per_condition(attrs, test, rng)
        real.update(self._condition_measures(real_rows["asked"], real_rows["features"], real_rows["probs"],
                                             real_rows["sizes"]))

        results: dict[str, Any] = {REAL: real}
        visuals: dict[str, Any] = {}
        for name, model in self.models.items():
            results[name], visuals[name] = self._evaluate_model(name, model, asked_mix, real_features, real_classes,
                                                                real_stats, inception, inception_real,
                                                                inception_real_stats)
        retrieval = self._retrieval({a["id"]: a["split"] for a in attrs})
        index_rows = {pid: r for r, pid in enumerate(self.index.products.column("id").to_pylist())}
        for name in self.models:
            for row, entry in zip(visuals[name]["conditions"], retrieval["per_condition"][name][: len(self.conditions)]):
                row["retrieved"] = [{"id": pid, "png": self.images[self.by_id[pid]] if pid in self.by_id else None,
                                     "attributes": self._attributes_of(pid, index_rows)} for pid in entry["retrieved_ids"]]
        report = {
            "catalogue": self.catalogue.name, "selection": self._selection(), "index": str(self.index.path), "index_version": self.index.version,
            "embedder": self.index.embedder, "groups": list(self.groups), "class_group": self.class_group,
            "judge": {"path": str(self.judge_manifest.get("version")), "architecture": self.judge.config.architecture,
                      "input_size": self.judge.config.input_size,
                      "test_accuracy": self.judge_manifest["training"]["test_accuracy"],
                      "trained_on": self.judge_manifest["training"]["catalogue"]},
            "fid_network": inception.describe() if inception else None,
            "settings": asdict(self.settings) | {"ks": list(s.ks)},
            "conditions": self.conditions, "held_out": self.held_out,
            "results": results, "retrieval": retrieval,
            "retrieval_by_split": self._retrieval_by_split(retrieval) if self.held_out else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        return report, visuals

    # -- pieces ---------------------------------------------------------------------------------
    def _selection(self) -> str | None:
        """The importer's selection of attributes (Fashion Product Images: apparel-6x6, full, ...)."""
        selection = (self.catalogue.manifest.get("source") or {}).get("selection")
        return selection.get("name") if isinstance(selection, dict) else selection

    def _real_features(self, inception, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Inception features of real catalogue images (rows of `images`), through the feature
        store when there is one: computed once per row, kept as each batch finishes."""
        if not self.settings.feature_cache:
            return inception.features(images[rows], progress=self.settings.progress)
        store = FeatureStore(self.settings.feature_cache, self.catalogue.name, self.catalogue.fingerprint,
                             inception.sha256, len(images), FEATURE_DIM)
        return store.get(rows, lambda batch: inception.features(images[batch]), progress=self.settings.progress)

    def _inception(self):
        from atelier.evaluation.fid_inception import FidInception

        return FidInception.load()

    def _is(self, probs: np.ndarray) -> dict[str, float]:
        mean, std = inception_score(probs.astype(np.float64), self.settings.is_splits)
        return {"mean": mean, "std": std, "images": len(probs), "splits": self.settings.is_splits}

    def _kid(self, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        mean, std = kernel_inception_distance(a, b, subset_size=self.settings.kid_subset, seed=self.settings.seed)
        return {"mean": mean, "std": std}

    def _attributes_of(self, pid: str, index_rows: dict[str, int]) -> dict[str, Any]:
        row = self.index.product_rows([index_rows[pid]])[0]
        return {k: v for k, v in row.items() if k != "id"}

    def _real_per_condition(self, attrs, test, rng) -> dict[str, Any]:
        """Up to `samples` held-out products of each condition, judged like generated ones."""
        asked, chosen, sizes = [], [], []
        for condition in self.conditions:
            rows = [i for i in test if all(attrs[i][g] == v for g, v in condition.items())]
            rows = list(rng.choice(rows, size=min(self.settings.samples, len(rows)), replace=False)) if rows else []
            chosen += rows
            asked += [condition] * len(rows)
            sizes.append(len(rows))
        features, probs = self.judge.run(self.images[chosen]) if chosen else (np.zeros((0, 1)), {})
        return {"asked": asked, "features": features, "probs": probs, "sizes": sizes}

    def _condition_measures(self, asked, features, probs, sizes) -> dict[str, Any]:
        """Accuracy (all, seen, held-out), diversity, and per-condition rows over the conditions."""
        judged = self.judge.answers(probs) if len(asked) else []
        out: dict[str, Any] = {"accuracy": score(asked, judged, self.groups) if asked else None}
        if self.held_out:
            for label, keep in (("seen", lambda c: c not in self.held_out), ("held_out", lambda c: c in self.held_out)):
                pairs = [(a, p) for a, p in zip(asked, judged) if keep(a)]
                out[f"accuracy_{label}"] = score(*map(list, zip(*pairs)), self.groups) if pairs else None
        per_condition, diversities, start = [], [], 0
        for condition, n in zip(self.conditions, sizes):
            block = slice(start, start + n)
            start += n
            entry = {"condition": condition, "images": n, "held_out": condition in self.held_out}
            if n:
                entry["accuracy"] = score(asked[block], judged[block], self.groups)
                entry["diversity"] = mean_pairwise_cosine_distance(features[block])
                entry["judged"] = {g: Counter(p[g] for p in judged[block]).most_common(1)[0][0] for g in self.groups}
                if n >= 2:
                    diversities.append(entry["diversity"])
            per_condition.append(entry)
        out["diversity"] = float(np.mean(diversities)) if diversities else None
        out["per_condition"] = per_condition
        return out

    def _evaluate_model(self, name, model, asked_mix, real_features, real_classes, real_stats, inception,
                        inception_real, inception_real_stats):
        s = self.settings
        images, seconds = generate(model, asked_mix, s.seed, s.batch_size, s.progress, desc=f"{name}: sampling")
        features, probs = self.judge.run(images)
        result: dict[str, Any] = {"family": model.family, "image_size": model.image_size}
        loaded = self.service.models[name]
        training = loaded.manifest.get("training", {})
        result.update(version=loaded.manifest["version"], weights_sha256=loaded.manifest.get("weights_sha256"),
                      sampling=loaded.manifest.get("sampling", {}),
                      training_seconds=training.get("seconds"),
                      images_seen=training.get("images_seen"), held_out=training.get("held_out", []))
        result["sampling_images_per_second"] = len(images) / max(seconds, 1e-9)
        result["inception_score"] = {g: self._is(probs[g]) for g in self.groups}
        result["fid_judge"] = frechet_distance(FeatureStatistics.of(features), real_stats)
        intra = _intra_class_fid(features, [a[self.class_group] for a in asked_mix], real_features, real_classes)
        result["intra_fid_judge"] = {"mean": float(np.mean(list(intra.values()))) if intra else None,
                                     "per_class": intra}
        result["images"] = len(images)
        if inception:
            mine = inception.features(images[: s.fid_images], progress=s.progress)
            result["fid_inception"] = frechet_distance(FeatureStatistics.of(mine), inception_real_stats)
            result["kid_inception"] = self._kid(mine, inception_real)
            result["precision_recall_inception"] = precision_recall(inception_real, mine)
            result["fid_images"] = len(mine)
        del images
        # per condition: `samples` images each (seeds fixed per condition), judged
        asked, chunks = [], []
        for i, condition in enumerate(self.conditions):
            chunk, _ = generate(model, [condition] * s.samples, s.seed + 1_000_000 * (i + 1), s.batch_size)
            chunks.append(chunk)
            asked += [condition] * s.samples
        grid_images = np.concatenate(chunks)
        grid_features, grid_probs = self.judge.run(grid_images)
        result.update(self._condition_measures(asked, grid_features, grid_probs, [s.samples] * len(self.conditions)))
        visuals = {"grid_png": image_grid(np.stack([c[0] for c in chunks]), columns=min(8, len(chunks))),
                   "conditions": [{"condition": c, "samples_png": image_grid(chunk[:8], columns=8),
                                   "judged": entry.get("judged"), "retrieved": []}
                                  for c, chunk, entry in zip(self.conditions, chunks, result["per_condition"])]}
        return result, visuals

    def _retrieval(self, splits: dict[str, str]) -> dict[str, Any]:
        """`evaluate_retrieval` once per seed (a new z per request, another real query image, other
        random products), pooled: every condition asked `retrieval_repeats` times."""
        s = self.settings
        runs = [evaluate_retrieval(self.service, list(self.models), self.conditions, s.ks, s.seed + r,
                                   progress=s.progress, num_samples=s.retrieval_samples, splits=splits)
                for r in range(s.retrieval_repeats)]
        pooled = dict(runs[0])
        pooled["seed"] = [run["seed"] for run in runs]
        pooled["queries"] = sum(run["queries"] for run in runs)
        pooled["queries_per_method"] = {m: sum(run["queries_per_method"][m] for run in runs) for m in runs[0]["methods"]}
        pooled["per_condition"] = {m: [e for run in runs for e in run["per_condition"][m]] for m in runs[0]["methods"]}
        pooled["methods"] = {}
        for method, entries in pooled["per_condition"].items():
            pooled["methods"][method] = {g: {k: float(np.mean([e["precision"][g][k] for e in entries]))
                                             for k in map(str, s.ks)} for g in [*self.groups, ALL]}
        pooled["seconds"] = {m: sum(run["seconds"][m] for run in runs) for m in runs[0]["seconds"]}
        return pooled

    def _retrieval_by_split(self, retrieval: dict[str, Any]) -> dict[str, Any]:
        """Mean precision over the seen and the held-out conditions, per method, group and k."""
        out: dict[str, Any] = {}
        for label, keep in (("seen", lambda c: c not in self.held_out), ("held_out", lambda c: c in self.held_out)):
            out[label] = {}
            for method, entries in retrieval["per_condition"].items():
                kept = [e["precision"] for e in entries if keep(e["condition"])]
                out[label][method] = {g: {k: float(np.mean([p[g][k] for p in kept])) if kept else None
                                          for k in map(str, self.settings.ks)} for g in [*self.groups, ALL]}
        return out


def compare_models(index_path: Path, catalogue_path: Path, models: Mapping[str, Path], judge_path: Path,
                   settings: EvalSettings | None = None, sampling: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`sampling`: per model name, sampling options of its family (e.g. fewer ODE steps)."""
    return Evaluation(index_path, catalogue_path, models, judge_path, settings or EvalSettings(), sampling).run()


# -- writing ------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows): the Markdown and the HTML show the same ones."""
    groups, cls = report["groups"], report["class_group"]
    both = [*groups, ALL] if len(groups) > 1 else groups  # "all" repeats the group when there is one
    results = report["results"]
    out = []
    judge = report["judge"]
    out.append((f"Judge ({judge['architecture']}, {judge['input_size']} px, trained on {judge['trained_on']}): "
                "held-out accuracy", [*judge["test_accuracy"]], [[_f(a) for a in judge["test_accuracy"].values()]]))
    inception = report["fid_network"] is not None
    head = ["model", f"IS ({cls})", "FID (judge)", "intra-FID (judge)"]
    head += ["FID (Inception)", "KID x1e3 (Inception)", "precision / recall (Inception)"] if inception else []
    head += [*(f"{g} acc." for g in both), "diversity"]
    rows = []
    for name, r in results.items():
        row = [name, f"{_f(r['inception_score'][cls]['mean'], 2)} ± {_f(r['inception_score'][cls]['std'], 2)}",
               _f(r.get("fid_judge"), 2), _f((r.get("intra_fid_judge") or {}).get("mean"), 2)]
        if inception:
            kid = r.get("kid_inception")
            # with as many images as the subset size every subset is the whole set: no spread to show
            spread = f" ± {_f(kid['std'] * 1e3, 1)}" if kid and kid["std"] > 1e-9 else ""
            pr = r.get("precision_recall_inception")
            row += [_f(r.get("fid_inception"), 1), f"{_f(kid['mean'] * 1e3, 1)}{spread}" if kid else "-",
                    f"{_f(pr['precision'])} / {_f(pr['recall'])}" if pr else "-"]
        accuracy = r.get("accuracy") or {}
        row += [*(_f(accuracy.get(g)) for g in both), _f(r.get("diversity"))]
        rows.append(row)
    out.append(("Generation (real products: held-out images; their FID row is the train split against them)",
                head, rows))
    retrieval = report["retrieval"]
    ks = [str(k) for k in retrieval["ks"]]
    head = ["method", *(f"{g} p@{k}" for g in both for k in ks)]
    rows = [[m, *(_f(p[g][k]) for g in both for k in ks)] for m, p in retrieval["methods"].items()]
    out.append((f"Retrieval: attribute precision@k over {retrieval['queries']} requests "
                f"({len(report['conditions'])} combinations x {report['settings']['retrieval_repeats']} seeds)",
                head, rows))
    if report.get("retrieval_by_split"):
        k = "5" if "5" in ks else ks[0]  # one cut-off: 5 unless the run did not ask for it
        head = ["model", "conditions", *(f"{g} acc." for g in groups), "all acc.", *(f"{g} p@{k}" for g in [*groups, ALL])]
        rows = []
        for name, r in results.items():
            if name == REAL:
                continue
            for label in ("seen", "held_out"):
                accuracy = r.get(f"accuracy_{label}") or {}
                precision = report["retrieval_by_split"][label].get(name, {})
                rows.append([name, label.replace("_", "-"), *(_f(accuracy.get(g)) for g in groups),
                             _f(accuracy.get("all")), *(_f(precision.get(g, {}).get(k)) for g in [*groups, ALL])])
        out.append((f"Compositional hold-out: {', '.join('/'.join(c.values()) for c in report['held_out'])}",
                    head, rows))
    return out


def format_markdown(report: dict[str, Any]) -> str:
    parts = []
    for title, head, rows in tables(report):
        parts.append(f"**{title}**\n\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head) + "\n"
                     + "\n".join("| " + " | ".join(r) + " |" for r in rows))
    return "\n\n".join(parts)


def write_report(report: dict[str, Any], visuals: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md and report.html in `out` (each written whole, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    for key, text in (("json", json.dumps(report, indent=2, default=float)), ("markdown", format_markdown(report) + "\n")):
        partial = paths[key].with_suffix(paths[key].suffix + ".partial")
        partial.write_text(text)
        os.replace(partial, paths[key])
    settings = {"catalogue": report["catalogue"], "index": report["index_version"], "embedder": report["embedder"]["name"],
                "judge": report["judge"]["architecture"], **{k: v for k, v in report["settings"].items() if k != "progress"}}
    write_html({"title": f"atelier eval: {report['catalogue']}", "settings": settings, "tables": tables(report)},
               visuals, paths["html"])
    return paths
