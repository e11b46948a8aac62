"""Published numbers beside kdbench's: the published tables (CIFAR-100; ImageNet and Tiny-ImageNet), and which of
their rows a leaderboard row may sit next to (same dataset, recipe and loss protocol; a reporting rule other than the
table's is marked)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdbench.errors import KdbenchError

# One table per dataset family; a table without a ``dataset`` column holds CIFAR-100 numbers.
PUBLISHED_NAMES = ("published_cifar100.csv", "published_imagenet.csv")
_SHOWN = {"cifar100": "CIFAR-100", "imagenet": "ImageNet", "tiny-imagenet": "Tiny-ImageNet"}
PUBLISHED_COLUMNS = ("source", "teacher", "student", "method", "top1", "top1_std", "protocol", "report_rule",
                     "verified", "recipe")
# The published report_rule each metric matches; none is selected on a validation split, so next to
# top1_at_best_val every published number carries its own rule.
RULE_OF_METRIC = {"top1_at_best_val": None, "top1_last": "last", "top1_best": "best_mean5"}
# Published (method, protocol) rows that a kdbench (protocol, method) reproduces, besides its own name and protocol.
# "official" is each method's own code, whose numbers sit under their source's protocol (RepDistiller's for its
# methods, mdistiller's `dkd`, the authors' code, `other`, for ReviewKD and OFD); letKD's published setting has no
# logit KD, as crd; DKD's, DIST's, SimKD's and the logit-standardised methods' objectives are the same under every
# protocol (their sources' protocols: mdistiller's `dkd`, DIST_KD's `other`, SimKD's repository `semckd`,
# logit-standardization-KD's `other`); CRD under semckd (CE + KD + 0.8·CRD) is
# RepDistiller's CRD+KD.
_REPDISTILLER = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "kdsvd")
_EQUIVALENT: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("crd", "letkd1"): (("letkd1", "letkd"),), ("crd", "letkd2"): (("letkd2", "letkd"),),
    **{("official", m): ((m, "crd"),) for m in _REPDISTILLER},
    **{("official", m): ((m, p),) for m, p in (("semckd", "semckd"), ("takd", "takd"), ("dgkd", "takd"),
                                               ("letkd1", "letkd"), ("letkd2", "letkd"), ("reviewkd", "other"),
                                               ("ofd", "other"), ("ctkd", "crd"))},
    **{(p, m): ((m, source),) for p in ("official", "crd", "semckd")
       for m, source in (("dkd", "dkd"), ("dist", "other"), ("simkd", "semckd"), ("kd_ls", "other"),
                         ("dkd_ls", "other"), ("ctkd_ls", "other"))},
    ("semckd", "crd"): (("crd+kd", "crd"),),
    # KD+DOT: KD under mdistiller's KD config (0.1 CE + 0.9 KD_4), which the official and crd protocols resolve to
    ("official", "kd_dot"): (("kd_dot", "other"),), ("crd", "kd_dot"): (("kd_dot", "other"),),
}
# A validation split is not among them: its runs show published numbers under those numbers' own reporting rule
# (issue 25's rule), and the table's heading states the split.
_RECIPE_FIELDS = ("epochs", "batch_size", "train_subset", "test_subset", "lr")


def load_published(paths: str | Path | list[Path]) -> pd.DataFrame:
    """The published tables, checked and concatenated: one row per published number, with its ``dataset`` and the
    kdbench recipe that trains as its source did (``recipe``; empty when none does)."""
    frames = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        try:
            published = pd.read_csv(path, keep_default_na=False, na_values={"top1_std": [""], "top5": [""]})
        except Exception as error:
            raise KdbenchError(f"cannot read published table {path}: {' '.join(str(error).split())}") from None
        missing = [c for c in PUBLISHED_COLUMNS if c not in published.columns]
        if missing:
            raise KdbenchError(f"published table {path} lacks column(s) {', '.join(missing)}")
        frames.append(published if "dataset" in published.columns else published.assign(dataset="cifar100"))
    return pd.concat(frames, ignore_index=True)


def published_paths(results_dir: str | Path, given: str | Path | None = None) -> list[Path]:
    """``given``, else each published table from ``<results_dir>``, else from this checkout's ``results/``."""
    if given is not None:
        if not Path(given).is_file():
            raise KdbenchError(f"published table {given} does not exist")
        return [Path(given)]
    found = (next((p for p in (Path(results_dir) / name, Path(__file__).resolve().parents[2] / "results" / name)
                   if p.is_file()), None) for name in PUBLISHED_NAMES)
    return [p for p in found if p is not None]


