"""A generated results table in the tidy schema: 25 methods of every family on three pairs, three seeds, with
per-epoch curves, to check that tables and plots stay readable at the size of the method zoo.

``python tests/synthetic_results.py OUT`` writes its plots and paper tables into OUT to look at them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench.report.load import conform

# name → family, as the zoo will declare them (methods-zoo.md), plus today's methods
ZOO = {"kd": "logit", "dkd": "logit", "dist": "logit", "ctkd": "logit",
       "fitnet": "feature", "at": "feature", "vid": "feature", "ab": "feature", "ft": "feature", "nst": "feature",
       "ofd": "feature", "reviewkd": "feature", "semckd": "feature",
       "sp": "relation", "cc": "relation", "rkd": "relation", "pkt": "relation", "fsp": "relation",
       "crd": "relation", "kdsvd": "relation", "sakd": "relation",
       "takd": "assistant", "dgkd": "assistant", "letkd1": "layer-adding", "letkd2": "layer-adding"}
PAIRS = (("resnet56", "resnet20"), ("vgg13", "vgg8"), ("resnet32x4", "resnet8x4"))
EPOCHS = 12


def _run(rng, run_id, role, method, teacher, student, seed, top1, family, params, speed) -> list[dict]:
    identity = {"run_id": run_id, "status": "finished", "role": role, "method": method, "dataset": "cifar100",
                "teacher": teacher, "student": student, "pair": f"{teacher}->{student}" if teacher else None,
                "protocol": "official" if role != "teacher" else "none", "recipe": "paper", "seed": seed,
                "device": "cuda", "precision": "fp32", "epochs": EPOCHS, "batch_size": 64, "method_family": family,
                "teacher_run": f"teacher-{teacher}" if teacher else None, "code_core": "same",
                "code_fingerprint": f"code-{method}"}
    curve = top1 - 30 * np.exp(-np.arange(1, EPOCHS + 1) / 3) + rng.normal(0, 0.3, EPOCHS)
    metrics = {"top1_best": curve.max(), "top1_last": curve[-1], "train_images_per_s": speed,
               "peak_alloc_bytes": 2**30 * (1 + params / 5e6), "extra_params_train": params * 0.1,
               "inference_params": params, "end_to_end_wall_s": 3600 * 2000 / speed, "wall_s": 3600 * 1000 / speed}
    rows = [{**identity, "metric": k, "value": float(v), "epoch": None} for k, v in metrics.items()]
    return rows + [{**identity, "metric": "top1", "value": float(v), "epoch": e + 1} for e, v in enumerate(curve)]


def synthetic_table(seed: int = 0, pairs: tuple[tuple[str, str], ...] = PAIRS) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    gains = {name: rng.normal(1.0, 1.2) for name in ZOO}
    for teacher, student in pairs:
        rows += _run(rng, f"teacher-{teacher}", "teacher", "student", None, teacher, 0, 76.0, None, 2e6, 900.0)
        for s in range(3):
            base = 70.0 + rng.normal(0, 0.3)
            rows += _run(rng, f"ce-{student}-{s}", "student", "student", None, student, s, base, None, 3e5, 2000.0)
            for name, family in ZOO.items():
                params = 3e5 * (3 if family == "layer-adding" else 1)
                rows += _run(rng, f"{name}-{teacher}-{student}-{s}", "student", name, teacher, student, s,
                             base + gains[name] + rng.normal(0, 0.3), family, params,
                             2000.0 / (1 + rng.uniform(0.2, 4)))
    table = pd.DataFrame(rows)
    table["epoch"] = table["epoch"].astype("Int64")
    return conform(table).assign(results_dir="synthetic")


if __name__ == "__main__":
    from kdbench import report

    out = Path(sys.argv[1])
    table = synthetic_table()
    frame = report.entries(table)
    board = report.leaderboard(frame)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.md").write_text(report.render_report(board, "github", layout="paper"))
    (out / "paper.tex").write_text(report.render_report(board, "latex", layout="paper"))
    print("\n".join(str(p) for p in report.save_plots(frame, table, out / "plots")))
