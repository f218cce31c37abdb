"""A complete measure_throughput.py result for tests, with the fields a test cares about changed."""
from __future__ import annotations

import dataclasses
from typing import Any

from benchmark_result import (BenchmarkResult, DataSummary, DeviceInfo, EpochProjectionInfo, LongestBatch, ModelSize,
                              MsStats, ProjectionInfo, Recommendation, RunCostsInfo, Schedule)


def example_result(settings: dict[str, Any] | None = None, **changes: Any) -> BenchmarkResult:
    """A one-process CPU result of a 600 s epoch of 3232 batches (change any field by keyword)."""
    stats = MsStats(mean=10.0, median=10.0, min=9.0, max=12.0, std=0.5, p90=11.0)
    result = BenchmarkResult(
        created="2026-12-01T00:00:00+00:00", complete=True, interrupted=False,
        device=DeviceInfo(name="cpu", type="cpu", precision="fp32", threads=1),
        settings=settings if settings is not None else {"device": "cpu", "batch_size": 1},
        world_size=1, backend=None, model=ModelSize(1000, 1000), data=DataSummary("tasks.json", 3232, 0),
        warmup_batches=3, compiled=False, startup_seconds=1.0, timed_batches=500, per_batch_ms=stats,
        data_ms=stats, data_share=0.01, tokens_per_second=1000.0, padded_tokens_per_second=1000.0,
        peak_memory_bytes=2**30, peak_reserved_bytes=None, peak_memory_kind="process peak RSS",
        model_flops_per_second=1e9, peak_flops=None, mfu=None, measured_matmul_flops=1e11,
        mfu_of_measured_peak=0.01, real_token_share=1.0, flops_formula="6 x parameters",
        checkpoint_above=None, longest_batch=LongestBatch(1, 100, 100, 20.0), batches_per_epoch=3232,
        plan_batches_per_epoch=3232, epoch_seconds=600.0,
        epoch_projection=EpochProjectionInfo("linear", "cost model a + b*tokens", 0.02, "fits best", 0, None),
        projections={"constant": ProjectionInfo("mean x batches", 610.0, 0.05, 3.0, (10.0,)),
                     "linear": ProjectionInfo("cost model a + b*tokens", 600.0, 0.02, 1.0, (5.0, 14.0))},
        max_useful_epochs=10,
        recommendations=(Recommendation(0.5, 3, 0.5, 3, False, None),),
        tier="fast", tier_label="Fast", tier_range="under 21.5 min per epoch", tier_advice="train",
        diagnostics=(), skipped_steps=0, next_command="python trainloop_gpu_finetuned.py --epochs 10",
        next_command_why="the fast tier's suggestion", estimate=None,
        run_costs=RunCostsInfo(startup_seconds=5.0, checkpoint_seconds=1.0, checkpoint_bytes=10**6,
                               final_save_seconds=0.5, final_save_bytes=10**6, plot_seconds=0.2, added_seconds=2.0,
                               added_share=0.05, benchmark_seconds=40.0, evaluation=None),
        schedule=Schedule(eval_tasks=0, eval_data=None, eval_every=0, eval_batch_size=8, eval_attempts=1,
                          eval_views=1, save_every=1000, grad_accum=1))
    return dataclasses.replace(result, **changes)
