"""The documentation's executable parts: the "Writing a method" example, run from the page's own code blocks as a
plug-in installed through its entry points; the tables the docs hook generates, which must cover the registry; and the
README's links."""

import configparser
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
from conftest import tiny_sweep
from test_zoo_e2e import FEW_STEPS

import kdbench.methods as registry
from kdbench.harness import run_sweep
from kdbench.methods import list_methods, method_class
from kdbench.spec import RECIPES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "writing-a-method.md"
# The terms each example logs (loss_<term>) under each protocol: semckd adds KD to the feature method only.
TERMS = {("official", "example_logit"): {"ce", "logit_mse"}, ("official", "example_feature"): {"ce", "hint"},
         ("semckd", "example_logit"): {"ce", "logit_mse"}, ("semckd", "example_feature"): {"ce", "kd", "hint"}}


def _hook():
    spec = importlib.util.spec_from_file_location("registry_tables", DOCS / "hooks" / "registry_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_files(page: Path) -> dict[str, str]:
    """The page's code blocks that start with a ``# path`` comment, by that path."""
    blocks = re.findall(r"^```(?:python|toml)\n# (\S+)\n(.*?)^```", page.read_text(), re.M | re.S)
    return dict(blocks)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The page's package, installed as pip would lay it out (modules and a dist-info with its entry points) in a
    folder on sys.path, and the registry made to load entry points again; both undone afterwards."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    list_methods()  # the shipped methods registered for good, before the plug-in is on the path: they import once
    files = _code_files(EXAMPLE)
    assert set(files) == {"pyproject.toml", "kdbench_examples/example_logit.py", "kdbench_examples/example_feature.py"}
    project = tomllib.loads(files.pop("pyproject.toml"))["project"]
    package = tmp_path / "kdbench_examples"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    dist_info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                        f"Version: {project['version']}\n")
    entry_points = configparser.ConfigParser()
    entry_points.optionxform = str  # entry-point names keep their case
    entry_points.read_dict(project["entry-points"])
    with (dist_info / "entry_points.txt").open("w") as out:
        entry_points.write(out)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry._METHODS, "_entries", dict(registry._METHODS._entries))
    monkeypatch.setattr(registry, "_loaded", False)
    yield project["entry-points"]["kdbench.methods"]
    for name in [name for name in sys.modules if name.split(".")[0] == "kdbench_examples"]:
        del sys.modules[name]


def test_the_example_methods_load_through_their_entry_points_as_the_page_says(plugin):
    assert set(plugin) == {"example_logit", "example_feature"}
    for name, target in plugin.items():
        cls = method_class(name)
        assert cls.name == name and f"{cls.__module__}:{cls.__qualname__}" == target
    assert {"example_logit", "example_feature"} <= set(list_methods())
    logit, feature = method_class("example_logit"), method_class("example_feature")
    assert (logit.family, logit.logit_kd, feature.family, feature.logit_kd) == ("logit", True, "feature", False)
    # one objective under every protocol for the logit method; the feature method takes KD_4 under semckd only
    assert {logit.resolve_options({}, protocol) for protocol in ("official", "crd", "semckd")} == \
        {logit.resolve_options({})}
    assert [dict(feature.resolve_options({}, p))["kd_weight"] for p in ("official", "crd", "semckd")] == [0, 0, 1]
    assert feature.label(dict(feature.resolve_options({}, "semckd"))) == "example_feature (+KD)"
    assert logit.label(dict(logit.resolve_options({}, "semckd"))) == "example_logit"
    # the generated tables list a plug-in like any shipped method
    assert {"example_logit"} <= set(_rows(_hook().render("<!-- kdbench:methods logit -->")))


@pytest.mark.slow
def test_the_example_methods_train_through_the_harness_with_their_named_terms(plugin, env):
    for protocol in ("official", "semckd"):
        _, *runs = run_sweep(tiny_sweep(methods=tuple(plugin), recipe=FEW_STEPS, protocol=protocol).plan(), env)
        assert [run.spec.method for run in runs] == list(plugin)
        for run in runs:
            assert run.status == "finished", (protocol, run.spec.method, run.error)
            epoch = run.epochs[0]
            logged = {key.removeprefix("loss_") for key in epoch if key.startswith("loss_")}
            assert logged == TERMS[protocol, run.spec.method], (protocol, run.spec.method)
            assert all(math.isfinite(epoch[f"loss_{term}"]) for term in logged) and math.isfinite(epoch["loss"])
        extra = {run.spec.method: run.metrics["extra_params_train"] for run in runs}
        assert extra == {"example_logit": 0, "example_feature": 64 * 64 + 64}  # the pooled regressor, resnet8 -> 14
        labels = {run.spec.method: run.provenance["method_label"] for run in runs}
        assert labels["example_feature"] == ("example_feature (+KD)" if protocol == "semckd" else "example_feature")


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (an escaped pipe, ``\\|``, stays in its cell)."""
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split(" | ")]


def _rows(table: str) -> list[str]:
    """The names in a generated table's first column."""
    return [re.fullmatch(r"`([^`]+)`", _cells(line)[0]).group(1) for line in table.splitlines()[2:]]


