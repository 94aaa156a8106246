"""`atelier eval-missing`: blanking metadata for a fraction of the products, the three methods
(metadata filter, GenerateAndRetrieve, hybrid) and capped recall@k. Served on a small real
two-group index: Fashion-MNIST images with their category and a second group, `shade` (light
or dark by mean grey level), embedded by mobilenet_v2, with a tiny CGAN trained on both."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.evaluation.missing_metadata import (
    FILTER,
    GENERATED,
    HYBRID,
    METHODS,
    MissingSettings,
    blank_products,
    blanked_index,
    blanked_mask,
    capped_recall,
    check_settings,
    evaluate_missing,
    open_service,
    served_copy,
)
from atelier.evaluation.summary import MISSING_METADATA, headline_table
from atelier.indexer.index_directory import IndexDirectory
from atelier.retrieval.service import RetrievalRequest

SHADES = ("light", "dark")
FAST = dict(k=5, samples=2, min_products=4, progress=False)  # small requests: the behaviour, not the figures


# -- blanking and the metric, without a model ---------------------------------------------------


def products_table(n: int) -> pa.Table:
    return pa.table({"id": [f"sku-{i:05d}" for i in range(n)], "type": [("Top", "Dress")[i % 2] for i in range(n)],
                     "colour": [("Red", "Blue", "Green")[i % 3] for i in range(n)]})


def test_blanking_is_deterministic_nested_and_touches_only_that_group():
    table = products_table(2000)
    masks = {}
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        blanked = blank_products(table, "colour", fraction, seed=3)
        again = blank_products(table, "colour", fraction, seed=3)
        assert blanked.equals(again)  # the same products every time
        nulls = np.asarray(blanked.column("colour").is_null().to_numpy(zero_copy_only=False))
        masks[fraction] = nulls
        np.testing.assert_array_equal(nulls, blanked_mask(table.column("id").to_pylist(), fraction, seed=3))
        assert blanked.column("type").equals(table.column("type")) and blanked.column("id").equals(table.column("id"))
        kept = ~nulls  # the values left are the true ones
        assert np.asarray(blanked.column("colour").to_pylist(), dtype=object)[kept].tolist() == \
            np.asarray(table.column("colour").to_pylist(), dtype=object)[kept].tolist()
    assert not masks[0.0].any() and masks[1.0].all()
    for small, large in ((0.25, 0.5), (0.5, 0.75)):
        assert not (masks[small] & ~masks[large]).any()  # nested: blanked at 0.25 stays blanked at 0.5
        assert masks[large].sum() > masks[small].sum()
    assert abs(masks[0.5].mean() - 0.5) < 0.05  # a hash, uniform enough that the fraction is about right
    other_seed = np.asarray(blank_products(table, "colour", 0.5, seed=4).column("colour").is_null())
    assert (other_seed != masks[0.5]).any()
    with pytest.raises(ValueError, match="no column 'size'; they have id, type, colour"):
        blank_products(table, "size", 0.5)


def test_capped_recall_on_a_hand_made_case():
    relevant = frozenset({"a", "b", "c"})
    assert capped_recall(["a", "x", "b", "y"], relevant, k=4) == pytest.approx(2 / 3)  # capped at 3, not 4
    assert capped_recall(["a", "b", "c"], relevant, k=10) == 1.0
    many = frozenset(f"p{i}" for i in range(20))
    assert capped_recall(["p1", "p2", "x", "p3"], many, k=4) == pytest.approx(3 / 4)  # capped at k
    assert capped_recall(["x", "y", "p1", "p2"], many, k=2) == 0.0  # only the first k count
    assert capped_recall([], many, k=4) == 0.0
    assert capped_recall(["a"], frozenset(), k=4) is None  # nothing to find: not scored


def test_groups_outside_the_schema_are_refused_naming_the_allowed_ones(small_index):
    index = IndexDirectory.open(small_index)  # Fashion-MNIST: the one group `category`
    with pytest.raises(ValueError, match="--pair group 'colour' is not a single-label group .*its groups: category"):
        check_settings(index, MissingSettings(pair=("category", "colour")))
    with pytest.raises(ValueError, match="two different groups .* of the index's: category"):
        check_settings(index, MissingSettings(pair=("category", "category")))
    with pytest.raises(ValueError, match="two different groups"):
        check_settings(index, MissingSettings(pair=("category",)))


# -- a small real two-group index -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory, idx_dir, mobilenet_weights):
    """(index folder, model folder): 240 Fashion-MNIST products with category and shade, indexed
    by mobilenet_v2 at 32 px, and a CGAN of both groups trained 4 steps."""
    from atelier.catalog.catalogue import write_catalogue
    from atelier.catalog.fashion_mnist import CLASS_NAMES, load_split
    from atelier.catalog.images import encode_png
    from atelier.generator.train import TrainConfig, train
    from atelier.indexer.runner import reindex

    root = tmp_path_factory.mktemp("missing")
    schema = AttributeSchema((AttributeGroup("category", CLASS_NAMES), AttributeGroup("shade", SHADES)))
    images, labels = load_split(idx_dir, "train")
    images, labels = images[:240], labels[:240]
    grey = images.reshape(len(images), -1).mean(axis=1)
    shade = [SHADES[int(g < np.median(grey))] for g in grey]
    batch = pa.record_batch({
        "id": [f"fm-{i:05d}" for i in range(len(images))], "split": ["train"] * len(images),
        "category": [CLASS_NAMES[int(k)] for k in labels], "shade": shade,
        "image": [encode_png(im[:, :, None]) for im in images]})
    write_catalogue(root / "catalogue", "fm-two-groups", schema, [batch], image_channels=1)
    reindex(root / "catalogue", root / "index", input_size=32, batch_size=64, progress=False)
    train(TrainConfig(catalogue=root / "catalogue", out=root / "model", epochs=1, batch_size=32, max_steps=4,
                      progress=False, model_overrides={"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}))
    return root / "index", root / "model"


@pytest.fixture(scope="module")
def report(two_groups):
    index, model = two_groups
    return evaluate_missing(index, {"tiny": model}, MissingSettings(pair=("category", "shade"), fractions=(0.5, 0.25),
                                                                    **FAST))


def test_a_blanked_index_is_served_with_its_own_metadata_and_the_same_vectors(two_groups):
    index, model = two_groups
    service = open_service(index, {"tiny": model}, MissingSettings(pair=("category", "shade")))
    blanked = served_copy(service, blanked_index(service.index, "shade", 0.5, seed=0))
    nulls = np.asarray(blanked.index.products.column("shade").is_null())
    assert 0 < nulls.sum() < len(nulls) and service.index.products.column("shade").null_count == 0
    ask = RetrievalRequest({"category": "Trouser", "shade": "dark"}, num_samples=2, top_k=8, seed=7)
    # the drawings and the unfiltered search read no metadata: the same products either way
    assert [p.id for p in blanked.generate_and_retrieve(ask).products] == \
        [p.id for p in service.generate_and_retrieve(ask).products]
    ask.filters = {"shade": ["dark"]}
    ids = blanked.index.products.column("id").to_pylist()
    for product in blanked.generate_and_retrieve(ask).products:  # a filter sees only the metadata left
        assert not nulls[ids.index(product.id)] and product.attributes["shade"] == "dark"
    ask.filters = {"shade": [""]}
    assert all(nulls[ids.index(p.id)] for p in blanked.generate_and_retrieve(ask).products)


def test_the_report_has_a_row_per_blanked_group_and_fraction_and_the_reference(report):
    assert report["pair"] == ["category", "shade"] and report["blank"] == ["category", "shade"]
    assert report["fractions"] == [0.25, 0.5] and list(report["results"]["shade"]) == ["0.25", "0.5"]
    assert report["requests"] == len(report["reference"]["per_pair"]) > 0
    for group in ("category", "shade"):
        a, b = (report["results"][group][f]["products_without_value"] for f in ("0.25", "0.5"))
        assert 0 < a < b < report["products"]
        for row in report["results"][group].values():
            assert set(row["recall"]) == set(METHODS)
            assert all(0.0 <= row["recall"][m] <= 1.0 for m in METHODS)
            assert len(row["per_pair"]) == report["requests"]
    assert min(e["products"] for e in report["reference"]["per_pair"]) >= FAST["min_products"]


def test_with_nothing_blanked_the_filter_finds_every_product_and_then_fewer(report):
    for entry in report["reference"]["per_pair"]:
        assert entry["recall"][FILTER] == 1.0 and entry["with_metadata"] == entry["products"]
        assert entry["returned"][FILTER] == min(FAST["k"], entry["products"])
    for by_fraction in report["results"].values():
        for row in by_fraction.values():
            for entry in row["per_pair"]:  # every product the filter returns is relevant: blanking only removes values
                assert entry["relevant_returned"][FILTER] == entry["returned"][FILTER] == \
                    min(FAST["k"], entry["with_metadata"])
                assert entry["with_metadata"] <= entry["products"]


def test_hybrid_never_returns_fewer_than_the_filter_and_keeps_what_it_found(report):
    rows = [report["reference"], *(row for by in report["results"].values() for row in by.values())]
    filled = 0
    for row in rows:
        for entry in row["per_pair"]:
            ids = entry["ids"]
            assert entry["returned"][HYBRID] >= entry["returned"][FILTER]
            assert entry["recall"][HYBRID] >= entry["recall"][FILTER]
            assert len(set(ids[HYBRID])) == len(ids[HYBRID])  # the fill skips ids already chosen
            if entry["returned"][FILTER] < FAST["k"]:  # the filter returned every product it matches
                assert set(ids[FILTER]) <= set(ids[HYBRID])
            filled += entry["hybrid_filled"]
            # the same drawings, unfiltered, whatever the metadata
            assert ids[GENERATED] == next(e for e in report["reference"]["per_pair"]
                                          if e["seed"] == entry["seed"])["ids"][GENERATED]
    assert filled > 0  # some pair lost metadata below k products, so the fill ran


def test_a_model_without_the_pair_s_groups_and_a_blank_outside_the_pair_are_refused(two_groups, tiny_model):
    index, model = two_groups
    with pytest.raises(ValueError, match=r"model 'fm' does not know group\(s\) \['shade'\]; its groups: category"):
        open_service(index, {"fm": tiny_model}, MissingSettings(pair=("category", "shade")))
    with pytest.raises(ValueError, match="--blank group 'colour' is not one of the --pair groups: category, shade"):
        open_service(index, {"tiny": model}, MissingSettings(pair=("category", "shade"), blank=("colour",)))
    with pytest.raises(ValueError, match=r"--fractions must lie in \(0, 1\]"):
        open_service(index, {"tiny": model}, MissingSettings(pair=("category", "shade"), fractions=(1.5,)))


def test_the_cli_writes_the_report_and_the_summary_entry(two_groups, report, tmp_path, capsys):
    from atelier.cli import main

    index, model = two_groups
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"fashion-mnist": {"model": "flow", "class_accuracy": 0.9}}))
    argv = ["eval-missing", "--index", str(index), "--model", f"tiny={model}", "--pair", "category,shade",
            "--fractions", "0.5,0.25", "--k", "5", "--samples", "2", "--min-products", "4", "--threads", "1",
            "--quiet", "--out", str(tmp_path / "out"), "--summary", str(summary)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| blanked | fraction | products without a value | metadata filter | generate-and-retrieve | hybrid |" in out
    assert "command: atelier eval-missing --index" in out
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    markdown = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 2 * 2 and rows[1].startswith("| none | 0 | 0 | 1.000 |")  # header, reference, 2 x 2
    for group, by_fraction in report["results"].items():  # the same products every run
        for key, row in by_fraction.items():
            assert [e["ids"] for e in written["results"][group][key]["per_pair"]] == [e["ids"] for e in row["per_pair"]]
    entry = json.loads(summary.read_text())[MISSING_METADATA]
    assert entry["blanked"] == "category" and entry["fraction_missing"] == 0.5 and entry["k"] == 5
    assert set(entry["recall_at_5"]) == set(METHODS) and set(entry["by_fraction"]["shade"]) == {"0.25", "0.5"}
    table = headline_table(json.loads(summary.read_text()))
    assert "| missing-metadata |" not in table and "| fashion-mnist |" in table
    assert table.splitlines()[-1].startswith("Metadata missing for 50% of products' category (`tiny`, fm-two-groups): "
                                             "recall@5 of the metadata filter ")
    assert main([*argv[:6], "category,colour", *argv[7:]]) == 2
    assert "atelier eval-missing: error: --pair group 'colour' is not a single-label group" in capsys.readouterr().err
