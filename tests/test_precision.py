"""Attribute precision@k by hand: per group, for all groups, missing results, multi-label values."""

import pytest

from atelier.retrieval.precision import precision_at_k


def test_precision_per_group_and_for_all_groups():
    retrieved = [
        [{"category": "Coat", "colour": "Red"}, {"category": "Coat", "colour": "Blue"}, {"category": "Bag", "colour": "Red"}],
        [{"category": "Bag", "colour": "Red"}],  # one result: below it, misses
    ]
    asked = [{"category": "Coat", "colour": "Red"}, {"category": "Bag", "colour": "Blue"}]
    p = precision_at_k(retrieved, asked, ["category", "colour"], ks=(1, 2, 3))
    assert p["category"] == pytest.approx({1: 1.0, 2: (2 / 2 + 1 / 2) / 2, 3: (2 / 3 + 1 / 3) / 2})
    assert p["colour"] == pytest.approx({1: 0.5, 2: (1 / 2 + 0) / 2, 3: (2 / 3 + 0) / 2})
    assert p["all"] == pytest.approx({1: 0.5, 2: 0.25, 3: (1 / 3) / 2})


def test_precision_counts_missing_results_as_misses():
    p = precision_at_k([[{"category": "Coat"}, {"category": "Coat"}]], [{"category": "Coat"}], ["category"], ks=(1, 2, 10))
    assert p["category"] == {1: 1.0, 2: 1.0, 10: 0.2}
    assert precision_at_k([[]], [{"category": "Coat"}], ["category"], ks=(5,))["all"] == {5: 0.0}


def test_precision_of_multi_label_groups_and_unasked_groups():
    products = [{"texture": ["floral", "striped"], "category": "Dress"}, {"texture": [], "category": "Dress"},
                {"texture": ["floral"], "category": "Shirt"}, {"texture": None}]
    one = precision_at_k([products], [{"texture": "floral"}], ["category", "texture"], ks=(1, 4))
    assert one["texture"] == {1: 1.0, 4: 0.5}
    assert one["all"] == {1: 1.0, 4: 0.5}  # "all" covers the groups the query asks
    assert one["category"] == {1: None, 4: None}  # no query asks it
    both = precision_at_k([products], [{"texture": ["floral", "striped"], "category": "Dress"}], ["category", "texture"],
                          ks=(4,))
    assert both["texture"] == {4: 0.25} and both["category"] == {4: 0.5} and both["all"] == {4: 0.25}
    with pytest.raises(ValueError, match="2 result lists for 1 conditions"):
        precision_at_k([products, products], [{"texture": "floral"}], ["texture"])
