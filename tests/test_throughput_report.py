"""Unit tests of the pure benchmark logic: statistics, projections, recommendations, tiers, result file."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest

from errors import UserError
from throughput_report import (
    BatchShape, CostModel, Measurements, Stats, TIER_LIMITS_SECONDS, cross_validated_rmse, diagnose,
    fixed_cost_share, format_recommendations, parse_duration, duration_arg, peak_flops, project_epoch,
    recommend_for_budget, recommendations, settings_mismatches, speed_tier,
)


def test_stats_of_known_values():
    stats = Stats.of([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats.mean == pytest.approx(4.0)
    assert stats.median == 3.0
    assert (stats.min, stats.max) == (1.0, 10.0)
    assert stats.std == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert stats.p90 == pytest.approx(7.6)
    assert set(dataclasses.asdict(stats.as_ms_stats())) == {"mean", "median", "min", "max", "std", "p90"}
    assert Stats.of([5.0]).std == 0.0
    with pytest.raises(ValueError):
        Stats.of([])


def test_guide_example_projection_and_table():
    """The guide: 521.34 ms/batch x 3232 batches is ~28.1 minutes; 1/2/4/8 epochs for 30 min/1 h/2 h/4 h."""
    rng = np.random.default_rng(0)
    timed = rng.normal(521.34, 35.21, 500)
    timed += 521.34 - timed.mean()                      # the guide's exact average
    shapes = [BatchShape(1, 700, 700)] * 3232           # no length information: only the mean can project
    projection = project_epoch(shapes, list(range(500)), timed)
    assert projection.recommended == "constant"
    assert projection.seconds == pytest.approx(521.34 * 3232 / 1000)
    assert projection.seconds / 60 == pytest.approx(28.1, abs=0.05)
    assert projection.seconds / 3600 == pytest.approx(0.47, abs=0.005)

    rows = recommendations(projection.seconds, 3232)
    assert [r.budget_hours for r in rows] == [0.5, 1, 2, 4, 8, 12]
    assert [r.epochs for r in rows][:4] == [1, 2, 4, 8]
    assert [round(r.total_hours, 2) for r in rows][:4] == [0.47, 0.94, 1.87, 3.74]
    assert rows[4].fits_epochs == 17 and rows[4].epochs == 10 and rows[4].capped
    assert rows[5].fits_epochs == 25 and rows[5].epochs == 10 and rows[5].capped
    assert not any(r.capped for r in rows[:4])


def test_recommendation_floor_exact_boundary_and_partial_epoch():
    exact = recommend_for_budget(1.0, 1800.0, 100)
    assert exact.epochs == 2 and exact.fits_epochs == 2
    partial = recommend_for_budget(0.5, 3 * 3600.0, 1000)     # 3 h epoch, 30 min budget
    assert partial.fits_epochs == 0 and partial.epochs == 1
    assert partial.max_batches == 166                          # floor(1800 / 10.8 s)
    assert partial.total_hours <= 0.5
    nothing = recommend_for_budget(0.5, 1000 * 3600.0, 10)     # one batch takes 100 h
    assert nothing.max_batches == 0 and nothing.epochs == 0
    capped = recommend_for_budget(12, 60.0, 10, max_useful_epochs=3)
    assert capped.epochs == 3 and capped.capped and capped.total_hours == pytest.approx(3 / 60)


def test_recommendation_table_text_prints_the_whole_run_breakdown():
    import run_budget
    from benchmark_result import Recommendation
    costs = run_budget.RunCosts(startup_seconds=20, epoch_seconds=1000.0, batches_per_epoch=100, eval_pass_seconds=50,
                                checkpoint_seconds=2, final_save_seconds=1, expected_error=0.08)
    rows = run_budget.recommendations(costs, run_budget.Schedule(100), budgets_hours=(0.1, 1, 12),
                                      time_budget_seconds=1800)
    text = "\n".join(format_recommendations([Recommendation(**r.as_json()) for r in rows], 10))
    assert "RECOMMENDED EPOCH COUNTS" in text and "the whole run" in text
    # 6 minutes: 25 batches of 10 s + 20 s start-up + 50 s evaluation + 3 s of saves = 323 s, x 1.10 (the
    # margin's floor, over the 8% expected error) <= 360 s
    assert "6 minutes        -> part of an epoch: --epochs 1 --max-batches 25 (~5.4 min: training 4.2 min" in text
    assert "1 hour           -> 3 epochs (~0.88 h: training 0.83 h, evaluation 0.04 h, checkpoints 0.00 h" in text
    assert "10% margin" in text
    assert "12 hours         -> 10 epochs" in text and "* 37 fit" in text and "capped at 10 epochs" in text
    assert "30 minutes       -> 1 epoch" in text and text.rstrip().splitlines()[-2].endswith("<- --time-budget")


def test_cost_model_recovers_quadratic_and_beats_mean_on_skewed_lengths():
    """Lengths vary ~100x as in ARC: the mean of the timed batches misleads, the cost model does not."""
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(math.log(750), 0.8, 3232), 60, 7460).astype(int)
    epoch = [BatchShape(1, int(n), int(n)) for n in lengths]

    def true_ms(n):
        return 40 + 0.2 * n + 2e-5 * n ** 2

    truth = sum(true_ms(s.length) for s in epoch) / 1000
    positions = list(range(500))
    timed = np.array([true_ms(epoch[p].length) for p in positions]) * rng.normal(1, 0.02, 500)
    fitted = CostModel.fit("quadratic", [epoch[p] for p in positions], timed)
    assert fitted.coefficients[0] == pytest.approx(40, rel=0.2)

    projection = project_epoch(epoch, positions, timed)
    assert projection.recommended in ("linear", "quadratic")
    assert abs(projection.seconds / truth - 1) < 0.01
    assert projection.best.expected_error < 0.02
    mean_projection = projection.projections["constant"]
    assert mean_projection.expected_error > projection.best.expected_error
    assert "grows with batch length" in projection.reason


def test_mean_is_recommended_when_time_does_not_depend_on_length():
    rng = np.random.default_rng(2)
    epoch = [BatchShape(1, int(n), int(n)) for n in rng.integers(50, 5000, 400)]
    timed = rng.normal(100, 5, 100)
    projection = project_epoch(epoch, list(range(100)), timed)
    assert projection.recommended == "constant"
    assert projection.seconds == pytest.approx(timed.mean() * 400 / 1000)
    assert "does not depend measurably" in projection.reason
    # The interval is honest: about 2 standard errors of the untimed batches' total.
    expected = 1.96 * math.sqrt((300 * 5 / math.sqrt(100)) ** 2 + 300 * 25) / (timed.mean() * 400)
    assert projection.best.expected_error == pytest.approx(expected, rel=0.35)


def test_few_batches_use_the_mean_and_say_why():
    epoch = [BatchShape(1, 100 * (i + 1), 100 * (i + 1)) for i in range(20)]
    projection = project_epoch(epoch, [0, 1, 2], [10.0, 12.0, 11.0])
    assert list(projection.projections) == ["constant"]
    assert "only 3 timed batches" in projection.reason
    assert projection.seconds == pytest.approx((33 + 17 * 11) / 1000)


def test_wrapped_timing_counts_each_epoch_batch_once():
    epoch = [BatchShape(1, 10, 10), BatchShape(1, 20, 20)]
    projection = project_epoch(epoch, [0, 1, 0, 1], [1.0, 3.0, 3.0, 5.0])
    assert projection.seconds == pytest.approx((2.0 + 4.0) / 1000)
    assert projection.best.expected_error == 0.0


def test_cross_validation_prefers_the_true_model():
    rng = np.random.default_rng(3)
    shapes = [BatchShape(1, int(n), int(n)) for n in rng.integers(100, 3000, 200)]
    ms = np.array([5 + 0.01 * s.length for s in shapes]) + rng.normal(0, 0.1, 200)
    assert cross_validated_rmse("linear", shapes, ms) < 0.2 * cross_validated_rmse("constant", shapes, ms)


@pytest.mark.parametrize("minutes, tier", [(10, "fast"), (21, "fast"), (22, "moderate"), (32, "moderate"),
                                           (33, "slower"), (43, "slower"), (44, "slow"), (600, "slow")])
def test_speed_tier_uses_the_guides_boundaries_as_epoch_time(minutes, tier):
    assert speed_tier(minutes * 60).name == tier


def test_tier_limits_are_the_guides_ms_per_batch_at_3232_batches():
    assert [round(t / 60, 1) for t in TIER_LIMITS_SECONDS] == [21.5, 32.3, 43.1]
    assert speed_tier(521.34 * 3232 / 1000).name == "moderate"   # the guide's example T4


def test_peak_flops_of_known_gpus():
    assert peak_flops("Tesla T4", "fp16") == 65e12
    assert peak_flops("Tesla T4", "fp32") == 8.1e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("NVIDIA L40S", "bf16") is None
    assert peak_flops("Tesla P100-PCIE-16GB", "fp16") == 18.7e12
    assert peak_flops("cpu", "fp32") is None


def test_diagnostics_come_from_measurements():
    calm = Measurements("cuda", 0.01, 5 * 2**30, 16 * 2**30, 0.2, 0, 500, "bf16")
    assert diagnose(calm) == []
    troubled = Measurements("cuda", 0.25, 15 * 2**30, 16 * 2**30, 0.7, 40, 500, "fp16")
    found = " | ".join(diagnose(troubled))
    for phrase in ("data preparation takes 25%", "memory pressure", "CPU/launch-bound steps: 70%",
                   "40 of 500 optimizer steps were skipped"):
        assert phrase in found
    assert "--compile on" in found
    compiled = Measurements("cuda", 0.01, 5 * 2**30, 16 * 2**30, 0.7, 0, 500, "bf16", compiled=True)
    assert ["CPU/launch-bound steps: 70%" in d and "--compile" not in d for d in diagnose(compiled)] == [True]
    cpu = Measurements("cpu", 0.01, None, None, 0.9, 0, 10, "fp32", load_average=1.9, cpu_count=2)
    assert diagnose(cpu) == []
    busy = Measurements("cpu", 0.01, None, None, 0.9, 0, 10, "fp32", load_average=5.5, cpu_count=2)
    assert ["load average 5.5 on 2 CPUs" in d for d in diagnose(busy)] == [True]


def test_fixed_cost_share_is_reported_even_when_time_ignores_length():
    """An H200 at batch size 1 took ~100 ms a batch whatever its length: the plain mean is the recommended
    projection there, and the length-independent share must still say 'nearly all of it'."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 7000, 400)
    shapes = [BatchShape(1, int(n), int(n)) for n in lengths]
    flat = rng.normal(100.0, 15.0, 400)                         # no length dependence
    projection = project_epoch(shapes, list(range(400)), flat)
    assert projection.recommended == "constant"
    assert fixed_cost_share(projection, float(flat.mean())) > 0.9
    sloped = 20.0 + 0.02 * lengths + rng.normal(0, 1.0, 400)    # 20 ms fixed of ~90 ms on average
    projection = project_epoch(shapes, list(range(400)), sloped)
    assert fixed_cost_share(projection, float(sloped.mean())) == pytest.approx(20 / sloped.mean(), abs=0.02)
    few = project_epoch(shapes[:5], list(range(5)), flat[:5])   # too few batches for the a + b*tokens fit
    assert fixed_cost_share(few, float(flat[:5].mean())) is None


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("30m", 1800), ("1.5 hours", 5400), ("45min", 2700),
                                           ("3600s", 3600), ("90s", 90), ("1d", 86400), ("0.5h", 1800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "two hours", "-1h", "0", "5 weeks", "3600", "0s"])
