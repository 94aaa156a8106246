"""Conditional generators behind one interface (`base.ConditionalGenerator`), one file per family.

Importing this package registers every family in `FAMILIES` (`atelier train --model NAME`).
`train` is the training loop, `checkpoint` saves and loads models as safetensors + config.
"""

from atelier.generator import cgan, cpggan, cvae, flow, mcgan, stage2  # noqa: F401  (registers the families)
from atelier.generator.base import FAMILIES, ConditionalGenerator, family
from atelier.generator.checkpoint import load_generator, save_checkpoint

__all__ = ["FAMILIES", "ConditionalGenerator", "family", "load_generator", "save_checkpoint"]
