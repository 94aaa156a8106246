"""Lazy public names for a package's `__init__` (PEP 562).

A package lists its public names and the module each lives in; the module is imported the
first time the name is used. So `import atelier.retrieval.stages` stays as light as that one
module (no torch), while `from atelier.retrieval import RetrievalService` still works.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """(`__all__`, `__getattr__`) for `package`, whose names live in the given submodules."""
    def load(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return sorted(exports), load