def test_parse_duration_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    with pytest.raises(argparse.ArgumentTypeError):
        duration_arg(text)


def test_a_bare_number_is_refused_with_the_units_to_write():
    with pytest.raises(ValueError, match=r"'90' needs a unit: write e.g. 90s, 90m or 90h"):
        parse_duration("90")


def test_settings_mismatches_names_each_difference():
    recorded = {"device": "Tesla T4", "batch_size": 1, "data_description": "arc-agi-2"}
    assert settings_mismatches(recorded, {"device": "Tesla T4", "batch_size": 1}) == []
    assert settings_mismatches(recorded, {"device": "NVIDIA L4", "batch_size": 1}) == [
        "device: benchmark 'Tesla T4', this run 'NVIDIA L4'"]


def test_speed_drift_during_timing_is_caught_and_widens_the_error():
    rng = np.random.default_rng(4)
    epoch = [BatchShape(1, int(n), int(n)) for n in rng.integers(100, 3000, 1000)]
    steady = np.array([10 + 0.05 * epoch[p].length for p in range(200)]) * rng.normal(1, 0.01, 200)
    calm = project_epoch(epoch, list(range(200)), steady)
    assert calm.drift is None
    throttled = steady * np.r_[np.ones(100), np.full(100, 1.15)]   # 15% slower in the second half
    hot = project_epoch(epoch, list(range(200)), throttled)
    assert hot.drift == pytest.approx(0.15, abs=0.02)
    assert hot.best.expected_error > 0.14 > 10 * calm.best.expected_error
    found = diagnose(Measurements("cuda", 0.0, None, None, None, 0, 200, "bf16", drift=hot.drift))
    assert len(found) == 1 and "15% slower" in found[0]


