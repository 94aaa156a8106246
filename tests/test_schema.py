import numpy as np
import pytest

from atelier.catalog.schema import AttributeGroup, AttributeSchema, InvalidAttributes

SCHEMA = AttributeSchema((
    AttributeGroup("category", ("Dress", "Shirt", "Coat")),
    AttributeGroup("texture", ("floral", "striped", "plain"), multi_label=True),
))


def test_encode_blocks_and_decode_round_trip():
    vector = SCHEMA.encode({"category": "Shirt", "texture": ["floral", "striped"]})
    assert vector.tolist() == [0, 1, 0, 1, 1, 0]
    assert SCHEMA.decode(vector) == {"category": "Shirt", "texture": ("floral", "striped")}


def test_values_match_case_insensitively_to_canonical_spelling():
    assert SCHEMA.normalise({"category": "dress"}) == {"category": ("Dress",)}


@pytest.mark.parametrize("attributes, fragment", [
    ({"colour": "red", "category": "Dress"}, "unknown attribute 'colour'; allowed: category, texture"),
    ({"category": "Gown"}, "unknown value 'Gown' for attribute 'category'; allowed: Dress, Shirt, Coat"),
    ({"category": ["Dress", "Coat"]}, "takes exactly one value"),
    ({"texture": "plain"}, "missing attribute(s) 'category'"),
    ({"category": "Dress", "texture": ["plain", "Plain"]}, "repeats a value"),
])
def test_invalid_attributes_name_what_is_allowed(attributes, fragment):
    with pytest.raises(InvalidAttributes) as error:
        SCHEMA.encode(attributes)
    assert fragment in str(error.value)


def test_round_trips_through_dict_and_reports_differences():
    again = AttributeSchema.from_dict(SCHEMA.to_dict())
    assert again == SCHEMA and again.describe_difference(SCHEMA) is None
    other = AttributeSchema((AttributeGroup("category", ("Dress", "Shirt")),))
    assert "groups differ" in SCHEMA.describe_difference(other)
    changed = AttributeSchema((AttributeGroup("category", ("Dress", "Shirt")), SCHEMA.groups[1]))
    assert "'category' differs" in SCHEMA.describe_difference(changed)


def test_decode_rejects_wrong_length_and_combinations_cover_all():
    with pytest.raises(ValueError):
        SCHEMA.decode(np.zeros(4))
    assert len(SCHEMA.combinations()) == 3
