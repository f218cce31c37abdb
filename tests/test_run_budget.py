"""The whole-run plan (run_budget.py) on fixed numbers: event counts against a literal replay of the trainer's
rules, breakdowns that sum, the margin, budgets too short or without a unit, and the printed line."""
from __future__ import annotations

import itertools
import dataclasses
import json
import math

import pytest

import run_budget as rb
import throughput_report


def replay_trainer(epochs: int, batches_per_epoch: int, max_batches: int | None, grad_accum: int, eval_on: bool,
                   eval_every: int, save_every: int) -> tuple[int, int, int]:
    """(evaluations, checkpoint writes, optimizer steps) by stepping through the trainer's loop literally:
    TrainStep steps on every grad_accum-th call over the whole run; `_after_step` evaluates and saves only
    mid-epoch; `_end_epoch_now` evaluates and saves at every epoch end."""
    n = min(batches_per_epoch, max_batches or batches_per_epoch)
    micro = step = evaluations = checkpoints = 0
    for _ in range(epochs):
        for batch in range(1, n + 1):
            stepped = (micro + 1) % grad_accum == 0
            micro += 1
            if stepped:
                step += 1
                mid_epoch = batch < n
                if mid_epoch and eval_on and eval_every and step % eval_every == 0:
                    evaluations += 1
                if mid_epoch and save_every and step % save_every == 0:
                    checkpoints += 1
        evaluations += eval_on
        checkpoints += 1
    return evaluations, checkpoints, step


@pytest.mark.parametrize("epochs,bpe,max_batches,grad_accum,eval_every,save_every", [
    (1, 100, None, 1, 0, 0), (3, 100, None, 1, 10, 25), (3, 100, None, 1, 50, 100), (2, 3232, None, 1, 0, 1000),
    (4, 97, None, 4, 5, 7), (3, 10, None, 3, 1, 1), (5, 100, 30, 2, 4, 6), (2, 100, 7, 7, 1, 1),
    (6, 12, None, 5, 2, 3), (1, 50, 20, 1, 20, 20), (3, 64, None, 8, 0, 2),
])
def test_counts_match_the_trainers_rules(epochs, bpe, max_batches, grad_accum, eval_every, save_every):
    for eval_on in (True, False):
        schedule = rb.Schedule(bpe, epochs, max_batches, grad_accum, eval_on, eval_every, save_every)
        counts = rb.count_events(schedule)
        assert (counts.evaluations, counts.checkpoints, counts.optimizer_steps) == replay_trainer(
            epochs, bpe, max_batches, grad_accum, eval_on, eval_every, save_every)
        assert counts.final_saves == 1 and counts.plots == epochs + 1
        assert counts.batches == epochs * min(bpe, max_batches or bpe)


def test_counts_over_a_grid_of_settings():
    for epochs, bpe, mb, g, ee, se in itertools.product((1, 2, 5), (1, 6, 13), (None, 4), (1, 2, 3), (0, 1, 2, 5),
                                                        (0, 3)):
        if min(bpe, mb or bpe) * epochs < g:
            with pytest.raises(ValueError, match="no optimizer step"):
                rb.count_events(rb.Schedule(bpe, epochs, mb, g, True, ee, se))
            continue
        counts = rb.count_events(rb.Schedule(bpe, epochs, mb, g, True, ee, se))
        assert (counts.evaluations, counts.checkpoints, counts.optimizer_steps) == replay_trainer(
            epochs, bpe, mb, g, True, ee, se), (epochs, bpe, mb, g, ee, se)


COSTS = rb.RunCosts(startup_seconds=72.0, epoch_seconds=930.0, batches_per_epoch=3232, eval_pass_seconds=102.0,
                    checkpoint_seconds=6.0, final_save_seconds=2.5, plot_seconds=0.4, expected_error=0.10)
SCHEDULE = rb.Schedule(3232, eval_enabled=True, eval_every=0, save_every=1000)


