"""``python -m kdbench``: the command line, as torchrun and the elastic launcher (``--gpus-per-run``) start it."""

import sys

from kdbench.cli import main

sys.exit(main())
