"""Conditional generators behind one interface; importing this registers every family."""

from atelier.generator import cgan, cpggan, cvae, mcgan, stage2  # noqa: F401  (registers the families)
from atelier.generator.base import FAMILIES, ConditionalGenerator, family
from atelier.generator.checkpoint import load_generator, save_checkpoint

__all__ = ["FAMILIES", "ConditionalGenerator", "family", "load_generator", "save_checkpoint"]