def test_the_breakdown_sums_and_counts_each_part():
    plan = rb.plan_run(COSTS, SCHEDULE.with_length(6, None))
    assert set(plan.breakdown) == {"startup", "training", "evaluation", "checkpoints"}
    assert plan.planned_seconds == sum(plan.breakdown.values())
    assert plan.training == 6 * 930.0
    assert plan.evaluation == 6 * 102.0                    # one per epoch end, none mid-epoch
    # epoch ends + steps 1000, 2000, ..., 19000: steps count over the whole run (19392 of them), and none of
    # those multiples of 1000 is an epoch's last batch (a multiple of 3232)
    assert plan.counts.checkpoints == 6 + 19
    assert plan.checkpoints == pytest.approx(25 * 6.0 + 2.5 + 7 * 0.4)
    # the first redraw's one-off (matplotlib's import) is planned once, with the redraws, not with the start-up
    first = rb.plan_run(dataclasses.replace(COSTS, first_plot_extra_seconds=3.0), SCHEDULE.with_length(6, None))
    assert first.checkpoints == pytest.approx(plan.checkpoints + 3.0) and first.startup == plan.startup
    # each epoch after the first draws and encodes its samples before its first step: training time
    prepared = rb.plan_run(dataclasses.replace(COSTS, epoch_data_seconds=2.0), SCHEDULE.with_length(6, None))
    assert prepared.training == pytest.approx(plan.training + 5 * 2.0) and prepared.startup == plan.startup
    for row in rb.recommendations(COSTS, SCHEDULE, time_budget_seconds=5400):
        data = row.as_json()
        assert data["planned_seconds"] == sum(data["breakdown"].values())
        assert data["total_hours"] == data["planned_seconds"] / 3600
        json.dumps(data)


def test_recommended_plan_fits_at_the_upper_end_and_one_more_epoch_does_not():
    for hours in (0.5, 1, 2, 3):
        row = rb.recommend(hours * 3600, COSTS, SCHEDULE)
        assert not row.capped
        assert row.margin == pytest.approx(0.10)
        assert row.planned_seconds * 1.10 <= hours * 3600
        longer = rb.plan_run(COSTS, SCHEDULE.with_length(row.epochs + 1, None))
        assert longer.planned_seconds * 1.10 > hours * 3600
    two = rb.recommend(7200, COSTS, SCHEDULE)
    # training alone would fit 7 epochs (7 x 930 s = 1.81 h); the whole run fits 6
    assert throughput_report.recommend_for_budget(2, 930.0, 3232).epochs == 7
    assert two.epochs == 6


def test_evaluation_off_is_todays_plan_plus_startup_and_saves():
    off = rb.Schedule(3232, eval_enabled=False, save_every=0)
    for epochs in (1, 3, 10):
        plan = rb.plan_run(COSTS, off.with_length(epochs, None))
        today = throughput_report.Recommendation(0, epochs, epochs * 930.0 / 3600, epochs, False, None)
        assert plan.evaluation == 0 and plan.counts.evaluations == 0
        assert plan.training == pytest.approx(today.total_hours * 3600)
        assert plan.planned_seconds == pytest.approx(today.total_hours * 3600 + 72.0 + epochs * 6.0 + 2.5
                                                     + (epochs + 1) * 0.4)
    # with nothing but training and no margin, the table is exactly today's
    bare = rb.RunCosts(0.0, 930.0, 3232, expected_error=0.0)
    policy = rb.BudgetPolicy(min_margin=0.0)
    for hours in (0.1, 0.5, 1, 2, 4, 8, 12):
        mine = rb.recommend(hours * 3600, bare, off, policy)
        old = throughput_report.recommend_for_budget(hours, 930.0, 3232)
        assert (mine.epochs, mine.fits_epochs, mine.capped, mine.max_batches) == (
            old.epochs, old.fits_epochs, old.capped, old.max_batches), hours


def test_the_margin_follows_the_expected_error_with_a_floor():
    assert rb.margin_for(0.127) == pytest.approx(0.127)
    assert rb.margin_for(0.01) == rb.MIN_MARGIN == 0.10
    assert rb.margin_for(None) == rb.margin_for(math.inf) == rb.margin_for(math.nan) == rb.UNKNOWN_MARGIN
    assert rb.margin_for(0.01, rb.BudgetPolicy(min_margin=0.02)) == 0.02
    tight, loose = (rb.RunCosts(72, 930, 3232, 102, 6, 2.5, expected_error=e) for e in (0.02, 0.30))
    rows_tight = rb.recommendations(tight, SCHEDULE)
    rows_loose = rb.recommendations(loose, SCHEDULE)
    assert [r.margin for r in rows_tight] == [0.10] * 6 and [r.margin for r in rows_loose] == [0.30] * 6
    assert all(a.epochs >= b.epochs for a, b in zip(rows_tight, rows_loose))
    assert any(a.epochs > b.epochs for a, b in zip(rows_tight, rows_loose))
    for row in rows_loose:
        assert row.planned_seconds * 1.30 <= row.budget_seconds


