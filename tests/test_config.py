"""Sweep files (kdbench/config.py): the schema, command-line overrides, grids, and the resolved sweep beside the
results; and what `kdbench list` and `--dry-run` show of the options that will run."""

import json
from pathlib import Path

import pytest
import torchvision.datasets.utils
import yaml
from test_cli import TINY_ARGS, run_cli

from kdbench import estimate as estimate_module
from kdbench.config import load, option_grid, plan, sweeps, write_resolved
from kdbench.errors import KdbenchError
from kdbench.progress import rescaled_options

SMALL = {"methods": ["student", "kd"], "pairs": ["resnet14:resnet8"], "dataset": "synthetic", "recipe": "short"}


def _write(tmp_path, content: dict | str, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def test_a_file_holds_what_the_flags_hold_and_flags_given_override_it(tmp_path):
    path = _write(tmp_path, {**SMALL, "seeds": [0, 1], "protocol": "crd", "options": {"kd": {"temperature": 2}}})
    cfg = load(path, {"seeds": [3], "options": {"kd": {"kd_weight": "0.5"}}})
    assert list(cfg.seeds) == [3] and cfg.protocol == "crd" and cfg.recipe == "short"
    assert dict(cfg.options.kd) == {"temperature": 2, "kd_weight": "0.5"}  # merged per option
    spec, = sweeps(cfg, "cpu")
    assert spec.seeds == (3,) and set(spec.method_options) == {("kd", "temperature", "2"), ("kd", "kd_weight", "0.5")}
    runs = plan([spec])
    kd = [r for r in runs if r.method == "kd"]
    assert len(kd) == 1 and dict(kd[0].method_options)["temperature"] == 2.0  # text converted by the method


@pytest.mark.parametrize("content, message", [
    ({**SMALL, "seed": [1]}, "unknown key 'seed'; valid keys: methods, pairs, seeds"),
    ({**SMALL, "seeds": ["a"]}, "seeds"),
    ({**SMALL, "epochs": "many"}, "epochs"),
    ({"pairs": ["resnet14:resnet8"]}, "no methods"),
    ("- a list\n- not a mapping\n", "must be a mapping"),
    ("methods: [kd\n", "not valid YAML"),
    ({**SMALL, "parts": [{"methods": ["kd"]}, {"seed": 1}]}, "part 2: unknown key 'seed'"),
    ({**SMALL, "parts": [3]}, "part 1 must be a mapping"),
    ({"pairs": ["resnet14:resnet8"], "parts": [{"methods": ["kd"]}, {"dataset": "synthetic"}]}, "no methods in part 2"),
])
def test_a_bad_file_is_refused_in_one_line_naming_the_key(tmp_path, content, message):
    with pytest.raises(KdbenchError, match=message) as refused:
        load(_write(tmp_path, content), {})
    assert "\n" not in str(refused.value)


def test_the_cli_refuses_a_bad_file_an_unknown_method_and_a_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--config", str(_write(tmp_path, {**SMALL, "methods": ["kd", "nope"]})),
                           "--dry-run")
    assert code == 2 and "unknown method 'nope'" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "absent.yaml does not exist" in err


def test_a_list_of_values_is_a_grid_over_the_product_of_the_options():
    grid = option_grid({"kd": {"temperature": [2, 4], "ce_weight": 0.5}, "fitnet": {"hint_layer": [1, 2]}})
    assert len(grid) == 4 and all(("kd", "ce_weight", "0.5") in combination for combination in grid)
    assert {(c[0][2], c[2][2]) for c in grid} == {("2", "1"), ("2", "2"), ("4", "1"), ("4", "2")}
    assert option_grid({}) == [()]
    with pytest.raises(KdbenchError, match="empty list"):
        option_grid({"kd": {"temperature": []}})


def test_set_with_several_values_plans_one_run_per_value_and_shares_the_rest(capsys, tmp_path):
    cfg = load(None, {**SMALL, "options": {"kd": {"temperature": ["2", "4"]}}})
    runs = plan(sweeps(cfg, "cpu"))
    assert [r.method for r in runs] == ["student", "student", "kd", "kd"]  # teacher and CE once
    assert sorted(dict(r.method_options)["temperature"] for r in runs if r.method == "kd") == [2.0, 4.0]
    code, out, _ = run_cli(capsys, "run", "--methods", "kd", "--pairs", "resnet14:resnet8", *TINY_ARGS,
                           "--set", "kd.temperature=2,4", "--results-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 0 and "temperature=2.0" in out and "temperature=4.0" in out


def test_the_same_option_set_twice_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--methods", "kd", "--pairs", "resnet14:resnet8", *TINY_ARGS,
                           "--set", "kd.temperature=2", "--set", "kd.temperature=4", "--dry-run")
    assert code == 2 and "kd.temperature is given twice" in err and err.count("\n") == 1


