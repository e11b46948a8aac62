"""The cost figures of finished student runs under results dirs, one line each (a GitHub table); with ``--rates DIR``,
only ``epoch img/s<TAB>steady img/s`` of DIR's one student run."""
import json
import sys
from pathlib import Path

from tabulate import tabulate


def students(root):
    for path in sorted(Path(root).glob("*/record.json")):
        record = json.loads(path.read_text())
        if record["spec"]["role"] == "student":
            yield record


def epoch_rate(record):
    """Train images over the fastest epoch's seconds: what a user waits, warm-up and data path included."""
    m = record.get("metrics", {})
    return max((m.get("train_images", 0) / e["epoch_s"] for e in record.get("epochs", [])), default=None)


if sys.argv[1] == "--rates":
    (record,) = students(sys.argv[2])
    print(f"{epoch_rate(record):.1f}\t{record['metrics']['train_images_per_s']:.1f}")
    sys.exit()
rows = []
for root in sys.argv[1:]:
    for r in students(root):
        s, m = r["spec"], r.get("metrics", {})
        rows.append([s["method"], f"{s['teacher']}->{s['student']}", s["precision"], s["channels_last"],
                     s["compile"] or "eager", r["status"], m.get("train_images_per_s"), epoch_rate(r),
                     m.get("step_ms_median"), (m.get("peak_alloc_bytes") or 0) / 2**20,
                     (m.get("peak_reserved_bytes") or 0) / 2**20, m.get("wall_s"), (r.get("error") or "")[:60]])
print(tabulate(rows, ["method", "pair", "precision", "channels_last", "compile", "status", "steady img/s",
                      "epoch img/s", "step ms", "peak alloc MiB", "peak reserved MiB", "wall s", "error"],
               tablefmt="github", floatfmt=".1f"))
