"""Smoke test of benchmarks/voting_and_ttt.py: it runs end to end on a few steps and writes every number
the report quotes; its task family's rule is read from the demonstrations (differs per task)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import voting_and_ttt  # noqa: E402


def test_each_task_recolours_its_own_colour_and_the_rule_needs_the_demonstrations():
    tasks = voting_and_ttt.recolour_tasks(20, seed=0, train_pairs=(3, 4))
    rules = set()
    for task in tasks:
        assert len(task.train) in (3, 4) and len(task.test) == 1
        pairs = task.train + task.test
        (a,) = {int(c) for i, _ in pairs for c in i.ravel() if c}
        (b,) = {int(c) for _, o in pairs for c in o.ravel() if c}
        assert a != b and all(np.array_equal(o, np.where(i == a, b, 0)) for i, o in pairs)
        rules.add((a, b))
    assert len(rules) > 10


def test_benchmark_runs_and_reports_greedy_voted_and_test_time_training(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert voting_and_ttt.main(["--train-tasks", "40", "--dev-tasks", "4", "--held-out", "4", "--max-steps", "20",
                                "--eval-every", "10", "--target", "2", "--views", "4", "--ttt-steps", "5",
                                "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["train_steps"] == 20 and len(report["dev_trace"]) == 2
    for stage in ("before_ttt", "after_ttt"):
        assert report[stage]["greedy"]["views"] == 1 and report[stage]["voted"]["views"] == 4
        assert report[stage]["product"]["score"] == "product" and report[stage]["voted"]["tasks"] == 4
    assert report["control_more_training"]["voted"]["tasks"] == 4 and report["ttt"] == "per-task"
    assert "load_average_1_5_15min" in report and "voted pass@2" in capsys.readouterr().out
