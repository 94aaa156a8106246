"""Attribute precision@k of GenerateAndRetrieve and its baselines, and the HTML report.

Real pieces only: the shared Fashion-MNIST index (FAISS, mobilenet_v2 vectors), the real
RetrievalService with the tiny generator; two derived indexes reuse that index's own vectors
(one with a split column, one relabelled half and half), published the reindex job's way
(`conftest.publish_vectors`).
"""

import base64
import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from atelier.catalog.catalogue import Catalogue
from atelier.catalog.images import encode_png, image_grid
from atelier.evaluation.report_html import write_html
from atelier.evaluation.retrieval_quality import (
    BASELINES,
    METADATA,
    RANDOM,
    REAL_IMAGE,
    evaluate_retrieval,
    generated_queries,
    metadata_filter,
    query_by_real_image,
    random_products,
)
from atelier.indexer.index_directory import IndexDirectory
from tests.conftest import publish_vectors


def _derived_index(base: IndexDirectory, dest, products: pa.Table) -> IndexDirectory:
    """The base index's own vectors under another product table (same rows, same order)."""
    vectors = base.vectors(np.arange(len(base)))
    publish_vectors(dest, vectors, products, base.embedder, base.schema, base.manifest["catalogue"])
    return IndexDirectory.open(dest)


@pytest.fixture(scope="module")
def index(small_index):
    return IndexDirectory.open(small_index)


@pytest.fixture(scope="module")
def splits(small_catalogue):
    table = Catalogue.open(small_catalogue).attributes()
    return dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))


@pytest.fixture(scope="module")
def split_index(tmp_path_factory, index, splits):
    ids = index.products.column("id").to_pylist()
    products = index.products.append_column("split", pa.array([splits[i] for i in ids]))
    return _derived_index(index, tmp_path_factory.mktemp("split") / "index", products)


@pytest.fixture(scope="module")
def half_index(tmp_path_factory, index):
    n = len(index)
    category = pa.array(["Coat" if r % 2 == 0 else "Bag" for r in range(n)])
    products = index.products.set_column(index.products.column_names.index("category"), "category", category)
    return _derived_index(index, tmp_path_factory.mktemp("half") / "index", products)


# -- precision@k by hand ----------------------------------------------------------------------


# -- the baselines on a real index ------------------------------------------------------------
def test_metadata_filter_is_exact_and_short_where_few_products_match(index):
    counts = Counter(index.products.column("category").to_pylist())
    common, few = counts.most_common()[0], counts.most_common()[-1]
    assert common[1] >= 10
    run = metadata_filter(index, [{"category": common[0]}], k=10, seed=3)
    assert len(run.results[0]) == 10 and len({p["id"] for p in run.results[0]}) == 10
    assert run.precision(["category"], ks=(1, 5, 10))["category"] == {1: 1.0, 5: 1.0, 10: 1.0}
    k = few[1] + 5  # more than there are
    short = metadata_filter(index, [{"category": few[0]}], k=k, seed=3)
    assert len(short.results[0]) == few[1]
    assert short.precision(["category"], ks=(k,))["category"][k] == pytest.approx(few[1] / k)
    assert metadata_filter(index, [{"category": common[0]}], k=10, seed=3).results == run.results  # seeded


def test_random_products_score_the_share_of_the_value(half_index):
    conditions = [{"category": "Coat"}] * 200
    run = random_products(half_index, conditions, k=10, seed=0)
    assert all(len({p["id"] for p in products}) == 10 for products in run.results)
    p = run.precision(["category"], ks=(10,))["category"][10]
    assert p == pytest.approx(0.5, abs=0.05)
    assert random_products(half_index, conditions, k=10, seed=0).results == run.results
    assert random_products(half_index, conditions, k=10, seed=1).results != run.results


def test_query_by_real_image_queries_held_out_products_and_never_returns_them(split_index, index, splits):
    categories = sorted(set(index.products.column("category").to_pylist()))
    conditions = [{"category": c} for c in categories]
    run = query_by_real_image(split_index, conditions, k=5, seed=0)
    assert run.note is None and not run.skipped and len(run.results) == len(conditions)
    by_id = {row["id"]: row for row in split_index.products.to_pylist()}
    for condition, query, products in zip(run.conditions, run.query_ids, run.results):
        assert by_id[query]["split"] == "test" and by_id[query]["category"] == condition["category"]
        assert len(products) == 5 and query not in {p["id"] for p in products}
    # the same from the catalogue's splits on the index without a split column
    same = query_by_real_image(index, conditions, k=5, seed=0, splits=splits)
    assert same.query_ids == run.query_ids and [[p["id"] for p in r] for r in same.results] == \
        [[p["id"] for p in r] for r in run.results]
    # neither: any product may be the query, and the result says so
    anywhere = query_by_real_image(index, conditions, k=5, seed=0)
    assert "no 'split' column" in anywhere.note
    # a condition with no held-out product is skipped and counted
    coats_only = {pid: ("test" if by_id[pid]["category"] == "Coat" else "train") for pid in by_id}
    some = query_by_real_image(index, [{"category": "Coat"}, {"category": "Bag"}], k=5, seed=0, splits=coats_only)
    assert some.conditions == [{"category": "Coat"}] and some.skipped == [{"category": "Bag"}]
    assert len(some.results) == 1 and len(some.query_ids) == 1


