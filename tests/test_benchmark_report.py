"""The shared results writer of benchmarks/ and experiments/ (`benchmarks/report.py`): one JSON
with the machine and the rows, one CSV with nested values flattened, nothing else unasked."""

from __future__ import annotations

import csv
import json

from benchmarks.report import flatten, write_results

MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "gpu": None}


def test_write_results_writes_json_with_machine_and_a_flat_csv(tmp_path):
    rows = [
        {"report": "a.json", "accuracy": 0.5, "causes": {"right": 1, "skipped": 1}},
        {"report": "b.json", "accuracy": 1.0, "causes": {"right": 2, "skipped": 0}, "extra": [1, 2]},
    ]
    path = write_results("count_errors", rows, meta={"baseline": "a.json"}, out_dir=tmp_path, machine=MACHINE)

    assert path == tmp_path / "count_errors.json"
    data = json.loads(path.read_text())
    assert data == {"benchmark": "count_errors", "baseline": "a.json", "machine": MACHINE, "rows": rows}
    with (tmp_path / "count_errors.csv").open() as f:
        table = list(csv.DictReader(f))
    # Columns in first-seen order; a row without a column leaves it empty.
    assert list(table[0]) == ["report", "accuracy", "causes.right", "causes.skipped", "machine", "extra"]
    assert table[0]["causes.right"] == "1" and table[0]["extra"] == ""
    assert table[1]["extra"] == "[1, 2]" and table[1]["machine"] == "Test CPU x2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count_errors.csv", "count_errors.json"]


def test_write_results_without_rows_writes_only_the_json(tmp_path):
    write_results("gpu_7b_cpu_dry_run", [], meta={"preset": "tiny"}, out_dir=tmp_path, machine=MACHINE)
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_7b_cpu_dry_run.json"]


def test_flatten_names_nested_keys_with_dots():
    assert flatten({"a": {"b": {"c": 1}}, "d": (1, 2)}) == {"a.b.c": 1, "d": "[1, 2]"}
