"""Progress bars for long jobs: live on a terminal, a line every 30 s in a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm with atelier's defaults; in a log (stderr not a TTY) it updates rarely, not per step."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("dynamic_ncols", interactive)
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    return tqdm(*args, **kwargs)
