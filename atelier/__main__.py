"""`python -m atelier ...` is the `atelier` command (what `torchrun -m atelier train ...` runs)."""

import sys

from atelier.cli import main

sys.exit(main())