def test_the_evaluation_part_carries_its_own_error():
    plan = rb.plan_run(COSTS, SCHEDULE.with_length(4, None))
    assert rb.plan_margin(plan, COSTS) == pytest.approx(0.10)          # no eval_error: the expected error
    shaky = rb.RunCosts(**{**vars(COSTS), "eval_error": 0.40})
    share = plan.evaluation / plan.planned_seconds
    assert rb.plan_margin(plan, shaky) == pytest.approx(0.10 * (1 - share) + 0.40 * share)
    row = rb.recommend(4 * 3600, shaky, SCHEDULE)
    assert row.margin == pytest.approx(rb.plan_margin(row.plan, shaky))
    assert row.planned_seconds * (1 + row.margin) <= 4 * 3600
    assert row.epochs <= rb.recommend(4 * 3600, COSTS, SCHEDULE).epochs
    exact = rb.RunCosts(**{**vars(COSTS), "eval_error": 0.0, "expected_error": 0.0})
    assert rb.plan_margin(plan, exact) == rb.MIN_MARGIN


def test_the_reserve_is_kept_free():
    row = rb.recommend(3600, COSTS, SCHEDULE, rb.BudgetPolicy(reserve_seconds=300))
    assert row.planned_seconds * 1.10 + 300 <= 3600
    # the trainer's stop rule: 5 s + 2 steps + half a checkpoint and final save beyond the plan, and 20% of
    # an evaluation (it skips one with less than 1.2x its time left)
    assert rb.stop_rule_reserve(COSTS, 0.5) == pytest.approx(5 + 1.0 + 0.5 * (6.0 + 2.5) + 0.2 * 102.0)


def test_partial_epoch_row_is_the_most_batches_whose_whole_plan_fits():
    budget = 600.0  # less than one epoch (930 s) plus its evaluation
    row = rb.recommend(budget, COSTS, SCHEDULE)
    assert row.epochs == 1 and row.fits_epochs == 0 and row.max_batches is not None
    assert row.planned_seconds * 1.10 <= budget
    more = rb.plan_run(COSTS, SCHEDULE.with_length(1, row.max_batches + 1))
    assert more.planned_seconds * 1.10 > budget
    assert row.max_batches == 1237
    assert row.plan.counts.evaluations == 1 and row.plan.counts.checkpoints == 2  # step 1000, and the epoch end
    assert "--max-batches" in rb.format_row(row)


def test_partial_epoch_uses_the_predicted_batch_times_in_order():
    # the first half of the epoch's batches are 3x as long as the second half
    seconds = tuple([0.3] * 50 + [0.1] * 50)
    costs = rb.RunCosts(0.0, sum(seconds), 100, batch_seconds=seconds, expected_error=0.0)
    schedule = rb.Schedule(100, eval_enabled=False, save_every=0)
    plan = rb.plan_run(costs, schedule.with_length(1, 50))
    assert plan.training == pytest.approx(15.0)            # not 50 x the mean 0.2 s
    plan3 = rb.plan_run(costs, schedule.with_length(3, 50))
    assert plan3.training == pytest.approx(15.0 + 2 * 10.0)  # later epochs: other batches, at the mean


def test_a_budget_shorter_than_startup_plus_one_evaluation_is_refused_with_the_minimum():
    minimum = rb.minimum_budget_seconds(COSTS, SCHEDULE)
    smallest = rb.plan_run(COSTS, SCHEDULE.with_length(1, 1))
    assert minimum == pytest.approx(smallest.planned_seconds * 1.10)
    assert minimum > 72.0 + 102.0
    assert rb.budget_problem(minimum, COSTS, SCHEDULE) is None
    problem = rb.budget_problem(150.0, COSTS, SCHEDULE)    # below start-up + one evaluation
    assert problem is not None and "shorter than" in problem and "--time-budget 4m" in problem
    row = rb.recommend(150.0, COSTS, SCHEDULE)
    assert row.plan is None and row.needed_seconds == pytest.approx(minimum)
    assert "too short" in rb.format_row(row)
    # the smallest run with grad accumulation is one optimizer step: grad_accum batches
    accum = rb.Schedule(3232, grad_accum=4)
    assert rb.minimum_budget_seconds(COSTS, accum) == pytest.approx(
        rb.plan_run(COSTS, accum.with_length(1, 4)).planned_seconds * 1.10)
    # evaluation off: the minimum drops the evaluation
    assert rb.minimum_budget_seconds(COSTS, rb.Schedule(3232, eval_enabled=False)) < 72.0 + 102.0


