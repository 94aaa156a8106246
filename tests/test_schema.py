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


def test_a_selection_fits_within_a_wider_schema_but_not_the_reverse():
    wider = AttributeSchema((AttributeGroup("category", ("Dress", "Shirt", "Coat", "other")), SCHEMA.groups[1],
                             AttributeGroup("season", ("Summer", "Winter"))))
    assert SCHEMA.fits_within(wider) is None
    assert "'category' has values ['other']" in AttributeSchema(wider.groups[:1]).fits_within(SCHEMA)
    assert "'season' is not in the other schema" in AttributeSchema(wider.groups[2:]).fits_within(SCHEMA)
    flipped = AttributeSchema((AttributeGroup("texture", ("floral",)),))
    assert "multi-label in one schema" in flipped.fits_within(SCHEMA)