def test_the_generated_tables_cover_every_registered_method_and_family():
    tables = _hook()
    pages = "\n".join(page.read_text() for page in DOCS.rglob("*.md"))
    listed = set(re.findall(r"<!-- kdbench:methods ([\w-]+) -->", pages)) - {"all"}
    # the shipped methods: other test files of this worker may have registered plug-ins of their own
    shipped = [m for m in list_methods() if method_class(m).__module__.startswith("kdbench.methods.")]
    assert listed == {method_class(m).family for m in shipped}  # a page per family, none for a family nothing has
    for table in (tables.methods_table, tables.options_table):
        assert _rows(table("all")) == list_methods()
        in_families = [name for family in listed for name in _rows(table(family)) if name in shipped]
        assert sorted(in_families) == sorted(shipped)  # each shipped method on exactly one family page
    assert re.findall(r"`([\w-]+)`", tables.recipes_table().splitlines()[0]) == RECIPES.names()


def test_the_compile_table_lists_the_methods_the_plan_refuses_compiled_with_their_modes():
    table = _hook().compile_table()
    assert _rows(table) == ["ab", "fsp", "kd_dot"]
    modes = {_cells(line)[0]: _cells(line)[1] for line in table.splitlines()[2:]}
    assert modes == {"`ab`": "reduce-overhead, max-autotune", "`fsp`": "reduce-overhead, max-autotune",
                     "`kd_dot`": "every mode"}


def test_the_options_table_shows_what_each_protocol_reference_pair_and_imagenet_pair_changes():
    table = _hook().options_table("all").splitlines()
    # method, logit defaults, own defaults, official, crd, semckd, the two reference pairs, the two ImageNet pairs
    assert _cells(table[0])[3:] == ["`official`", "`crd`", "`semckd`", "resnet56 → resnet20", "vgg13 → vgg8",
                                    "tv_resnet34 → tv_resnet18", "tv_resnet50 → mobilenet_v1"]
    row = dict(zip(_rows("\n".join(table)), (_cells(line) for line in table[2:])))
    assert row["fitnet"][3:] == ["as defaults", "as defaults", "`hint_layer=1`, `kd_weight=1.0`", "—", "—", "—", "—"]
    assert "`beta=100.0`" in row["fitnet"][2] and "`ce_weight=1.0`" in row["fitnet"][1]
    assert row["dkd"][6:8] == ["`beta=2.0`", "`beta=6.0`"]  # mdistiller's per-pair beta on CIFAR-100
    assert "`beta=0.5`" in row["dkd"][8] and "`temperature=1.0`" in row["dkd"][8]  # and its ImageNet configs
    assert "`beta=2.0`" in row["dkd"][9]
    assert "(`warmup_epochs` scaled by E/240, on Tiny-ImageNet E/200, on ImageNet E/100)" in row["dkd"][2]


def test_the_cost_table_reads_each_methods_runs_in_the_reference_set():
    """A row per registered method; a method with finished runs shows their mean speed (from the set's sitting,
    ``costs.parquet``, which priced every run of it), memory and parameters (the committed CE and KD runs on
    resnet56 -> resnet20), one without shows dashes."""
    import pandas as pd

    table = _hook().costs_table().splitlines()
    row = dict(zip(_rows("\n".join(table)), (_cells(line) for line in table[2:])))
    assert list(row) == list_methods()
    sitting = pd.read_parquet(ROOT / "results" / "reference-fashion-mnist-cpu" / "costs.parquet")
    kd = sitting[sitting.run_id.str.startswith("student-kd-resnet20-")
                 & (sitting.metric == "sitting_train_images_per_s")]
    assert len(kd) == 5
    speed = kd["value"].mean()
    assert row["kd"][1] == f"{speed:,.0f}" and row["kd"][3] == "0" and row["kd"][4] == row["student"][4] == "272,186"
    assert row["dkd_ls"][1:] == ["—"] * 8  # not in the set


def test_a_family_without_a_page_and_an_unknown_marker_fail_the_build():
    tables = _hook()
    errors = pytest.importorskip("mkdocs.exceptions")
    tables.on_pre_build(None)
    tables.on_page_markdown("<!-- kdbench:methods logit -->", None, None, None)
    with pytest.raises(errors.PluginError, match="family .*feature"):
        tables.on_post_build(None)
    page = type("Page", (), {"file": type("File", (), {"src_uri": "x.md"})})
    with pytest.raises(errors.PluginError, match="x.md: unknown docs marker"):
        tables.on_page_markdown("<!-- kdbench:tables -->", page, None, None)


def test_the_reference_report_keeps_its_text_and_loses_only_its_link_syntax():
    block = "<!-- reference-report:start -->\n| kd [o] [e] | 1 |\n<!-- reference-report:end -->"
    assert _hook().escape_report(f"[a] [b]\n{block}") == f"[a] [b]\n{block.replace('[', chr(92) + '[')}"


def test_the_readme_is_a_front_page_whose_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "```sh\nmake bench   # " in readme and "\nmake test    # run the test suite" in readme
    local = [link for link in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme) if "://" not in link]
    assert {"docs/index.md", "docs/reference-results.md", "docs/writing-a-method.md"} <= set(local)
    assert [link for link in local if not (ROOT / link).exists()] == []
