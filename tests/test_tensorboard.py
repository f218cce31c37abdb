"""--report-to tensorboard: the event files carry metrics.jsonl's numbers at the same steps, and a resumed run
appends without counting the redone steps twice."""
from __future__ import annotations

import shutil

import pytest

import checkpointing
import run_monitor
import trainloop_gpu_finetuned as trainloop
from test_trainloop import records, tiny_args, write_tasks


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `folder`, by tag: (step, value), as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files should hold for these metrics.jsonl lines."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for r in lines:
        prefix = {"step": "train", "epoch": "epoch"}.get(r["kind"])
        keys = [(f"{prefix}/{k}", k) for k in run_monitor.TENSORBOARD_SCALARS if prefix]
        keys += [(f"eval/{k}", k) for k in run_monitor.TENSORBOARD_EVAL_SCALARS]
        for tag, key in keys:
            if r.get(key) is not None:
                tags.setdefault(tag, []).append((r["step"], float(r[key])))
    return tags


def assert_same(actual, wanted) -> None:
    assert sorted(actual) == sorted(wanted)
    for tag, points in wanted.items():
        assert [s for s, _ in actual[tag]] == [s for s, _ in points], tag
        assert [v for _, v in actual[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_event_files_match_metrics_jsonl_and_a_resume_appends(tmp_path):
    data = write_tasks(tmp_path / "tasks.json", 4, 3, seed=0)
    argv = tiny_args(tmp_path, "run", "--epochs", "2", "--report-to", "tensorboard", "--eval-views", "2", data=data)
    argv[argv.index("--eval-tasks") + 1] = "2"
    assert trainloop.main(argv) == 0
    run = tmp_path / "run"
    lines = records(run)
    written = scalars(run / run_monitor.TENSORBOARD_DIR)
    assert_same(written, expected(lines))
    assert {"train/loss", "train/lr", "train/tokens_per_second", "epoch/loss", "epoch/epoch_seconds",
            "eval/eval_accuracy", "eval/eval_greedy_accuracy", "eval/eval_pass2_voted"} <= set(written)

    # A crash after the first epoch's checkpoint: the second epoch is redone from there, and TensorBoard shows
    # each step once (purge_step), the same numbers as the restored metrics.jsonl.
    first, last = sorted((run / checkpointing.CHECKPOINT_DIR).iterdir())[-2:]
    shutil.rmtree(last)
    shutil.rmtree(run / "model")
    assert trainloop.main(["--resume", str(run), "--model-name", "tiny"]) == 0
    resumed = records(run)
    # each run ends its metrics with one "kind": "run" line (no step); the resumed run's replaces the first's
    assert [r["kind"] for r in lines].count("run") == [r["kind"] for r in resumed].count("run") == 1
    assert [r["step"] for r in resumed if r["kind"] != "run"] == [r["step"] for r in lines if r["kind"] != "run"]
    assert_same(scalars(run / run_monitor.TENSORBOARD_DIR), expected(resumed))


def test_report_to_none_writes_no_event_files(tmp_path):
    assert trainloop.main(tiny_args(tmp_path, "run", "--epochs", "1", "--max-batches", "2")) == 0
    assert not (tmp_path / "run" / run_monitor.TENSORBOARD_DIR).exists()


def test_report_to_tensorboard_without_the_package_is_one_line_before_the_run(tmp_path, monkeypatch):
    import importlib.util

    from errors import UserError
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(UserError, match="--report-to tensorboard needs the tensorboard package"):
        trainloop.main(tiny_args(tmp_path, "run", "--report-to", "tensorboard"))
    assert not (tmp_path / "run").exists()
