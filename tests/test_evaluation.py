"""Model comparison: the k-NN judge, diversity, and `atelier eval` on real products and real models."""

import json

import numpy as np
import pytest

from atelier.catalog.fashion_product_images import import_fashion_product_images
from atelier.cli import main
from atelier.evaluation.conditioning import KnnJudge, combinations_in_index, pairwise_diversity
from atelier.evaluation.compare import compare_models
from atelier.generator.train import TrainConfig, train
from atelier.indexer.index_directory import IndexDirectory
from atelier.indexer.runner import reindex

TINY = {"g_width": 4, "d_width": 8, "embed_dim": 8, "latent_dim": 16, "image_size": 32}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fpi_parquet, mobilenet_weights):
    root = tmp_path_factory.mktemp("eval")
    import_fashion_product_images(fpi_parquet, root / "apparel", "apparel-6x6", size=32, limit=240, progress=False)
    train(TrainConfig(catalogue=root / "apparel", out=root / "mcgan", model="mcgan", batch_size=16, max_steps=2,
                      progress=False, split=None, model_overrides=TINY))
    reindex(root / "apparel", root / "index", input_size=32, progress=False)
    return root


def test_judge_votes_among_neighbours_and_can_leave_a_product_out(stack):
    index = IndexDirectory.open(stack / "index")
    judge = KnnJudge.over(index, index.schema, k=1)
    assert judge.groups == ("type", "colour")
    rows = np.arange(20)
    vectors = index.vectors(rows)
    products = index.product_rows(rows.tolist())
    own = judge.predict(vectors)  # the nearest product of a product's own vector is itself
    assert own == [{"type": p["type"], "colour": p["colour"]} for p in products]
    _, neighbours = index.search(vectors, 2)
    others = index.product_rows(neighbours[:, 1].tolist())
    left_out = judge.predict(vectors, exclude_rows=rows)
    assert left_out == [{"type": p["type"], "colour": p["colour"]} for p in others]


def test_diversity_is_zero_for_copies_and_measures_pixel_differences():
    vectors = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (3, 1))
    images = np.zeros((3, 2, 2, 1), dtype=np.uint8)
    assert pairwise_diversity(vectors, images) == (pytest.approx(0.0, abs=1e-6), 0.0)
    images[1] = 30  # pairs: (0,1) 30, (0,2) 0, (1,2) 30 -> mean 20
    orthogonal = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)  # cosine distances 1, 0, 1 -> 2/3
    cosine, pixels = pairwise_diversity(orthogonal, images)
    assert cosine == pytest.approx(2 / 3) and pixels == pytest.approx(20.0)


def test_compare_scores_models_and_real_products_over_common_combinations(stack):
    index = IndexDirectory.open(stack / "index")
    conditions = combinations_in_index(index, index.schema, minimum=5)
    assert conditions and all(set(c) == {"type", "colour"} for c in conditions)
    report = compare_models(stack / "index", stack / "apparel", {"mcgan": stack / "mcgan"}, samples=3, minimum=5,
                            progress=False)
    assert report["conditions"] == conditions
    real, model = report["results"]["real products"], report["results"]["mcgan"]
    assert model["images"] == 3 * len(conditions) and model["family"] == "mcgan"
    for result in (real, model):
        assert set(result["accuracy"]) == {"type", "colour", "all"}
        assert all(0 <= v <= 1 for v in result["accuracy"].values())
        assert result["accuracy"]["all"] <= min(result["accuracy"]["type"], result["accuracy"]["colour"])
        assert result["diversity_cosine"] >= 0 and result["diversity_pixels"] >= 0
    assert real["diversity_pixels"] > 0  # different products differ


def test_eval_command_prints_the_table_and_writes_json(stack, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--model",
                 f"tiny={stack / 'mcgan'}", "--samples", "2", "--min-products", "5", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "| real products |" in printed and "type acc." in printed
    assert set(json.loads(out.read_text())["results"]) == {"real products", "tiny"}
    assert main(["eval", "--index", str(stack / "index"), "--catalogue", str(stack / "apparel"), "--model",
                 str(stack / "mcgan"), "--min-products", "100000", "--quiet"]) == 2
    assert "lower --min-products" in capsys.readouterr().err
