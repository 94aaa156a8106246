"""The per-row store of real images' Inception features: computed once, kept batch by batch."""

import numpy as np
import pytest

from atelier.evaluation.feature_store import FeatureStore


def _features(rows: np.ndarray) -> np.ndarray:  # a stand-in network: a row's features are a function of it
    return np.stack([np.full(4, r, dtype=np.float64) + np.arange(4) for r in rows])


def test_rows_come_back_in_the_asked_order_and_are_computed_once(tmp_path):
    store = FeatureStore(tmp_path, "cat", "f" * 64, "a" * 64, rows=30, dim=4)
    calls = []

    def compute(rows):
        calls.append(list(rows))
        return _features(rows)

    rows = np.array([7, 3, 3, 12])
    assert np.array_equal(store.get(rows, compute, batch_size=2), _features(rows))
    assert sorted(r for c in calls for r in c) == [3, 7, 12] and store.computed() == 3
    calls.clear()
    assert np.array_equal(store.get(np.array([12, 5, 3]), compute), _features(np.array([12, 5, 3])))
    assert calls == [[5]]  # only the new row
    other = FeatureStore(tmp_path, "cat", "e" * 64, "a" * 64, rows=30, dim=4)  # another catalogue version
    assert other.computed() == 0


def test_a_run_killed_midway_keeps_the_batches_it_finished(tmp_path):
    store = FeatureStore(tmp_path, "cat", "f" * 64, "a" * 64, rows=100, dim=4)
    seen = []

    def dies_on_third_batch(rows):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(list(rows))
        return _features(rows)

    with pytest.raises(KeyboardInterrupt):
        store.get(np.arange(50), dies_on_third_batch, batch_size=10)
    assert store.computed() == 20
    rest = []
    again = FeatureStore(tmp_path, "cat", "f" * 64, "a" * 64, rows=100, dim=4).get(
        np.arange(50), lambda rows: rest.append(list(rows)) or _features(rows), batch_size=10)
    assert np.array_equal(again, _features(np.arange(50)))
    assert sorted(r for c in rest for r in c) == list(range(20, 50))


def test_bad_rows_and_bad_batches_are_refused(tmp_path):
    store = FeatureStore(tmp_path, "cat", "f" * 64, "a" * 64, rows=10, dim=4)
    with pytest.raises(ValueError, match="rows must lie in 0..9"):
        store.get(np.array([10]), _features)
    with pytest.raises(ValueError, match="expected"):
        store.get(np.array([1, 2]), lambda rows: np.zeros((len(rows), 3)))
    assert store.computed() == 0
