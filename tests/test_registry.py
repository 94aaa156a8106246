"""The registries every extensible part uses, and that the CLI offers what they hold."""

import pytest

from atelier.registry import Registry


def test_register_get_names_and_duplicates_refused():
    things = Registry("widget")

    @things.register("b")
    def make_b():
        return "b"

    things.add("a", len)
    assert things.names() == ["a", "b"] and list(things) == ["a", "b"] and len(things) == 2
    assert things.get("b") is make_b and "a" in things and "c" not in things
    with pytest.raises(ValueError, match=r"widget 'b' is already registered \(by .*make_b\)"):
        things.add("b", str)
    assert things.get("b") is make_b  # the first registration stands
    with pytest.raises(ValueError, match="unknown widget 'c'; available: a, b"):
        things.get("c")
    with pytest.raises(ValueError, match="non-empty name"):
        things.add("", str)


def test_every_part_registers_where_it_is_defined():
    from atelier.catalog import IMPORTERS
    from atelier.demo import DEMO_DATASETS
    from atelier.generator import FAMILIES
    from atelier.indexer.attribute_net import ARCHITECTURES
    from atelier.indexer.embedders import EMBEDDERS

    assert FAMILIES.names() == ["cdpggan", "cgan", "cpggan", "cvae", "flow", "mcgan", "stage2"]
    assert all(FAMILIES.get(name).family == name for name in FAMILIES)
    assert IMPORTERS.names() == ["deepfashion", "fashion-mnist", "fashion-product-images", "table"]
    assert EMBEDDERS.names() == ["mobilenet_v2"] and ARCHITECTURES.names() == ["judge_cnn", "mobilenet_v2"]
    assert DEMO_DATASETS.names() == ["fashion-mnist", "fashion-product-images", "fashion-product-images-apparel"]
    for dataset in DEMO_DATASETS:  # a demo dataset names a registered importer and family
        spec = DEMO_DATASETS.get(dataset)
        assert spec.importer in IMPORTERS and spec.model in FAMILIES


def test_a_second_family_under_a_taken_name_is_refused():
    from atelier.generator.base import register
    from atelier.generator.cgan import CGAN

    class Impostor(CGAN):
        family = "cgan"

    with pytest.raises(ValueError, match="model family 'cgan' is already registered"):
        register(Impostor)


def test_the_cli_offers_what_the_registries_hold():
    from atelier.catalog import IMPORTERS
    from atelier.cli import build_parser
    from atelier.generator import FAMILIES

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert next(a for a in verbs["train"]._actions if a.dest == "model").choices == FAMILIES.names()
    assert next(a for a in verbs["import"]._actions if a.dest == "dataset").choices == IMPORTERS.names()


def test_an_importer_refuses_options_it_does_not_take(tmp_path):
    from atelier.catalog import importer_options, run_import

    assert importer_options("fashion-mnist") == []
    assert {"selection", "size", "limit", "progress"} <= set(importer_options("fashion-product-images"))
    with pytest.raises(ValueError, match="the fashion-mnist importer has no option size; it takes: no options"):
        run_import("fashion-mnist", None, tmp_path / "fm", size=32)
    assert not (tmp_path / "fm").exists()  # refused before any work
    with pytest.raises(ValueError, match="a source folder is needed"):
        run_import("deepfashion", None, tmp_path / "df")
    with pytest.raises(ValueError, match="unknown dataset importer 'mnist'; available: deepfashion, fashion-mnist"):
        run_import("mnist", None, tmp_path / "x")
