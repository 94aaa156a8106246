"""The demo's scoring and table (the full demo runs from the README, not in the suite)."""

from atelier.demo import attribute_precision, format_table

ROWS = [
    {"asked": {"type": "Topwear", "colour": "Blue"},
     "products": [{"id": "1", "type": "Topwear", "colour": "Blue"}, {"id": "2", "type": "Topwear", "colour": "Red"}]},
    {"asked": {"type": "Dress", "colour": "Black"},
     "products": [{"id": "3", "type": "Saree", "colour": "Black"}, {"id": "4", "type": "Dress", "colour": "Black"}]},
]


def test_attribute_precision_per_group_and_all():
    assert attribute_precision(ROWS, 2) == {"type": 0.75, "colour": 0.75, "all": 0.5}
    single = [{"asked": {"category": "Bag"}, "products": [{"category": "Bag"}, {"category": "Coat"}]}]
    assert attribute_precision(single, 2) == {"category": 0.5}
    assert attribute_precision(single, 1) == {"category": 1.0}  # the first k only
    assert attribute_precision(single, 4) == {"category": 0.25}  # fewer than k returned: misses


def test_table_capitalises_what_differs():
    table = format_table(ROWS, 2)
    assert "Topwear/Blue      | Topwear/Blue, Topwear/RED" in table
    assert "Dress/Black       | SAREE/Black, Dress/Black" in table


def _write_idx(path, array):
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def test_the_demo_runs_end_to_end_on_a_small_fashion_mnist(tmp_path, idx_dir, mobilenet_weights, capsys):
    """The README's first command, on 300 real images: every stage, the real server, the report."""
    import json

    from atelier.catalog.fashion_mnist import load_split
    from atelier.demo import run_demo

    small = tmp_path / "idx"
    small.mkdir()
    for split, prefix, n in (("train", "train", 200), ("test", "t10k", 100)):
        images, labels = load_split(idx_dir, split)
        _write_idx(small / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(small / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    results = run_demo(tmp_path / "out", source=small, train_seconds=2, num_samples=2, input_size=32)
    printed = capsys.readouterr().out
    assert "category asked | category of the top-5 products" in printed
    assert f"precision@5: {results['precision_at_k']['category']:.3f}  (random products: " in printed
    spread = results["spread"]
    assert 0 < spread["real_products"] < 1 and 0 <= spread["drawings"] < 1
    assert f"spread of the drawings: {spread['drawings']:.3f}  (real products: {spread['real_products']:.3f}" in printed
    assert results["index_products"] == 300 and results["health"] == "SERVING"
    assert len(results["queries"]) == 10 and all(len(q["products"]) == 5 for q in results["queries"])
    # the committed one-pass flow, served as it is (fine-tuning would undo its distillation)
    assert results["model"].endswith("checkpoints/flow-distilled-fashion-mnist")
    assert "distilled" in results["model_training"]["init_from"] and "fine-tuning" not in printed
    assert "serving the committed" in printed
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count("<figure") == 50 and "data:image/png;base64" in report
    assert (tmp_path / "out" / "grid.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["precision_at_k"] == results["precision_at_k"]


def test_random_precision_is_the_share_of_products_with_the_asked_values():
    import pyarrow as pa

    from atelier.demo import random_precision

    products = pa.table({"type": ["Topwear", "Topwear", "Dress", "Saree"], "colour": ["Blue", "Black", "Black", "Blue"]})
    assert random_precision(ROWS, products) == {"type": (2 / 4 + 1 / 4) / 2, "colour": (2 / 4 + 2 / 4) / 2,
                                                "all": (1 / 4 + 1 / 4) / 2}


def test_pairwise_rms_spread_by_hand():
    import numpy as np

    from atelier.demo import pairwise_rms

    black, white = np.zeros((4, 4, 1), np.uint8), np.full((4, 4, 1), 255, np.uint8)
    assert pairwise_rms(np.stack([black, black, black])) == 0.0  # one drawing repeated: no spread
    assert pairwise_rms(np.stack([black, white])) == 1.0
    half = np.full((4, 4, 3), 51, np.uint8)  # RGB is averaged to grey: 0.2
    assert abs(pairwise_rms(np.stack([black.repeat(3, axis=2), half, white.repeat(3, axis=2)])) - (0.2 + 1 + 0.8) / 3) < 1e-12

