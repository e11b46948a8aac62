"""No stale results: a finished run made by other code is re-run (or kept on purpose), teachers only when their own
code changed; comments and docstrings change nothing."""

import dataclasses
import importlib
import sys

import pytest
from conftest import TINY, tiny_sweep

import kdbench.fingerprint
import kdbench.methods
from kdbench.cli import main
from kdbench.fingerprint import fingerprint, module_closure, stale_runs
from kdbench.harness import RunEnv, run_sweep
from kdbench.results import ResultsStore

PLUGIN = '''
"""A plug-in method: logit KD with a weight that the test edits."""
from kdbench.methods import register_method
from kdbench.methods.kd import KD


@register_method
class StaleProbe(KD):
    name = "stale-probe"
    weight = {weight}

    def losses(self, out):
        return {{name: self.weight * term for name, term in self.logit_terms(out).items()}}
'''


def write_plugin(folder, weight, docstring="A plug-in method"):
    """Edits the plug-in and loads it as a new process would: code is fingerprinted once per process."""
    (folder / "kdbench_stale_probe.py").write_text(PLUGIN.format(weight=weight).replace("A plug-in method",
                                                                                      docstring))
    kdbench.fingerprint._parsed.cache_clear()
    kdbench.methods._METHODS._entries.pop("stale-probe", None)
    sys.modules.pop("kdbench_stale_probe", None)
    importlib.invalidate_caches()
    importlib.import_module("kdbench_stale_probe")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    kdbench.methods.list_methods()
    write_plugin(folder, 1.0)
    yield folder
    kdbench.methods._METHODS._entries.pop("stale-probe", None)
    sys.modules.pop("kdbench_stale_probe", None)
    kdbench.fingerprint._parsed.cache_clear()


def test_a_changed_method_is_rerun_the_teacher_is_not_and_reuse_stale_keeps_it(plugin, tmp_path, capsys):
    one_epoch = TINY.overridden(epochs=1)
    specs = tiny_sweep(methods=("stale-probe",), recipe=one_epoch).plan()
    teacher_spec, student_spec = specs
    env = RunEnv(ResultsStore(tmp_path / "results"), progress=False)
    teacher, student = run_sweep(specs, env)
    assert student.provenance["code_fingerprint"] == fingerprint(student_spec)["code_fingerprint"]
    assert "kdbench_stale_probe" in student.provenance["code_files"]
    assert "kdbench_stale_probe" not in teacher.provenance["code_files"]  # teachers depend on teacher code only
    assert stale_runs(specs, env.store) == {}

    # a docstring edit is not a code change
    write_plugin(plugin, 1.0, docstring="Reworded")
    assert stale_runs(specs, env.store) == {}

    write_plugin(plugin, 2.0)
    assert stale_runs(specs, env.store) == {student.run_id: "kdbench_stale_probe"}
    # kept on purpose: the stored record comes back as it was
    kept = run_sweep(specs, RunEnv(env.store, progress=False, reuse_stale=True))[1]
    assert kept.to_dict() == student.to_dict()
    # otherwise re-run, with the new code's fingerprint and numbers; the teacher is not trained again
    rerun_teacher, rerun = run_sweep(specs, env)
    assert rerun_teacher.to_dict() == teacher.to_dict()
    assert rerun.provenance["code_fingerprint"] == fingerprint(student_spec)["code_fingerprint"]
    assert rerun.provenance["code_fingerprint"] != student.provenance["code_fingerprint"]
    assert rerun.epochs[0]["loss"] > 1.5 * student.epochs[0]["loss"]  # the doubled loss, from a moved trajectory
    assert stale_runs(specs, env.store) == {}


def test_the_cli_says_which_runs_are_stale_and_why(plugin, tmp_path, capsys):
    argv = ["run", "--methods", "stale-probe", "--pairs", "resnet14:resnet8", "--dataset", "synthetic",
            "--recipe", "short", "--epochs", "1", "--train-subset", "64", "--teacher-epochs", "1",
            "--teacher-train-subset", "64", "--device", "cpu", "--results-dir", str(tmp_path / "results")]
    assert main(argv) == 0
    write_plugin(plugin, 3.0)
    capsys.readouterr()
    assert main(argv + ["--reuse-stale"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert "1 finished run(s) were made by other code and will be kept (--reuse-stale)" in line
    assert line.endswith("(changed: kdbench_stale_probe)")
    assert main(argv) == 0
    assert "will be re-run" in capsys.readouterr().err
    assert main(argv) == 0
    assert "other code" not in capsys.readouterr().err


def test_closure_covers_the_harness_and_the_methods_imports_not_the_report():
    core = module_closure("kdbench.harness")
    assert {"kdbench.harness", "kdbench.data", "kdbench.models.resnet", "kdbench.methods.base"} <= set(core)
    assert not {"kdbench.report", "kdbench.cli", "kdbench.results"} & set(core)
    dgkd = module_closure("kdbench.methods.dgkd")
    assert {"kdbench.methods.dgkd", "kdbench.methods.kd", "kdbench.methods.takd", "kdbench.data"} <= set(dgkd)
    assert "kdbench.methods.fitnet" not in dgkd


def test_the_compiled_path_counts_only_in_compiled_runs(monkeypatch):
    """kdbench.compiled runs only under --compile: an edit there re-runs compiled runs and leaves eager ones."""
    eager = next(s for s in tiny_sweep(methods=("kd",)).plan() if s.method == "kd")
    compiled = dataclasses.replace(eager, compile="default")
    assert "kdbench.compiled" not in fingerprint(eager)["code_files"]
    assert "kdbench.compiled" in fingerprint(compiled)["code_files"]
    before = {spec: fingerprint(spec)["code_fingerprint"] for spec in (eager, compiled)}
    real = kdbench.fingerprint._parsed

    def edited(path):
        digest, imports = real(path)
        return (digest + "-edited", imports) if path.name == "compiled.py" else (digest, imports)

    monkeypatch.setattr(kdbench.fingerprint, "_parsed", edited)
    assert fingerprint(eager)["code_fingerprint"] == before[eager]
    assert fingerprint(compiled)["code_fingerprint"] != before[compiled]


def test_records_carry_the_kernels_the_libraries_chose(env):
    """torch's CPU dispatch level and each loaded BLAS's kernel set go into the record and every results row, apart
    from the fingerprint: the same code under other kernels is the same code."""
    import numpy  # noqa: F401
    import torch
    from threadpoolctl import threadpool_info

    teacher, _ = run_sweep(tiny_sweep(methods=("kd",)).plan(), env)
    provenance = env.store.load_record(teacher.run_id).provenance
    assert provenance["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    numpy_blas = next(lib for lib in threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"])
    assert f"numpy: {numpy_blas['internal_api']} {numpy_blas['version']} {numpy_blas['architecture']}" in (
        provenance["blas_kernels"].split("; "))
    assert set(env.store.rebuild_table()["blas_kernels"]) == {provenance["blas_kernels"]}
    assert "blas_kernels" not in provenance["code_files"]