def test_unit_less_budgets_are_refused():
    from cli_common import parse_duration   # the one duration parser (run_budget has none of its own)
    assert parse_duration("2h") == 7200 and parse_duration("90m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("1.5 hours") == 5400 and parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="needs a unit: write e.g. 2s, 2m or 2h"):
        parse_duration("2")
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration(" 3600 ")
    for bad in ("two hours", "2x", "-1h", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration("0m")


def test_the_printed_line():
    costs = rb.RunCosts(72.0, 5580.0 / 6, 3232, 612.0 / 6, 23.0, 4.0, expected_error=0.10)
    row = rb.recommend(7200, costs, rb.Schedule(3232, save_every=0))
    assert rb.format_row(row) == ("2 hours -> 6 epochs (~1.78 h: training 1.55 h, evaluation 0.17 h, "
                                  "checkpoints 0.04 h, start-up 0.02 h; 10% margin)")
    short = rb.recommend(300, rb.RunCosts(10.0, 40.0, 100, 5.0, 0.5, 0.2, expected_error=0.03),
                         rb.Schedule(100, save_every=0))
    # 6 epochs would plan 283 s, over 300 s with the 10% floor; 5 plan 238 s
    assert rb.format_row(short).startswith("5 minutes -> 5 epochs (~4.0 min: training 3.3 min, evaluation 0.4 min")
    assert rb.format_row(short).endswith("; 10% margin)")
    off = rb.recommend(300, rb.RunCosts(10.0, 40.0, 100, expected_error=0.03), rb.Schedule(100, eval_enabled=False))
    assert "no evaluation" in rb.format_row(off)
    capped = rb.recommend(12 * 3600, COSTS, SCHEDULE)
    assert capped.capped and capped.epochs == 10 and "fit; returns diminish" in rb.format_row(capped)


def test_the_time_budget_gets_its_own_row_and_auto_takes_it():
    rows = rb.recommendations(COSTS, SCHEDULE, time_budget_seconds=7200)
    assert [r.source for r in rows] == ["table"] * 6 + ["--time-budget"]
    data = [r.as_json() for r in rows]
    assert rb.row_for_budget(data, 7200)["source"] == "--time-budget"
    assert rb.row_for_budget(data, 1800)["source"] == "table"
    assert rb.row_for_budget(data, 1234) is None


def test_run_record_and_comparison():
    plan = rb.plan_run(COSTS, SCHEDULE.with_length(2, None))
    measured = rb.MeasuredRun(run_seconds=plan.planned_seconds * 1.02 + 3, startup=70.0, training=1900.0,
                              evaluation=200.0, checkpoints=60.0, counts={"evaluations": 2, "checkpoints": 8})
    record = rb.run_record(measured, plan, budget_seconds=3600)
    assert record["kind"] == "run" and record["plan"]["planned_seconds"] == pytest.approx(plan.planned_seconds)
    assert record["plan_error"] == pytest.approx(measured.run_seconds / plan.planned_seconds - 1, abs=1e-4)
    assert record["other_seconds"] == pytest.approx(measured.run_seconds - 2230.0, abs=1e-3)
    json.dumps(record)
    lines = rb.format_comparison(measured, plan)
    assert any(line.strip().startswith("training") and "planned" in line and "measured" in line for line in lines)
    assert lines[-1].strip().startswith("whole run")
    assert "kind" in rb.run_record(measured, None) and "plan" not in rb.run_record(measured, None)


def test_the_margin_floor_is_higher_on_a_cpu():
    assert rb.min_margin_for("cpu") == rb.CPU_MIN_MARGIN == 0.20
    assert rb.min_margin_for("cuda") == rb.MIN_MARGIN == 0.10
    costs = rb.RunCosts(10.0, 40.0, 100, 5.0, 0.5, 0.2, expected_error=0.03)
    # 5 epochs plan 238 s: x 1.10 fits 280 s, x 1.20 does not
    cpu = rb.recommend(280, costs, rb.Schedule(100, save_every=0), rb.BudgetPolicy(min_margin=rb.min_margin_for("cpu")))
    gpu = rb.recommend(280, costs, rb.Schedule(100, save_every=0))
    assert (cpu.margin, gpu.margin) == (0.20, 0.10) and cpu.plan.epochs < gpu.plan.epochs