# -- GenerateAndRetrieve, in process ----------------------------------------------------------
def test_generated_queries_repeat_for_a_seed(service):
    conditions = [{"category": "Coat"}, {"category": "Sneaker"}]
    first = generated_queries(service, "cgan", conditions, k=5, num_samples=2, seed=4)
    again = generated_queries(service, "cgan", conditions, k=5, num_samples=2, seed=4, return_images=True)
    assert [[p["id"] for p in r] for r in first.results] == [[p["id"] for p in r] for r in again.results]
    assert all(len(r) == 5 and all("category" in p for p in r) for r in first.results)
    assert first.seeds == again.seeds and len(set(first.seeds)) == 2
    assert [im.shape for im in again.images] == [(2, 28, 28, 1)] * 2 and first.images is None
    alone = generated_queries(service, "cgan", conditions[1:], k=5, num_samples=2, seed=4)  # position-free seeds
    assert alone.results == first.results[1:]
    default = generated_queries(service, "cgan", conditions[:1], k=5, seed=4, return_images=True)
    assert default.images[0].shape[0] == service.limits.default_num_samples


def test_evaluate_retrieval_scores_every_method_and_is_json(service, splits):
    conditions = [{"category": "Coat"}, {"category": "Trouser"}, {"category": "Bag"}]
    result = evaluate_retrieval(service, ["cgan"], conditions, ks=(1, 5, 10), seed=0, progress=False, num_samples=2,
                                splits=splits)
    assert json.loads(json.dumps(result)) == result
    assert list(result["methods"]) == [*BASELINES, "cgan"] and result["ks"] == [1, 5, 10]
    assert result["groups"] == ["category"] and result["queries"] == 3
    for method, precision in result["methods"].items():
        assert set(precision) == {"category", "all"}
        assert all(set(per_k) == {"1", "5", "10"} and all(0 <= p <= 1 for p in per_k.values())
                   for per_k in precision.values())
        assert len(result["per_condition"][method]) == result["queries_per_method"][method] == 3
    assert result["methods"][METADATA]["all"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    assert not result["notes"] and not result["skipped"]
    entry = result["per_condition"]["cgan"][0]
    assert entry["condition"] == {"category": "Coat"} and len(entry["retrieved_ids"]) == 10 and "seed" in entry
    assert "query_id" in result["per_condition"][REAL_IMAGE][0]
    again = evaluate_retrieval(service, ["cgan"], conditions, ks=(1, 5, 10), seed=0, progress=False, num_samples=2,
                               splits=splits)
    assert again["per_condition"] == result["per_condition"]
    assert list(result["methods"]) == [*BASELINES, "cgan"] and result["methods"][METADATA]["category"]["1"] == 1.0


def test_a_models_precision_at_k_scores_the_request_that_asked_for_k(half_index, tiny_model):
    """precision@5 is scored on a top-5 request, not on the first 5 of the top-10 answer."""
    from atelier.retrieval.precision import precision_at_k
    from atelier.retrieval.service import RetrievalService

    relabelled = RetrievalService.open(half_index.path, {"cgan": tiny_model})
    asked_for, answer = [], relabelled.generate_and_retrieve

    def observed(request):  # the real call, with the top_k of each request written down
        asked_for.append((request.attributes["category"], request.top_k))
        return answer(request)

    relabelled.generate_and_retrieve = observed
    conditions = [{"category": "Coat"}, {"category": "Bag"}]
    result = evaluate_retrieval(relabelled, ["cgan"], conditions, ks=(1, 5, 10), seed=2, progress=False,
                                num_samples=3)
    assert sorted(asked_for) == sorted((c["category"], k) for c in conditions for k in (1, 5, 10))
    relabelled.generate_and_retrieve = answer
    for k in (1, 5, 10):
        asked = generated_queries(relabelled, "cgan", conditions, k=k, num_samples=3, seed=2)
        assert all(len(r) == k for r in asked.results)
        expected = precision_at_k(asked.results, conditions, ["category"], (k,))["category"][k]
        assert result["methods"]["cgan"]["category"][str(k)] == pytest.approx(expected)
        for entry, products in zip(result["per_condition"]["cgan"], asked.results):
            one = precision_at_k([products], [entry["condition"]], ["category"], (k,))["category"][k]
            assert entry["precision"]["category"][str(k)] == pytest.approx(one)
    # the retrieved ids shown are the largest k's answer
    top = generated_queries(relabelled, "cgan", conditions, k=10, num_samples=3, seed=2)
    assert [e["retrieved_ids"] for e in result["per_condition"]["cgan"]] == \
        [[p["id"] for p in r] for r in top.results]


def test_evaluate_retrieval_notes_a_missing_split_and_refuses_bad_requests(service):
    result = evaluate_retrieval(service, ["cgan"], [{"category": "Bag"}], ks=(1,), progress=False, num_samples=1)
    assert result["per_condition"][RANDOM][0]["condition"] == {"category": "Bag"}
    assert REAL_IMAGE in result["notes"]  # the shared index has no split column
    with pytest.raises(ValueError, match="clash"):
        evaluate_retrieval(service, [METADATA], [{"category": "Coat"}], progress=False)
    with pytest.raises(ValueError, match="max_top_k"):
        evaluate_retrieval(service, ["cgan"], [{"category": "Coat"}], ks=(1, 1000), progress=False)
    with pytest.raises(ValueError, match="lacks"):
        evaluate_retrieval(service, ["cgan"], [{"colour": "Red"}], progress=False)


# -- the HTML report --------------------------------------------------------------------------
def _png(value: int) -> bytes:
    return encode_png(np.full((8, 8, 1), value, dtype=np.uint8))


def test_html_report_inlines_images_marks_hits_and_escapes(tmp_path):
    strip = _png(10)
    visuals = {
        "cgan": {"grid_png": _png(20), "conditions": [{
            "condition": {"category": "Coat"}, "samples_png": strip, "judged": {"category": "Bag"},
            "retrieved": [{"id": "p1", "png": _png(30), "attributes": {"category": "Coat"}},
                          {"id": "p2", "png": np.zeros((8, 8, 3), dtype=np.uint8), "attributes": {"category": "Bag"}}],
        }]},
        "mcgan-v2": {"grid_png": None, "conditions": [{
            "condition": {"category": "<script>alert(1)</script>"}, "samples_png": strip, "judged": None,
            "retrieved": [{"id": "p3", "png": _png(40), "attributes": {"category": "<script>alert(1)</script>"}}],
        }]},
    }
    report = {"title": "Retrieval <quality>", "settings": {"index": "fm-small", "ks": [1, 5]},
              "tables": [("attribute precision", ["method", "all P@1"], [["random products", "0.100"]]),
                         {"title": "as markdown", "markdown": "| a | b |"}]}
    out = tmp_path / "reports" / "retrieval.html"
    assert write_html(report, visuals, out) == out
    assert [p.name for p in out.parent.iterdir()] == ["retrieval.html"]  # no temporary file left
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Retrieval &lt;quality&gt;" in page
    assert "model: cgan" in page and "model: mcgan-v2" in page
    assert "category: Coat" in page and "attribute precision" in page and "<td>random products</td>" in page
    assert page.count('<figure class="hit">') == 2 and page.count('<figure class="miss">') == 1  # p1, p3 / p2
    assert '<li class="miss">category: Bag' in page  # the judged attributes are marked too
    assert "&#10003; hit" in page and "&#10007; miss" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 + 2 * 1 + 2 + 1  # grid, two strips, three products
    assert base64.b64decode(images[1]) == strip


def test_html_report_from_a_real_evaluation(tmp_path, service, small_catalogue):
    conditions = [{"category": "Coat"}, {"category": "Sandal"}]
    result = evaluate_retrieval(service, ["cgan"], conditions, ks=(1, 5), progress=False, num_samples=2)
    run = generated_queries(service, "cgan", conditions, k=5, num_samples=2, return_images=True)
    assert [[p["id"] for p in r] for r in run.results] == \
        [e["retrieved_ids"] for e in result["per_condition"]["cgan"]]  # a condition re-run alone repeats
    images, rows = Catalogue.open(small_catalogue).load_images()
    by_id = {pid: i for i, pid in enumerate(rows.column("id").to_pylist())}
    visuals = {"cgan": {"grid_png": encode_png(image_grid(np.concatenate(run.images), columns=4)), "conditions": [
        {"condition": condition, "samples_png": encode_png(image_grid(samples, columns=len(samples))), "judged": None,
         "retrieved": [{"id": p["id"], "png": encode_png(images[by_id[p["id"]]]),
                        "attributes": {k: v for k, v in p.items() if k != "id"}} for p in products]}
        for condition, samples, products in zip(run.conditions, run.images, run.results)]}}
    header = ["method", "category P@1"]
    rows_ = [[m, f"{p['category']['1']:.3f}"] for m, p in result["methods"].items()]
    out = write_html({"title": "fm-small", "tables": [("precision", header, rows_)]}, visuals, tmp_path / "r.html")
    page = out.read_text()
    assert "category: Sandal" in page and "<td>metadata filter</td>" in page
    assert page.count("data:image/png;base64,") == 1 + 2 + 10

