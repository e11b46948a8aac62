"""A results directory's table holds exactly its own runs: nested result sets are never pooled."""

from conftest import TINY

from kdbench.results import ResultsStore, RunRecord
from kdbench.spec import RunSpec


def finished(store: ResultsStore, seed: int) -> RunRecord:
    spec = RunSpec(dataset="synthetic", student="resnet8", method="student", seed=seed, recipe=TINY)
    record = RunRecord(spec, "finished", {"top1_best": 50.0 + seed}, [], {})
    store.write_record(record)
    return record


def test_a_nested_result_set_stays_apart(tmp_path):
    outer, nested = ResultsStore(tmp_path / "results"), ResultsStore(tmp_path / "results" / "reference-set")
    mine = finished(outer, 0)
    theirs = [finished(nested, seed) for seed in (1, 2)]
    assert set(nested.rebuild_table().run_id) == {r.run_id for r in theirs}
    table = outer.rebuild_table()  # the nested set's own metrics.parquet sits one level down: not a run
    assert set(table.run_id) == {mine.run_id}
    assert set(nested.rebuild_table().run_id) == {r.run_id for r in theirs}