def mismatch(run: pd.Series, published: pd.DataFrame) -> str:
    """Why ``run``'s setting cannot sit beside published numbers (empty when it can): another dataset, or a recipe
    that is not one the published runs used, as registered (no overridden epochs, batch, subsets or lr)."""
    from kdbench.spec import RECIPES

    datasets = sorted(set(published["dataset"]))
    if run["dataset"] not in datasets:
        return (f"the published numbers are {', '.join(_SHOWN.get(d, d) for d in datasets)} results "
                f"(this table: {run['dataset']})")
    recipes = sorted(set(published.loc[published["dataset"] == run["dataset"], "recipe"]) - {""})
    wanted = f"recipe {' or '.join(recipes)} as registered"
    if run["recipe"] not in recipes or run["recipe"] not in RECIPES.names():
        return f"the published numbers were trained with {wanted} (this table: recipe {run['recipe']})"
    registered = RECIPES.get(run["recipe"])
    changed = [f"{key}={run[key]:g}" for key in _RECIPE_FIELDS
               if key in run and pd.notna(run[key]) and run[key] != getattr(registered, key)]
    if changed:
        return f"the published numbers were trained with {wanted} (this table overrides {', '.join(changed)})"
    return ""


def _matches(published: pd.DataFrame, teacher: str | None, student: str, method: str, protocol: str, recipe: str,
             metric: str) -> dict[str, str]:
    """Published values (joined with " / ") and sources for one row; other reporting rules are marked."""
    match = (published["student"] == student) & (published["recipe"] == recipe)
    if teacher is not None:
        match &= published["teacher"] == teacher
    if protocol == "none":  # CE-only tables: CE training is the same under every protocol
        match &= published["method"] == method
    else:
        same = {(method, protocol), *_EQUIVALENT.get((protocol, method), ())}
        match &= pd.Series(list(zip(published["method"], published["protocol"])), index=published.index).isin(same)
    values, sources = [], []
    keys = ["top1", "top1_std", "report_rule", "verified", "protocol", "method"]
    for (top1, std, rule, verified, proto, name), rows in published[match].groupby(keys, dropna=False, sort=False):
        values.append(f"{top1:.2f}" + (f" ± {std:.2f}" if pd.notna(std) else "")
                      + ("" if rule == RULE_OF_METRIC[metric] else f" [{rule}]"))
        sources.append("; ".join(dict.fromkeys(rows["source"])) + ("" if verified == "primary" else f" ({verified})")
                       + ("" if proto == protocol else f" (protocol {proto})") + ("" if name == method else
                                                                                  f" (as {name})"))
    return {"published": " / ".join(values), "published_source": " / ".join(sources)}


def published_cells(published: pd.DataFrame, pair: str, kind: str, arch: str, run: pd.Series, protocol: str,
                    metric: str, ce_only: str) -> dict[str, str]:
    """The published cells of a leaderboard row, and ``published_mismatch``: why there are none when the setting
    differs. CE-only extra methods have none."""
    why = mismatch(run, published)
    if why or (pair == ce_only and kind == "method"):
        return {"published": "", "published_source": "", "published_mismatch": why}
    published = published[published["dataset"] == run["dataset"]]
    cells: dict[str, str]
    if pair != ce_only:
        teacher, student = pair.split("->")
        cells = _matches(published, teacher, student, kind if kind != "method" else run["method"], protocol,
                         run["recipe"], metric)
    elif kind == "student":
        cells = _matches(published, None, arch, "student", protocol, run["recipe"], metric)
    else:  # a teacher without a pair: its published teacher rows, whichever student they were quoted with
        rows = published[(published["method"] == "teacher") & (published["teacher"] == arch)]
        cells = _matches(rows.assign(student=arch), None, arch, "teacher", protocol, run["recipe"], metric)
    return {**cells, "published_mismatch": ""}


def published_note(board: pd.DataFrame) -> str:
    """Why a table shows no published column (empty when its setting matches the published numbers')."""
    if "published" not in board.columns:
        return f"No published column: no published table ({', '.join(PUBLISHED_NAMES)}) was found."
    reasons = board["published_mismatch"].fillna("")
    if (reasons == "").any():
        return ""
    return f"No published column: {reasons.iloc[0]}."


def unpublished_pairs_note(board: pd.DataFrame) -> str:
    """The pairs of a table with a published column that the published table has no number for (empty if none)."""
    if published_note(board):
        return ""
    shown = board["published"].fillna("").ne("").groupby([board["pair"], board["protocol"]], sort=False).any()
    missing = [f"{pair} (protocol {protocol})" for (pair, protocol), some in shown.items() if not some]
    return f"No published number in the table for {', '.join(missing)}." if missing else ""
