"""The headline figures: docs/results/summary.json (written by `atelier eval --summary`) and the
README's table, which must be what the file says, never typed by hand."""

import json
import re
from pathlib import Path

from atelier.evaluation.summary import COMPOSITIONAL, headline_table

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- headline: docs/results/summary.json -->\n(.*?)\n<!-- /headline -->", re.S)


def test_the_headline_table_puts_each_figure_beside_the_real_products():
    summary = {
        "fashion-mnist": {"model": "flow", "fid_inception": 31.25, "real_fid_floor": 4.5, "fid_images": 2000,
                          "real_fid_floor_images": 2000, "class_accuracy": 0.9, "real_class_accuracy": 0.91,
                          "precision_at_5": 0.875, "real_image_precision_at_5": 0.95},
        "fashion-product-images": {"model": "mcgan", "selection": "apparel-6x6", "fid_inception": None,
                                   "accuracy": {"type": 0.5, "colour": 0.25}, "real_accuracy": {"type": 0.8, "colour": 0.75}},
        COMPOSITIONAL: {"model": "mcgan-holdout", "catalogue": "fpi", "seen_both_accuracy": 0.25,
                        "held_out_both_accuracy": 0.125},
    }
    lines = headline_table(summary).splitlines()
    assert lines[0].startswith("| catalogue | model | FID (Inception) | FID images | class accuracy | accuracy |")
    fm = next(line for line in lines if line.startswith("| fashion-mnist |"))  # FIDs: one decimal, under 10 too
    assert "| 31.2 (4.5) |" in fm and "| 2,000 (2,000) |" in fm and "| 0.900 (0.910) |" in fm and "0.875 (0.950)" in fm
    fpi = next(line for line in lines if line.startswith("| fashion-product-images (`apparel-6x6`) |"))
    assert "| - (-) |" in fpi and "| type 0.500, colour 0.250 (type 0.800, colour 0.750) |" in fpi
    assert lines[-1] == ("Compositional hold-out (`mcgan-holdout`, fpi): both attributes right on held-out pairs "
                         "0.125, on seen pairs 0.250.")


def test_the_readme_headline_table_is_the_summary_file():
    summary = json.loads((REPO / "docs" / "results" / "summary.json").read_text())
    block = BLOCK.search((REPO / "README.md").read_text())
    assert block, "README.md has no <!-- headline: docs/results/summary.json --> block"
    assert block.group(1).strip() == headline_table(summary).strip(), \
        "README's headline table differs from docs/results/summary.json: paste `python -m atelier.evaluation.summary`"
