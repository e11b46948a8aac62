"""Runs a Python script under torch.profiler: kdbench (kdbench_fake.py) or an official loop (run_official.py), with
their arguments, to see where one loop's step loses to the other's (issue 30: kdbench's SemCKD step against
SemCKD's own train_student.py).

Usage: traced.py OUT SCRIPT ARGS...  Writes OUT.txt, the operators with the most self CUDA time and the most self
CPU time, and OUT.json.gz, the Chrome trace (chrome://tracing, Perfetto), where steps far slower than the median show
as gaps or long host-side stretches. The profiler slows both loops alike; time them without it (gpu_check.py)."""
import gzip
import os
import runpy
import shutil
import sys

import torch
from torch.profiler import ProfilerActivity, profile

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
cuda = torch.cuda.is_available()
sys.argv = [script, *args]
status = 0
with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        status = stop.code or 0
events = prof.key_averages()
with open(f"{out}.txt", "w") as report:
    for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        report.write(f"# by {key}\n{events.table(sort_by=key, row_limit=30)}\n\n")
prof.export_chrome_trace(f"{out}.json")
with open(f"{out}.json", "rb") as trace, gzip.open(f"{out}.json.gz", "wb") as packed:
    shutil.copyfileobj(trace, packed)
os.remove(f"{out}.json")
sys.exit(status)
