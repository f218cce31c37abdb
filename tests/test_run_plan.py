"""run_plan: --epochs auto from a benchmark result, the benchmark's cost model, and the frozen plan."""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import run_plan
import throughput_report
from benchmark_result import ProjectionInfo, Recommendation
from errors import UserError
from result_examples import example_result


def test_epochs_from_benchmark_takes_the_whole_run_row_and_plans_other_budgets():
    import run_budget
    current = {"device": "T4", "batch_size": 1}
    listed = Recommendation(budget_hours=2.0, epochs=4, total_hours=1.9, fits_epochs=4, capped=False, max_batches=None,
                            planned_seconds=6840.0, margin=0.05, source="--time-budget",
                            breakdown={"startup": 5.0, "training": 6745.6, "evaluation": 80.0, "checkpoints": 9.4},
                            counts={"batches": 12928, "optimizer_steps": 12928, "evaluations": 4, "checkpoints": 16,
                                    "final_saves": 1, "plots": 5})
    result = example_result(settings=dict(current), batches_per_epoch=3232, epoch_seconds=1686.4, max_useful_epochs=10,
                            recommendations=(listed,))
    epochs, max_batches, why, plan, margin = run_plan.epochs_from_benchmark(result, "r.json", 7200, current, 3232)
    assert (epochs, max_batches, margin) == (4, None, 0.05)
    assert plan.planned_seconds == pytest.approx(6840.0) and plan.breakdown["evaluation"] == 80.0  # the row, as is
    assert "training" in why and "5% margin" in why
    # a budget without a row: planned the same way (start-up, 1.5 s of saves per epoch, the margin's floor for a
    # CPU result, 20%, the reserve): 6 epochs (10,118 s of training) x 1.20 are over 3 h, 5 fit
    epochs, _, _, plan, _ = run_plan.epochs_from_benchmark(result, "r.json", 3 * 3600, current, 3232)
    assert epochs == 5 and plan.planned_seconds * 1.20 < 3 * 3600
    epochs, max_batches, why, plan, _ = run_plan.epochs_from_benchmark(result, "r.json", 900, current, 3232)
    # 900 s / 1.20 = 750 s, less start-up and the reserve, at 0.52 s a batch
    assert epochs == 1 and 1350 < max_batches < 1440 and "a whole epoch does not fit" in why
    assert plan.breakdown["startup"] == 5.0 and plan.planned_seconds * 1.05 <= 900
    with pytest.raises(UserError, match="batches per epoch: benchmark 3232, this run 100"):
        run_plan.epochs_from_benchmark(result, "r.json", 7200, current, 100)
    with pytest.raises(UserError, match="shorter than the smallest run.*give at least --time-budget"):
        run_plan.epochs_from_benchmark(result, "r.json", 6, current, 3232)
    other = run_plan.benchmark_result.Schedule(eval_tasks=100, eval_data=None, eval_every=0, eval_batch_size=8,
                                               eval_attempts=1, eval_views=1, save_every=1000, grad_accum=1)
    with pytest.raises(UserError, match="--eval-tasks: benchmark 0, this run 100"):
        run_plan.epochs_from_benchmark(result, "r.json", 7200, current, 3232, other)
    assert run_budget.PARTS == tuple(plan.breakdown)


def test_benchmark_cost_model_from_the_result():
    result = example_result(projections={"quadratic": ProjectionInfo("q", 600.0, 0.01, 1.0, (5.0, 14.0, 14.0))},
                            epoch_projection=example_result().epoch_projection.__class__(
                                "quadratic", "q", 0.01, "fits best", 0, None))
    model = run_plan.benchmark_cost_model(result)
    assert model.predict([throughput_report.BatchShape(1, 1000, 1000)])[0] == pytest.approx(33.0)


class FakeData:
    """Epochs of 10 batches of 5 tokens each."""

    def num_batches(self, epoch: int) -> int:
        return 10

    def lengths(self, epoch: int) -> np.ndarray:
        return np.full(10, 5)


def _args(**changes) -> argparse.Namespace:
    values = dict(grad_accum=1, output_dir=None, time_budget=None)
    values.update(changes)
    return argparse.Namespace(**values)


def test_plan_counts_batches_per_process_and_steps_over_all_epochs():
    ctx = SimpleNamespace(world_size=3, broadcast_object=lambda obj: obj)
    evaluation = run_plan.EvalPlan((), None, 0, 1, 8, 0)
    plan = run_plan.make_plan(_args(grad_accum=3), FakeData(), ctx, 2, None, evaluation, None, started=100.0)
    assert plan.epoch_batches == (4, 4) and plan.total_steps == 2   # ceil(10 / 3) per process; 8 // 3 steps
    assert plan.output_dir.parent == run_plan.RUNS_DIR and plan.deadline is None
    limited = run_plan.make_plan(_args(time_budget=60.0, output_dir="out"), FakeData(), ctx, 3, 2, evaluation, None,
                                 started=100.0)
    assert limited.epoch_batches == (2, 2, 2) and limited.deadline == 160.0 and limited.output_dir == Path("out")
    assert limited.record() == {"epochs": 3, "max_batches": 2, "epoch_batches": [2, 2, 2], "total_steps": 6,
                                "output_dir": "out"}
    resumed = run_plan.make_plan(_args(), FakeData(), ctx, 1, None, evaluation,
                                 Path("runs/a/checkpoints/step-00000004"), started=0.0)
    assert resumed.output_dir == Path("runs/a") and resumed.tokens_of_epochs(0) == 20
    with pytest.raises(UserError, match="no optimizer step would happen"):
        run_plan.make_plan(_args(grad_accum=9), FakeData(), ctx, 1, 2, evaluation, None, started=0.0)
    with pytest.raises(AttributeError):
        plan.epochs = 5  # frozen


def test_evaluation_is_due_every_n_steps_only_when_on():
    on = run_plan.EvalPlan(("task",), "tasks", 5, 1, 8, 0)
    assert [step for step in range(1, 16) if on.due(step)] == [5, 10, 15]
    assert not run_plan.EvalPlan((), None, 5, 1, 8, 0).due(5) and not run_plan.EvalPlan((), None, 5, 1, 8, 0)
