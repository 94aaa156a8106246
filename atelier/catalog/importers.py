"""The registry of dataset importers: `IMPORTERS.get(name)(source, dest, **options) -> Catalogue`.

Every importer takes the dataset's folder (`source`; None: the importer's own default, where
it has one), the catalogue folder to publish (`dest`) and keyword options of its own (`size`,
`selection`, `limit`, `progress`, ...). `run_import` refuses options an importer does not take,
naming the ones it does, and names the options it needs that are not given (as command-line
flags: `--id-column`), before any work starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atelier.catalog.catalogue import Catalogue
from atelier.registry import Registry

__all__ = ["IMPORTERS", "Importer", "importer_options", "run_import"]

Importer = Callable[..., Catalogue]
IMPORTERS: Registry[Importer] = Registry("dataset importer")


def importer_options(name: str) -> list[str]:
    """The keyword options the importer `name` takes (besides source and dest)."""
    parameters = inspect.signature(IMPORTERS.get(name)).parameters
    return [p for p in parameters if p not in ("source", "dest")]


def run_import(name: str, source: Path | None, dest: Path, **options: Any) -> Catalogue:
    allowed = importer_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"the {name} importer has no option {', '.join(unknown)}; it takes: {', '.join(allowed) or 'no options'}")
    parameters = inspect.signature(IMPORTERS.get(name)).parameters.values()
    needed = [p.name for p in parameters if p.default is p.empty and p.name not in ("source", "dest", *options)]
    if needed:
        raise ValueError(f"the {name} importer needs {', '.join('--' + n.replace('_', '-') for n in needed)}")
    return IMPORTERS.get(name)(source, dest, **options)
