"""``python -m kdbench``: the command line, as torchrun and the elastic launcher (``--gpus-per-run``) start it. An
exception that ends a process is written where the launcher reads it (torch.distributed.elastic's ``record``), so
the command that launched the group can say which process failed and why."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from kdbench.cli import main

sys.exit(record(main)())
