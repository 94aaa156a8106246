"""`python -m atelier ...` is the `atelier` command (what `torchrun -m atelier train ...` runs)."""

import logging
import os
import sys

from atelier.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun process. Its process group outlives destroy_process_group (torch._dynamo, imported
    # by the first optimizer, keeps references to it that nothing here can drop), and tearing the
    # interpreter down around the group's threads can abort a run that has already succeeded
    # ("terminate called without an active exception").
    # Everything is published by now: flush and end without that teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
