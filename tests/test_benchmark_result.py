"""benchmark_result: the typed result round-trips through its JSON, and the one loader refuses every kind of
broken file with one line naming the file and the field (issue 11's cases)."""
from __future__ import annotations

import dataclasses
import gzip
import json
import math

import pytest

import benchmark_result
import throughput_report
from errors import UserError
from result_examples import example_result


def test_round_trip_keeps_every_field_and_writes_atomically(tmp_path):
    result = example_result()
    path = tmp_path / "sub" / "result.json"
    result.write(path)
    assert benchmark_result.load(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]   # no temporary left behind
    raw = json.loads(path.read_text())
    assert raw["format"] == benchmark_result.RESULT_FORMAT and raw["per_batch_ms"]["mean"] == 10.0
    assert {k: raw["recommendations"][0][k] for k in ("budget_hours", "epochs", "total_hours", "max_batches")} == {
        "budget_hours": 0.5, "epochs": 3, "total_hours": 0.5, "max_batches": None}
    assert raw["run_costs"]["checkpoint_seconds"] == 1.0 and raw["schedule"]["save_every"] == 1000


def test_a_version_1_result_is_refused_with_what_to_do(tmp_path):
    raw = json.loads(example_result().to_json())
    raw["format"] = "arc-throughput/1"
    del raw["run_costs"], raw["schedule"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"arc-throughput/1.*cannot plan the whole run.*measure_throughput.py --json"):
        benchmark_result.load(path)


def test_a_breakdown_must_sum_to_the_planned_seconds():
    import dataclasses
    row = dataclasses.replace(example_result().recommendations[0], planned_seconds=100.0,
                              breakdown={"startup": 1.0, "training": 90.0, "evaluation": 5.0, "checkpoints": 1.0})
    with pytest.raises(ValueError, match="does not sum"):
        example_result(recommendations=(row,))


def test_the_report_reads_the_fields():
    text = throughput_report.format_report(example_result())
    assert "CPU: cpu (1 thread)" in text and "Average:     10.00 ms" in text
    assert "cost model a + b*tokens" in text and "<- recommended" in text and "Next command:" in text


def test_missing_files_and_unreadable_json_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        benchmark_result.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable throughput result"):
        benchmark_result.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"device": "cpu"}))
    with pytest.raises(UserError, match="missing"):
        benchmark_result.load(tmp_path / "other.json")


def _broken(tmp_path, change) -> str:
    """The loader's message for example_result's JSON after `change(raw)`."""
    raw = json.loads(example_result().to_json())
    change(raw)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError) as err:
        benchmark_result.load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(epoch_seconds=float("nan")), "epoch_seconds"),
    (lambda r: r.update(epoch_seconds=float("inf")), "epoch_seconds"),
    (lambda r: r.update(epoch_seconds="600"), "epoch_seconds: expected a number, got the string '600'"),
    (lambda r: r.update(batches_per_epoch=True), "batches_per_epoch: expected a whole number"),
    (lambda r: r.update(batches_per_epoch=12.5), "batches_per_epoch: expected a whole number"),
    (lambda r: r.update(epoch_seconds=0), "epoch_seconds: the result has no epoch time"),
    (lambda r: r.update(settings=None), "settings: expected an object, got null"),
    (lambda r: r.update(settings=["cpu"]), "settings: expected an object, got a list"),
    (lambda r: r.update(recommendations=None), "recommendations: expected a list, got null"),
    (lambda r: r.update(recommendations=["junk"]), "recommendations[0]: expected an object"),
    (lambda r: r["recommendations"][0].update(epochs="3"), "recommendations[0].epochs: expected a whole number"),
    (lambda r: r["recommendations"][0].pop("max_batches"), "recommendations[0].max_batches: missing"),
    (lambda r: r["projections"]["linear"].update(coefficients=[1.0]),
     "projections.linear.coefficients: 1 numbers, a linear cost model has 2"),
    (lambda r: r["projections"]["linear"].update(coefficients=[1.0, "2"]),
     "projections.linear.coefficients[1]: expected a number"),
    (lambda r: r["projections"]["linear"].update(coefficients=None), "projections.linear.coefficients"),
    (lambda r: r["epoch_projection"].update(kind="cubic"), "epoch_projection.kind: 'cubic'"),
    (lambda r: r.update(format="arc-throughput/0"), "format 'arc-throughput/0'"),
    (lambda r: r.pop("tier"), "tier: missing"),
    (lambda r: r["device"].update(name=None), "device.name: expected a string, got null"),
])
def test_broken_fields_are_refused_naming_the_field(tmp_path, change, expected):
    assert expected in _broken(tmp_path, change)


def test_non_finite_literals_in_the_text_are_refused(tmp_path):
    text = example_result().to_json().replace('"epoch_seconds": 600.0', '"epoch_seconds": NaN')
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(UserError, match="epoch_seconds: expected a finite number, got nan"):
        benchmark_result.load(path)


def test_gzip_and_utf16_bytes_are_refused_with_what_to_do(tmp_path):
    text = example_result().to_json()
    (tmp_path / "r.json.gz").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(UserError, match="gzip-compressed.*gunzip"):
        benchmark_result.load(tmp_path / "r.json.gz")
    (tmp_path / "r16.json").write_bytes(text.encode("utf-16"))
    with pytest.raises(UserError, match="UTF-16 text, not UTF-8"):
        benchmark_result.load(tmp_path / "r16.json")
    (tmp_path / "latin.json").write_bytes(b'{"x": "\xe9"}')
    with pytest.raises(UserError, match="not UTF-8 text"):
        benchmark_result.load(tmp_path / "latin.json")


def test_a_result_never_holds_nan():
    with pytest.raises(ValueError):
        dataclasses.replace(example_result(), tokens_per_second=math.nan).to_json()