def test_the_resolved_sweep_is_written_beside_the_results_and_re_runs_the_same_plan(capsys, tmp_path):
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--methods", "student", "--pairs", "resnet14:resnet8", *TINY_ARGS,
                           "--results-dir", str(results))
    assert code == 0 and "the resolved sweep" in err
    written = (results / "sweep.yaml").read_text()
    assert [p.read_text() for p in (results / "sweeps").iterdir()] == [written]
    assert "planned runs (2):" in written and "teacher-student-resnet14-s0" in written
    cfg = load(results / "sweep.yaml", {})
    assert cfg.results_dir == str(results) and list(cfg.methods) == ["student"]
    code, out, _ = run_cli(capsys, "run", "--config", str(results / "sweep.yaml"), "--dry-run")
    assert code == 0 and "0 runs to train" in out  # the same runs, already made


def test_the_dry_run_shows_each_runs_options_and_what_the_recipe_rescaled(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--methods", "dkd", "--pairs", "resnet56:resnet20", *TINY_ARGS,
                           "--epochs", "12", "--results-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 0
    dkd_line, = [line for line in out.splitlines() if line.startswith("student-dkd-resnet20")]
    assert "beta=2.0" in dkd_line and "warmup_epochs=1" in dkd_line and "(warmup_epochs 20 -> 1)" in dkd_line
    cfg = load(None, {**SMALL, "methods": ["dkd"], "epochs": 240})
    assert rescaled_options(plan(sweeps(cfg, "cpu"))[-1]) == ""  # the official length rescales nothing


def test_list_methods_shows_the_options_each_protocol_resolves(capsys):
    code, out, _ = run_cli(capsys, "list", "methods")
    rows = {line.split(" ")[0]: line for line in out.splitlines()}
    assert code == 0 and {"student", "kd", "takd", "dkd", "kd_ls"} <= set(rows)
    # takd: 0 / 1 / 5 with mean reduction under official, RepDistiller's weights under crd
    assert "ce_weight=0.0 kd_weight=1.0" in rows["takd"] and "ce_weight=0.1 kd_weight=0.9" in rows["takd"]
    assert "(same)" in rows["dkd"] and "9 pairs" in rows["dkd"]  # 7 CIFAR-100 pairs and the 2 ImageNet ones
    code, out, _ = run_cli(capsys, "list", "methods", "dkd")
    assert code == 0 and "counted in epochs" in out and "resnet56->resnet20" in out and "beta=2.0" in out
    code, _, err = run_cli(capsys, "list", "recipes", "cpu")
    assert code == 2 and "takes no name" in err


def test_list_recipes_shows_every_recipes_settings(capsys):
    code, out, _ = run_cli(capsys, "list", "recipes")
    header, _, *rows = out.splitlines()
    assert code == 0 and header.split() == ["setting", "paper", "letkd-native", "short-teacher", "short",
                                            "cpu-teacher", "cpu", "imagenet", "imagenet-mdistiller",
                                            "tiny-imagenet"]
    epochs = next(r for r in rows if r.startswith("epochs")).split()
    assert epochs == ["epochs", "240", "240", "4", "3", "10", "30", "100", "100", "200"]


def test_a_second_dry_run_reuses_the_prices_of_the_first_and_says_so(capsys, tmp_path):
    argv = ["run", "--methods", "kd", "--pairs", "resnet14:resnet8", *TINY_ARGS, "--results-dir", str(tmp_path / "r"),
            "--dry-run"]
    code, first, _ = run_cli(capsys, *argv)
    assert code == 0 and "priced by an earlier run" not in first
    prices = tmp_path / "cache" / "prices-v2.json"
    assert len(json.loads(prices.read_text())) == 2  # the teacher's setting and kd's
    code, second, _ = run_cli(capsys, *[a if a != "1" else "2" for a in argv])  # twice the epochs: same settings
    assert code == 0 and "(2 of them priced by an earlier run on this machine and code" in second
    total = [float(line.split()[-1]) for text in (first, second) for line in text.splitlines()
             if line.startswith("total")]
    assert total[1] == pytest.approx(2 * total[0], rel=0.3)  # the same per-step prices, times the recipes


def test_a_teacher_under_a_recipe_nobody_named_is_announced_with_its_price(env):
    """`--epochs 1` shortens the students; the first line says the teacher keeps its own recipe, and its cost."""
    from kdbench.cli import _teacher_lines

    runs = plan(sweeps(load(None, {**SMALL, "methods": ["student"], "epochs": 1}), "cpu"))
    line, = _teacher_lines(runs, env)
    assert line.startswith("teacher resnet14 (seed 0) trains first, with recipe short-teacher, which the students' "
                           "recipe names: 4 epochs on 640 images, about ")
    assert line.endswith("--teacher-recipe, --teacher-epochs or --teacher-train-subset change it")


def test_a_teacher_smaller_than_its_student_is_warned_about(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--methods", "student", "--pairs", "resnet8:resnet20", *TINY_ARGS,
                           "--results-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 0 and "warning: teacher resnet8 (0.08 M parameters) is smaller than its student resnet20" in err
    code, _, err = run_cli(capsys, "run", "--methods", "student", "--pairs", "resnet20:resnet8", *TINY_ARGS,
                           "--results-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 0 and "smaller than" not in err


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
PRICED = estimate_module._Cost(step=0.01, eval_image=1e-4, teacher_eval_image=1e-4, fit_image=0.0, reuse_image=0.0,
                               epoch=0.1, run=1.0)


def _published_cells(source: str) -> set[tuple[str, str]]:
    """(pair, method) cells of a published table that kdbench can run: its methods, CRD+KD, CE and teachers."""
    from kdbench.methods import list_methods
    from kdbench.report.published import load_published

    rows = load_published(Path(__file__).resolve().parents[1] / "results" / "published_cifar100.csv")
    rows = rows[rows.source == source]
    assert len(rows), f"no published table {source!r}"
    runnable = set(list_methods()) | {"crd+kd", "teacher"}
    return {(f"{t}:{s}", m) for t, s, m in zip(rows.teacher, rows.student, rows.method) if m in runnable}


def _planned_cells(runs, pairs: set[str]) -> set[tuple[str, str]]:
    """The (pair, method) cells a plan fills: a teacher's and the CE student's cells are those of every pair of the
    sweep that they belong to; CRD with added KD is CRD+KD."""
    cells = set()
    for run in runs:
        if run.role == "teacher":
            cells |= {(pair, "teacher") for pair in pairs if pair.split(":")[0] == run.student}
        elif run.method == "student":
            cells |= {(pair, "student") for pair in pairs if pair.split(":")[1] == run.student}
        elif run.role == "student":
            added_kd = run.method == "crd" and dict(run.method_options)["kd_weight"] > 0
            cells.add((f"{run.teacher}:{run.student}", "crd+kd" if added_kd else run.method))
    return cells


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_re_runs_its_source_table_and_dry_runs(path, capsys, tmp_path, monkeypatch):
    """Each config names a published table and plans every cell of it that kdbench can run; the dry run prices it
    (here with a fixed price per step: pricing itself is tested above) on CIFAR-100 files in the real layout."""
    from test_data import fake_cifar100

    fake_cifar100(tmp_path / "data")
    # self-written files, so no original md5 to match
    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(estimate_module, "_measure", lambda *args, **kwargs: PRICED)
    cfg = load(path, {})
    runs = plan(sweeps(cfg, "cpu"))
    missing = _published_cells(cfg.source) - _planned_cells(runs, _pairs(cfg))
    assert not missing, f"{path.name} leaves out cells of {cfg.source}: {sorted(missing)}"
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--data-dir", str(tmp_path / "data"),
                             "--no-download", "--device", "cpu", "--results-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 0, err
    assert f"{len(runs)} runs to train" in out and f"this sweep re-runs {cfg.source}" in err


def _pairs(cfg) -> set[str]:
    return set(cfg.pairs) | {p for part in cfg.parts for p in part.pairs}


def test_a_plug_in_without_a_preset_for_the_protocol_asked_for_is_refused(capsys, tmp_path, monkeypatch):
    """Without the check it would run with its defaults under the protocol's name."""
    from kdbench import methods as registry
    from kdbench.methods.base import LOGIT_OPTIONS, Method

    monkeypatch.setattr(registry._METHODS, "_entries", dict(registry._METHODS._entries))

    @registry.register_method
    class CrdOnly(Method):
        name, family, logit_kd = "crd-only-probe", "logit", True
        defaults = dict(LOGIT_OPTIONS)
        presets = {"crd": {"ce_weight": 0.1, "kd_weight": 0.9}}

        def losses(self, out):
            return self.logit_terms(out)

    argv = ["run", "--methods", "crd-only-probe", "--pairs", "resnet14:resnet8", *TINY_ARGS, "--dry-run",
            "--results-dir", str(tmp_path / "r")]
    code, _, err = run_cli(capsys, *argv, "--protocol", "semckd")
    assert code == 2 and "method crd-only-probe defines no preset for protocol 'semckd' (its presets: crd)" in err
    code, out, _ = run_cli(capsys, *argv, "--protocol", "crd")
    assert code == 0 and "ce_weight=0.1,kd_weight=0.9" in out


def test_a_runs_first_line_says_which_options_its_recipe_rescaled(caplog, tmp_path):
    import logging

    from kdbench.progress import RunLog

    cfg = load(None, {**SMALL, "methods": ["dkd"], "epochs": 12})
    dkd = plan(sweeps(cfg, "cpu"))[-1]
    with caplog.at_level(logging.INFO, logger="kdbench"):
        RunLog(dkd, tmp_path).start(0)
    assert f"{dkd.run_id} starts (12 epochs; scaled to the recipe's 12 epochs: warmup_epochs 20 -> 1)" in caplog.text


def test_every_command_line_option_has_help_text():
    import argparse

    from kdbench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {action.option_strings or action.dest}" for name, sub in [("kdbench", parser),
                                                                                 *commands.choices.items()]
              for action in sub._actions if not action.help]
    assert not silent and set(commands.choices) == {"run", "report", "replay", "costs", "list"}


PARTS = {"pairs": ["resnet14:resnet8", "resnet20:resnet8"], "dataset": "synthetic", "recipe": "short",
         "parts": [{"methods": ["student", "kd", "crd"]},
                   {"methods": ["crd"], "options": {"crd": {"kd_weight": 1.0}}},
                   {"methods": ["fitnet"], "pairs": ["resnet14:resnet8"]}]}


def test_an_option_reaches_only_the_parts_that_run_its_method(tmp_path):
    cfg = load(_write(tmp_path, PARTS), {"options": {"kd": {"temperature": ["2", "4"]}}})
    runs = plan(sweeps(cfg, "cpu"))
    kd = sorted(dict(r.method_options)["temperature"] for r in runs if r.method == "kd")
    crd = sorted(dict(r.method_options)["kd_weight"] for r in runs if r.method == "crd")
    assert kd == [2.0, 2.0, 4.0, 4.0] and crd == [0.0, 0.0, 1.0, 1.0]  # two pairs each
    assert [r.pair for r in runs if r.method == "fitnet"] == ["resnet14->resnet8"]
    with pytest.raises(KdbenchError, match=r"options for fsp, which no part runs \(methods: crd, fitnet, kd, "):
        load(_write(tmp_path, PARTS), {"options": {"fsp": {"beta": "2"}}})
    wrong_part = {**PARTS, "parts": [*PARTS["parts"], {"methods": ["kd"], "options": {"crd": {"kd_weight": 1}}}]}
    with pytest.raises(KdbenchError, match=r"part 4: options for crd, which the part does not run \(methods: kd\)"):
        load(_write(tmp_path, wrong_part), {})


def test_the_resolved_sweep_of_a_parts_file_loads_again_and_plans_the_same_runs(tmp_path):
    cfg = load(_write(tmp_path, PARTS), {"seeds": [1]})
    runs = plan(sweeps(cfg, "cpu"))
    again = load(write_resolved(cfg, runs, tmp_path / "results"), {})
    assert plan(sweeps(again, "cpu")) == runs


def test_methods_and_pairs_on_the_command_line_select_among_the_parts(tmp_path):
    """`--methods crd --pairs resnet20:resnet8` over a table: only those cells, each part's options kept."""
    cfg = load(_write(tmp_path, PARTS), {"methods": ["crd", "fitnet"], "pairs": ["resnet20:resnet8"]})
    runs = [r for r in plan(sweeps(cfg, "cpu")) if r.role == "student"]
    assert {(r.method, dict(r.method_options)["kd_weight"], r.pair) for r in runs} == {
        ("crd", 0.0, "resnet20->resnet8"), ("crd", 1.0, "resnet20->resnet8")}  # fitnet's part has no such pair
    with pytest.raises(KdbenchError, match="select nothing of sweep file .*; its parts run methods crd, fitnet, kd, "
                                           "student; pairs resnet14:resnet8, resnet20:resnet8"):
        load(_write(tmp_path, PARTS), {"methods": ["dkd"], "pairs": ["resnet20:resnet8"]})
