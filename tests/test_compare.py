"""`atelier eval` end to end on real Fashion Product Images rows: an independent judge, IS, FID,
conditioning accuracy, retrieval precision against the baselines, and a compositional hold-out."""

import json

import numpy as np
import pytest

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
    code = main([*args, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and f"| {REAL} |" in printed and "FID (Inception)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["fid_network"]["sha256"] and report["results"]["tiny"]["fid_inception"] > 0
    assert "kid_inception" in report["results"]["tiny"] and report["results"]["tiny"]["fid_images"] == 8
    pr = report["results"]["tiny"]["precision_recall_inception"]
    assert set(pr) == {"precision", "recall", "density", "coverage"} and 0 <= pr["precision"] <= 1
    assert "precision_recall_inception" in report["results"][REAL] and "precision / recall (Inception)" in printed
    # the real images' features were cached (test rows, train rows); a second run reads them back
    cached = sorted(cache.glob("*.npy"))
    assert len(cached) == 2 and all(np.load(f).shape == (8, 2048) for f in cached)
    for f in cached:
        np.save(f, np.load(f) + 1.0)  # the same shift on both sides: the floor FID stays, KID too
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
