"""Smoke test of benchmarks/voting_and_ttt.py: its task family's rule differs per task, holds under every view
inference and TTT use, and the script runs end to end (tuning on dev, then before / TTT / control on test)
writing every number the report quotes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import voting_and_ttt  # noqa: E402
from arc_dataset import Augmentation  # noqa: E402


def rule_of(pairs) -> tuple[str, int]:
    """The (colour rule, side) the pairs follow, checked on every pair."""
    sides = {o.shape for _, o in pairs}
    assert len(sides) == 1
    (side, other), = sides
    assert side == other
    outs = [int(o[0, 0]) for _, o in pairs]
    assert all(np.all(o == o[0, 0]) for _, o in pairs)
    if all(c == 0 for c in outs):
        return "background", side
    if all(c == int(i.max()) for (i, _), c in zip(pairs, outs)):
        return "query", side
    assert len(set(outs)) == 1 and outs[0] != 0
    return "task", side


def test_each_task_has_its_own_rule_and_every_view_keeps_it():
    tasks = voting_and_ttt.fill_tasks(60, seed=0, train_pairs=(2, 3, 4))
    rng = np.random.default_rng(0)
    rules = set()
    for task in tasks:
        assert len(task.train) in (2, 3, 4) and len(task.test) == 1
        pairs = task.train + task.test
        rule, side, _ = task.task_id.split("-")
        inputs = {int(c) for i, _ in pairs for c in np.unique(i) if c}
        if len(inputs) == 1:   # one input colour throughout makes "query" and "task" look alike
            continue
        assert rule_of(pairs) == (rule, int(side))
        view = Augmentation.random(rng, 0)
        viewed = [(view.apply(i), view.apply(o)) for i, o in pairs]
        assert rule_of(viewed) == (rule, int(side))
        rules.add((rule, side))
    assert len(rules) == 9


def test_grid_parser_and_argument_checks():
    assert voting_and_ttt.parse_grid("8:1e-3,32:3e-4") == [(8, 1e-3), (32, 3e-4)]
    with pytest.raises(SystemExit):
        voting_and_ttt.parse_args(["--ttt-steps", "4"])


def test_benchmark_tunes_on_dev_and_reports_before_ttt_and_control(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert voting_and_ttt.main(["--train-tasks", "40", "--dev-tasks", "2", "--test-tasks", "3", "--seeds", "0", "1",
                                "--max-steps", "10", "--eval-every", "5", "--target", "2", "--views", "3",
                                "--grid", "2:1e-3,3:1e-3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["seeds"]) == {"0", "1"}
    first, second = report["seeds"]["0"], report["seeds"]["1"]
    assert [(r["steps"], r["lr"]) for r in first["tuning"]] == [(2, 1e-3), (3, 1e-3)]
    assert all(r["tasks"] == 2 for r in first["tuning"])
    assert first["dev_before"]["tasks"] == 2
    assert "tuning" not in second    # settings are chosen once, on the first seed's dev tasks
    assert (second["ttt_steps"], second["ttt_lr"]) == (first["ttt_steps"], first["ttt_lr"])
    for out_seed in (first, second):
        assert out_seed["base"]["steps"] == 10 and len(out_seed["base"]["dev_trace"]) == 2
        for stage in voting_and_ttt.STAGES:
            r = out_seed[stage]
            assert r["tasks"] == 3 and r["views"] == 3
            assert 0 <= r["greedy_pass1"] <= r["greedy_view_pass2"] <= 1 and 0 <= r["voted_pass2"] <= 1
            assert 0 <= r["scoring_share"] <= 1 and r["eval_seconds_per_task"] > 0
            assert len(r["solved_voted"]) == round(r["voted_pass2"] * 3)
        assert out_seed["before"]["ttt_seconds_per_task"] == 0 and out_seed["ttt"]["ttt_seconds_per_task"] > 0
    assert "load_average_1_5_15min" in report and "pass@2 voted" in capsys.readouterr().out