def test_data_parallel_estimate_waits_for_the_slowest_rank_and_adds_the_all_reduce():
    from throughput_report import BatchShape, CostModel, estimate_data_parallel
    model = CostModel("linear", (1.0, 1.0))            # 1 ms + 1 ms per 1000 padded tokens
    ranks = [[BatchShape(1, 1000, 1000), BatchShape(1, 1000, 1000)],   # 2 ms, 2 ms
             [BatchShape(1, 3000, 3000), BatchShape(1, 1000, 1000)]]   # 4 ms, 2 ms
    # 1 GB of gradients, 10 GB/s: a ring all-reduce on 2 devices moves 2 x 1/2 x 1 GB per device = 0.1 s a step
    each_batch = estimate_data_parallel(model, ranks, grad_accum=1, gradient_bytes=10**9, bus_gbps=10.0)
    assert each_batch.compute_seconds == pytest.approx(0.006)        # max(2, 4) + max(2, 2) ms
    assert each_batch.allreduce_seconds == pytest.approx(0.2)         # two optimizer steps
    assert each_batch.epoch_seconds == pytest.approx(0.206)
    accumulated = estimate_data_parallel(model, ranks, grad_accum=2, gradient_bytes=10**9, bus_gbps=10.0)
    assert accumulated.compute_seconds == pytest.approx(0.006)        # max(2 + 2, 4 + 2) ms: ranks meet once
    assert (accumulated.optimizer_steps, accumulated.allreduce_seconds) == (1, pytest.approx(0.1))
    assert "not overlapped" in accumulated.assumptions and "10 GB/s" in accumulated.assumptions
