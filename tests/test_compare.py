"""`atelier eval` end to end on real Fashion Product Images rows: an independent judge, IS, FID,
conditioning accuracy, retrieval precision against the baselines, and a compositional hold-out."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from atelier import artifacts
from atelier.catalog.fashion_product_images import import_fashion_product_images
from atelier.cli import main
from atelier.evaluation.compare import REAL, EvalSettings, compare_models
from atelier.evaluation.conditioning import combinations_in_index, mean_pairwise_cosine_distance, score
from atelier.evaluation.retrieval_quality import BASELINES, METADATA
from atelier.generator.train import TrainConfig, train
from atelier.indexer.attribute_net import AttributeTrainConfig, train_attribute_net
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.runner import reindex

TINY = {"g_width": 4, "d_width": 8, "embed_dim": 8, "latent_dim": 16, "image_size": 32}
SMALL = EvalSettings(samples=3, min_products=4, is_images=40, is_splits=2, fid_images=0, retrieval_samples=2,
                     progress=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fpi_parquet, mobilenet_weights):
    root = tmp_path_factory.mktemp("eval")
    import_fashion_product_images(fpi_parquet, root / "apparel", "apparel-6x6", size=32, limit=400, progress=False)
    train(TrainConfig(catalogue=root / "apparel", out=root / "mcgan", model="mcgan", batch_size=16, max_steps=2,
                      progress=False, model_overrides=TINY, hold_out_groups=("type", "colour"),
                      hold_out_fraction=0.05, hold_out_min_rows=4))
    train(TrainConfig(catalogue=root / "apparel", out=root / "plain", model="mcgan", batch_size=16, max_steps=2,
                      progress=False, model_overrides=TINY))  # trained on every combination
    train_attribute_net(AttributeTrainConfig(root / "apparel", root / "judge", input_size=32, epochs=1,
                                             batch_size=32, progress=False))
    reindex(root / "apparel", root / "index", input_size=32, progress=False)
    return root


def test_scores_and_diversity_on_hand_made_values():
    asked = [{"type": "a", "colour": "x"}] * 4
    judged = [{"type": "a", "colour": "x"}, {"type": "a", "colour": "y"}, {"type": "b", "colour": "x"},
              {"type": "b", "colour": "y"}]
    assert score(asked, judged, ("type", "colour")) == {"type": 0.5, "colour": 0.5, "all": 0.25}
    same = np.tile([[3.0, 4.0]], (3, 1))
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=1e-9)
    orthogonal = np.array([[1.0, 0.0], [0.0, 2.0], [5.0, 0.0]])  # distances 1, 0, 1 -> mean 2/3
    assert mean_pairwise_cosine_distance(orthogonal) == pytest.approx(2 / 3)


def test_eval_grades_models_and_real_products_and_splits_the_hold_out(stack):
    report, visuals = compare_models(stack / "index", stack / "apparel", {"mcgan": stack / "mcgan"},
                                     stack / "judge", SMALL)
    index = IndexDirectory.open(stack / "index")
    held_out = report["held_out"]
    assert len(held_out) == 2  # 5% of 6 x 6 pairs
    assert report["conditions"] == combinations_in_index(index, index.schema, 4)
    assert all(c in report["conditions"] for c in held_out)
    real, model = report["results"][REAL], report["results"]["mcgan"]
    for result in (real, model):
        for group in ("type", "colour"):
            assert 1.0 <= result["inception_score"][group]["mean"] <= 6.0  # 6 values per group
        assert set(result["accuracy"]) == {"type", "colour", "all"}
        assert result["accuracy"]["all"] <= min(result["accuracy"]["type"], result["accuracy"]["colour"])
        assert result["accuracy_held_out"] is not None and result["accuracy_seen"] is not None
    assert model["images"] == 40 and model["fid_judge"] > 0 and real["fid_judge"] >= 0
    # per condition: samples judged, the majority answer, held-out flags
    rows = model["per_condition"]
    assert [r["condition"] for r in rows] == report["conditions"]
    assert sum(r["held_out"] for r in rows) == 2 and all(r["images"] == 3 for r in rows)
    # retrieval: every baseline and the model over the same conditions; the metadata filter is exact
    retrieval = report["retrieval"]
    assert set(retrieval["methods"]) == {*BASELINES, "mcgan"}
    exact = [e for e in retrieval["per_condition"][METADATA]]
    assert all(e["precision"]["all"]["1"] == 1.0 for e in exact)
    assert set(report["retrieval_by_split"]) == {"seen", "held_out"}
    assert visuals["mcgan"]["conditions"][0]["retrieved"][0]["attributes"].keys() >= {"type", "colour"}
    json.dumps(report, default=float)  # JSON-ready


def test_the_summary_takes_the_headline_models_figures_and_keeps_other_entries(stack, tmp_path):
    from atelier.evaluation.retrieval_quality import REAL_IMAGE
    from atelier.evaluation.summary import COMPOSITIONAL, summary_entries, update_summary

    report, _ = compare_models(stack / "index", stack / "apparel", {"plain": stack / "plain", "mcgan": stack / "mcgan"},
                               stack / "judge", SMALL)
    assert report["selection"] == "apparel-6x6"
    entries = summary_entries(report, "plain", "checkpoints/plain", "report.json")
    assert list(entries) == ["fashion-product-images"]  # the catalogue's name without its selection
    entry, plain, real = entries["fashion-product-images"], report["results"]["plain"], report["results"][REAL]
    assert entry["selection"] == "apparel-6x6" and entry["model"] == "plain" and entry["checkpoint"] == "checkpoints/plain"
    assert entry["accuracy"] == {"type": plain["accuracy"]["type"], "colour": plain["accuracy"]["colour"]}
    assert entry["real_accuracy"]["colour"] == real["accuracy"]["colour"]
    assert entry["diversity"] == plain["diversity"] and entry["real_diversity"] == real["diversity"]
    methods = report["retrieval"]["methods"]
    assert entry["precision_at_10"] == {g: methods["plain"][g]["10"] for g in ("type", "colour")}
    assert entry["real_image_precision_at_5"]["type"] == methods[REAL_IMAGE]["type"]["5"]
    assert entry["fid_inception"] is None and entry["settings"]["samples"] == SMALL.samples  # FID skipped here
    held = summary_entries(report, "mcgan", "checkpoints/mcgan")
    assert list(held) == [COMPOSITIONAL]
    assert held[COMPOSITIONAL]["seen_both_accuracy"] == report["results"]["mcgan"]["accuracy_seen"]["all"]
    assert held[COMPOSITIONAL]["held_out_both_accuracy"] == report["results"]["mcgan"]["accuracy_held_out"]["all"]
    with pytest.raises(ValueError, match="has no model 'nope'"):
        summary_entries(report, "nope", "x")

    path = tmp_path / "results" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"fashion-mnist": {"model": "flow"}}))
    update_summary(path, entries)
    merged = update_summary(path, held)
    assert json.loads(path.read_text()) == json.loads(json.dumps(merged, default=float))
    assert set(merged) == {"fashion-mnist", "fashion-product-images", COMPOSITIONAL}
    assert merged["fashion-mnist"] == {"model": "flow"}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        update_summary(path, entries)
    assert path.read_text() == "{not json"  # left as it was


def test_more_fid_images_than_drawings_is_refused(stack):
    with pytest.raises(ValueError, match="--fid-images 50 needs at least as many --is-images \\(got 40\\)"):
        compare_models(stack / "index", stack / "apparel", {"mcgan": stack / "mcgan"}, stack / "judge",
                       replace(SMALL, fid_images=50))


def test_a_judge_of_another_schema_is_refused(stack, tmp_path, small_catalogue):
    train_attribute_net(AttributeTrainConfig(small_catalogue, tmp_path / "fm-judge", input_size=32, epochs=1,
                                             limit=64, progress=False))
    with pytest.raises(ValueError, match="does not judge group 'type'"):
        compare_models(stack / "index", stack / "apparel", {"mcgan": stack / "mcgan"}, tmp_path / "fm-judge", SMALL)


def test_eval_command_writes_json_markdown_and_html_with_inception_fid(stack, tmp_path, capsys):
    from atelier.evaluation.fid_inception import FidWeightsUnavailable, locate_weights

    try:
        locate_weights()
    except FidWeightsUnavailable as error:
        from conftest import missing

        missing(str(error))
    out, cache = tmp_path / "report", tmp_path / "cache"
    args = ["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--judge",
            str(stack / "judge"), "--model", f"tiny={stack / 'mcgan'}", "--samples", "2", "--min-products", "4",
            "--is-images", "20", "--is-splits", "2", "--fid-images", "8", "--retrieval-samples", "2",
            "--feature-cache", str(cache), "--quiet"]
    summary = tmp_path / "summary.json"
    code = main([*args, "--out", str(out), "--summary", str(summary)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"-> {summary}" in printed
    written = json.loads(summary.read_text())["compositional"]
    assert written["command"].startswith("atelier eval ") and written["checkpoint"] == str(stack / "mcgan")
    # the same entry from the report afterwards, with the headline chosen then; other keys kept
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"fashion-mnist": {"model": "flow"}}))
    assert main(["summarize", "--report", str(out / "report.json"), "--headline", "tiny", "--summary", str(later)]) == 0
    assert json.loads(later.read_text()) == {"fashion-mnist": {"model": "flow"}, "compositional": written}
    assert main(["summarize", "--report", str(out / "report.json"), "--headline", "nope", "--summary", str(later)]) == 2
    assert "--headline ['nope'] not among the report's models ['tiny']" in capsys.readouterr().err
    old_report = tmp_path / "old.json"
    old_report.write_text(json.dumps({k: v for k, v in json.loads((out / "report.json").read_text()).items()
                                      if k != "models"}))
    assert main(["summarize", "--report", str(old_report), "--headline", "tiny", "--summary", str(later)]) == 2
    assert "does not say which checkpoint each model was" in capsys.readouterr().err
    assert json.loads(later.read_text())["compositional"] == written  # refused runs left it as it was
    assert "| tiny |" in printed and f"| {REAL} |" in printed and "FID (Inception)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["fid_network"]["sha256"] and report["results"]["tiny"]["fid_inception"] > 0
    assert "kid_inception" in report["results"]["tiny"] and report["results"]["tiny"]["fid_images"] == 8
    pr = report["results"]["tiny"]["precision_recall_inception"]
    assert set(pr) == {"precision", "recall", "density", "coverage"} and 0 <= pr["precision"] <= 1
    assert "precision_recall_inception" in report["results"][REAL] and "precision / recall (Inception)" in printed
    # the real images' features were kept per row (8 test rows, 8 train rows); a second run reads them back
    features, done = sorted(cache.glob("*.features.npy")), sorted(cache.glob("*.done.npy"))
    assert len(features) == len(done) == 1 and int(np.load(done[0]).sum()) == 16
    stored = np.load(features[0])
    assert stored.shape[1] == 2048 and np.abs(stored[np.load(done[0])]).sum() > 0
    np.save(features[0], stored + 1.0)  # the same shift on both sides: the floor FID stays, KID too
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["results"]
    assert again[REAL]["fid_inception"] == pytest.approx(report["results"][REAL]["fid_inception"], rel=1e-6)
    assert again["tiny"]["fid_inception"] != pytest.approx(report["results"]["tiny"]["fid_inception"], rel=1e-3)
    assert report["command"].startswith("atelier ")
    html = (out / "report.html").read_text()
    assert "tiny" in html and "data:image/png;base64," in html and "Compositional hold-out" in html
    assert "Compositional hold-out" in (out / "report.md").read_text()
    assert main(["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--judge",
                 str(stack / "judge"), "--model", str(stack / "mcgan"), "--min-products", "100000",
                 "--out", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "lower --min-products" in capsys.readouterr().err


def test_the_summary_may_name_a_copy_of_the_measured_checkpoint_and_refuses_another_model(stack, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--judge",
                 str(stack / "judge"), "--model", f"tiny={stack / 'mcgan'}", "--samples", "2", "--min-products", "4",
                 "--is-images", "20", "--is-splits", "2", "--fid-images", "0", "--retrieval-samples", "2",
                 "--quiet", "--out", str(out)]) == 0
    committed = tmp_path / "committed"  # what committing a run folder under checkpoints/ does
    shutil.copytree(artifacts.resolve(stack / "mcgan"), committed)
    longer = tmp_path / "longer"  # the same recipe one step further: other weights, another record
    train(TrainConfig(catalogue=stack / "apparel", out=longer, model="mcgan", batch_size=16, max_steps=3,
                      progress=False, model_overrides=TINY, hold_out_groups=("type", "colour"),
                      hold_out_fraction=0.05, hold_out_min_rows=4))
    summary = tmp_path / "summary.json"

    def summarize(report, *checkpoints):
        extra = [a for c in checkpoints for a in ("--checkpoint", c)]
        return main(["summarize", "--report", str(report), "--headline", "tiny", *extra, "--summary", str(summary)])

    assert summarize(out / "report.json", f"tiny={committed}") == 0
    entry = json.loads(summary.read_text())["compositional"]
    assert entry["checkpoint"] == str(committed) and entry["version"] == "committed"
    assert entry["measured_as"] == {"checkpoint": str(stack / "mcgan"),
                                    "version": artifacts.resolve(stack / "mcgan").name}
    capsys.readouterr()
    assert summarize(out / "report.json", f"tiny={longer}") == 2
    assert "is not the model the report measured as 'tiny': weights" in capsys.readouterr().err
    assert summarize(out / "report.json", f"other={committed}") == 2
    assert "--checkpoint ['other'] names no --headline model" in capsys.readouterr().err
    assert json.loads(summary.read_text())["compositional"] == entry  # refused runs left it as it was
    # a report from before reports kept the weights' hash: matched by the training record it kept
    old = json.loads((out / "report.json").read_text())
    del old["results"]["tiny"]["weights_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert summarize(tmp_path / "old.json", f"tiny={committed}") == 0
    assert summarize(tmp_path / "old.json", f"tiny={longer}") == 2
    assert "images seen 48 (measured 32)" in capsys.readouterr().err


def test_hold_out_removes_the_drawn_combinations_from_training_and_refuses_bad_options(stack, tmp_path):
    from atelier import artifacts
    from atelier.catalog.catalogue import Catalogue
    from atelier.generator.train import held_out_combinations

    catalogue = Catalogue.open(stack / "apparel")
    train_rows = catalogue.attributes(split="train").select(["type", "colour"]).to_pylist()
    training = artifacts.read_manifest(artifacts.resolve(stack / "mcgan"))["training"]
    held = training["held_out"]
    assert held == held_out_combinations(catalogue.schema, train_rows, ("type", "colour"), 0.05, 0, 4)  # repeatable
    assert training["rows"] == sum(1 for r in train_rows if r not in held)
    with pytest.raises(ValueError, match="not a single-label group"):
        held_out_combinations(catalogue.schema, train_rows, ("type", "size"), 0.1, 0, 4)
    with pytest.raises(ValueError, match="between 0 and 1"):
        held_out_combinations(catalogue.schema, train_rows, ("type", "colour"), 1.5, 0, 4)
    with pytest.raises(ValueError, match="lower --hold-out-min-rows"):
        held_out_combinations(catalogue.schema, train_rows, ("type", "colour"), 0.5, 0, 4)
    with pytest.raises(ValueError, match="repeat the original --hold-out"):  # a resume must hold out the same
        train(TrainConfig(catalogue=stack / "apparel", out=stack / "mcgan", model="mcgan", batch_size=16, max_steps=1,
                          progress=False, resume=True))


def test_eval_asks_only_the_given_groups_and_refuses_what_cannot_take_them(stack, tmp_path, small_catalogue):
    from dataclasses import replace

    report, _ = compare_models(stack / "index", stack / "apparel", {"plain": stack / "plain"}, stack / "judge",
                               replace(SMALL, groups=("colour",)))
    index = IndexDirectory.open(stack / "index")
    assert report["groups"] == ["colour"]
    assert report["conditions"] == combinations_in_index(index, index.schema, 4, ("colour",))
    assert all(list(c) == ["colour"] for c in report["conditions"])
    assert set(report["results"]["plain"]["accuracy"]) == {"colour", "all"}
    with pytest.raises(ValueError, match=r"--groups \['shade'\] are not single-label groups of the models; they have type, colour"):
        compare_models(stack / "index", stack / "apparel", {"plain": stack / "plain"}, stack / "judge",
                       replace(SMALL, groups=("shade",)))


def test_eval_writes_the_reports_figures_as_tensorboard_scalars_a_run_each(stack, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from atelier.evaluation.events import figures, write_events
    from atelier.evaluation.retrieval_quality import RANDOM

    out = tmp_path / "report"
    args = ["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--judge",
            str(stack / "judge"), "--model", f"tiny={stack / 'mcgan'}", "--samples", "2", "--min-products", "4",
            "--is-images", "20", "--is-splits", "2", "--fid-images", "0", "--retrieval-samples", "2",
            "--retrieval-repeats", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    folder = out / "tensorboard"
    assert {p.name for p in folder.iterdir()} == {"tiny", REAL, *BASELINES}

    def scalars(run: str) -> dict[str, list[tuple[int, float]]]:
        accumulator = EventAccumulator(str(folder / run))
        accumulator.Reload()
        return {t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in accumulator.Tags()["scalars"]}

    def f32(value: float) -> list[tuple[int, float]]:
        return [(0, float(np.float32(value)))]  # one point at step 0, stored as float32

    tiny, real, result = scalars("tiny"), scalars(REAL), report["results"]["tiny"]
    methods, by_split = report["retrieval"]["methods"], report["retrieval_by_split"]
    for group in ("type", "colour", "all"):
        assert tiny[f"accuracy/{group}"] == f32(result["accuracy"][group])
        assert tiny[f"accuracy_held_out/{group}"] == f32(result["accuracy_held_out"][group])
        assert real[f"accuracy/{group}"] == f32(report["results"][REAL]["accuracy"][group])
        for k in ("1", "5", "10"):
            assert tiny[f"precision_at_{k}/{group}"] == f32(methods["tiny"][group][k])
            assert tiny[f"precision_at_{k}_seen/{group}"] == f32(by_split["seen"]["tiny"][group][k])
    assert tiny["inception_score/type"] == f32(result["inception_score"]["type"]["mean"])
    assert tiny["fid/judge"] == f32(result["fid_judge"]) and tiny["diversity"] == f32(result["diversity"])
    assert tiny["training/images_seen"] == f32(result["images_seen"])
    assert real["fid/judge"] == f32(report["results"][REAL]["fid_judge"])  # the train split's floor
    assert real["diversity"] == f32(report["results"][REAL]["diversity"])
    assert "fid/inception" not in tiny  # --fid-images 0: no Inception network, no figure
    random = scalars(RANDOM)  # a baseline: its precision only
    assert random["precision_at_5/type"] == f32(methods[RANDOM]["type"]["5"])
    assert all(tag.startswith("precision_at_") for tag in random)
    # every run holds exactly figures(report), nothing else
    for run, expected in figures(report).items():
        assert scalars(run) == {tag: f32(value) for tag, value in expected.items()}, run
    # written whole: a rerun replaces the previous events instead of adding to them
    fewer = {**report, "results": {REAL: report["results"][REAL]}, "retrieval": None, "retrieval_by_split": None}
    write_events(fewer, folder)
    assert [p.name for p in folder.iterdir()] == [REAL]
    assert len(list((folder / REAL).glob("events.out.tfevents.*"))) == 1
    assert main([*args, "--out", str(tmp_path / "without"), "--no-tensorboard"]) == 0
    assert not (tmp_path / "without" / "tensorboard").exists() and (tmp_path / "without" / "report.json").is_file()
