"""The demo's scoring and table (the full demo runs from the README, not in the suite)."""

from atelier.demo import attribute_precision, format_table

ROWS = [
    {"asked": {"type": "Topwear", "colour": "Blue"},
     "products": [{"id": "1", "type": "Topwear", "colour": "Blue"}, {"id": "2", "type": "Topwear", "colour": "Red"}]},
    {"asked": {"type": "Dress", "colour": "Black"},
     "products": [{"id": "3", "type": "Saree", "colour": "Black"}, {"id": "4", "type": "Dress", "colour": "Black"}]},
]


def test_attribute_precision_per_group_and_all():
    assert attribute_precision(ROWS) == {"type": 0.75, "colour": 0.75, "all": 0.5}
    single = [{"asked": {"category": "Bag"}, "products": [{"category": "Bag"}, {"category": "Coat"}]}]
    assert attribute_precision(single) == {"category": 0.5}


def test_table_capitalises_what_differs():
    table = format_table(ROWS, 2)
    assert "Topwear/Blue | Topwear/Blue, Topwear/RED" in table
    assert "Dress/Black  | SAREE/Black, Dress/Black" in table
