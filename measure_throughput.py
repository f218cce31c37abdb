"""Time real training steps on your device, project the epoch, and recommend epochs for your time budget.

It builds exactly what trainloop_gpu_finetuned.py builds from the same flags (data pipeline, model, precision,
optimizer, the one training step in training.py), runs one step on the longest batch of the epoch (so an
out-of-memory shows up now, not hours into training), a few untimed warm-up steps, then times --num-batches
steps drawn in the epoch's own order, synchronising the device around each one. See throughput_report.py for
how the epoch time is projected and how its error is estimated.

    python measure_throughput.py --device cuda                                   # the guide's command
    python measure_throughput.py --device cuda --json results.json --time-budget 2h
    python trainloop_gpu_finetuned.py --epochs auto --time-budget 2h --throughput-json results.json
    HF_HUB_OFFLINE=1 python measure_throughput.py --device cpu --random-init --max-length 1024 --num-batches 20
    python measure_throughput.py --model-name tiny --device cpu --num-batches 50   # seconds, a smoke test

Several GPUs: under torchrun every process runs the real DistributedDataParallel step (gradient all-reduce
included) on its own share of the epoch, the way the trainer will; batches per epoch are per process
(ceil(batches / N)), tokens/s counts all processes, and the JSON records world_size, so the trainer only
takes it for a run with as many processes. On one GPU, --estimate-gpus N adds an estimate (not a measurement)
for N GPUs, with its assumptions printed.

    torchrun --nproc_per_node 2 measure_throughput.py --device cuda --json results-2gpu.json
    python measure_throughput.py --device cuda --estimate-gpus 2

Ctrl-C while timing prints the statistics of the batches timed so far (and writes --json), then exits 130;
under torchrun it exits 130 without a report.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while torch loads is "interrupted", exit 130
    from errors import quiet_interrupts
    quiet_interrupts()

import argparse
import datetime
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cli_common
import distributed
import throughput_report as report
from atomic_io import check_writable
from benchmark_result import (BenchmarkResult, DataSummary, DeviceInfo, EpochProjectionInfo, EvaluationCost,
                              LongestBatch, ModelSize, ParallelEstimate, ProjectionInfo, Recommendation, RunCostsInfo,
                              Schedule)
from errors import EXIT_INTERRUPTED, UserError, run_cli


# ------------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    parser = cli_common.Parser(description=__doc__)
    cli_common.add_shared_args(parser)
    cli_common.add_run_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--num-batches", type=cli_common.positive_int, default=500,
                       help="timed batches, drawn in the epoch's order (wrapping around a short epoch)")
    bench.add_argument("--warmup", type=cli_common.non_negative_int, default=3,
                       help="untimed batches first (kernel selection, allocator, loss-scale settling)")
    bench.add_argument("--json", metavar="PATH", default=None,
                       help="also write the result as JSON (what `trainloop_gpu_finetuned.py --epochs auto "
                            "--throughput-json PATH` reads)")
    bench.add_argument("--max-useful-epochs", type=cli_common.positive_int,
                       default=report.DEFAULT_MAX_USEFUL_EPOCHS,
                       help="returns diminish after ~5-8 epochs: recommend at most this many")
    bench.add_argument("--views", type=cli_common.positive_int, default=None, metavar="K",
                       help="also project the seconds per task of prediction with K augmented views "
                            "(evaluation.py --submission --views K), by the same decoding code")
    bench.add_argument("--estimate-gpus", type=cli_common.positive_int, default=None, metavar="N",
                       help="also estimate the epoch on N such GPUs from this one-process measurement (an "
                            "estimate, with its assumptions printed; torchrun measures it for real)")
    bench.add_argument("--allreduce-gbps", type=cli_common.positive_float, default=report.DEFAULT_ALLREDUCE_GBPS,
                       help="bus bandwidth assumed by --estimate-gpus for the gradient all-reduce, GB/s (nccl-tests "
                            "all_reduce_perf busbw between your GPUs; NVLink is 10x+ faster than PCIe)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag before anything heavy loads; all problems reported at once."""
    args = build_parser().parse_args(argv)
    problems = cli_common.validate_shared_args(args)
    if args.json is not None:  # refused now, not after the minutes of timing (the result would be lost)
        try:
            check_writable(args.json, "the benchmark result", "--json")
        except UserError as err:
            problems.append(str(err))
    if args.estimate_gpus is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        problems.append("--estimate-gpus is for a one-process run; under torchrun the benchmark measures the "
                        "multi-process step itself")
    if problems:
        raise UserError("; ".join(problems))
    return args


def trainer_flags(args: argparse.Namespace) -> list[str]:
    """The shared flags this run was given (those not at their default), to repeat them to the trainer
    (--time-budget aside: the next command's epoch count already fits it)."""
    shared = argparse.ArgumentParser(add_help=False)
    cli_common.add_shared_args(shared)
    cli_common.add_run_args(shared)
    flags: list[str] = []
    for action in shared._actions:
        value = getattr(args, action.dest)
        if value == action.default or action.dest == "time_budget":
            continue
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


# ------------------------------------------------------------------------------------------------- setup

@dataclass
class Setup:
    """Everything the timing needs, built the way the trainer builds it."""
    args: argparse.Namespace
    device: Any
    precision: Any
    device_info: dict[str, Any]
    data: Any                 # arc_dataset.TrainingData
    data_description: str
    model: Any                # the model itself (under torchrun `step` runs its DDP wrapper)
    step: Any                 # training.TrainStep
    epoch_shapes: list[report.BatchShape]   # this process's batches of epoch 0 (all of them with one process)
    plan_shapes: list[report.BatchShape]    # every batch of epoch 0's plan
    rank_plan: list[list[int]]              # this process's batches as indices into data.encoded(0)
    ctx: Any = None                         # distributed.DistributedContext
    compiled: bool = False                  # --compile: decoder blocks compiled (at the first step)
    started: float = 0.0                    # perf_counter when setup began: start-up time includes compiling
    parts: Any = None                       # run_setup.TrainingParts (the optimizer for the checkpoint timing)
    tasks: Any = None                       # arc_dataset.TaskSet: the training tasks
    evaluation: Any = None                  # run_plan.EvalPlan: what the trainer will evaluate
    process_started: float = 0.0            # time.monotonic() when this process started
    setup_seconds: float = 0.0              # process start to the built training step, as the trainer's start-up


def setup(args: argparse.Namespace, process_started: float | None = None) -> Setup:
    """Build what the trainer builds; `process_started` (time.monotonic(), default: this process's start) is
    where the planned start-up counts from."""
    import torch

    import run_costs

    import run_plan
    import run_setup
    import training

    # Under torchrun: join the group; a CUDA device becomes cuda:LOCAL_RANK.
    started = time.perf_counter()
    ctx = distributed.DistributedContext.from_env(training.resolve_device(args.device))
    device = ctx.device
    precision = training.resolve_precision(device, args.precision)
    tasks, data = run_setup.build_training_data(args)
    evaluation = run_plan.plan_evaluation(args, tasks)   # what the trainer loads before its model, too
    # Every batch of epoch 0, as the trainer will see it: the cost model sums over this process's shapes.
    # (The trainer does not collate the epoch ahead: this time is left out of the planned start-up.)
    collating = time.perf_counter()
    plan_shapes = [_shape(batch) for batch in data.batches(0)]
    collating = time.perf_counter() - collating
    rank_plan = distributed.shard_batch_plan(data.batch_plan(0), ctx.rank, ctx.world_size)
    epoch_shapes = (plan_shapes if not ctx.is_distributed
                    else shard_shapes(data, plan_shapes, ctx.world_size)[ctx.rank])

    parts = run_setup.build_training_step(args, ctx, precision,
                                          total_steps=math.ceil(len(epoch_shapes) / args.grad_accum), data=data)
    model, step = parts.model, parts.step
    info = dict(training.describe_device(device))
    if device.type == "cuda":
        info["total_memory_bytes"] = int(torch.cuda.get_device_properties(device).total_memory)
        if parts.gpu_memory_bytes:
            info["memory_cap_bytes"] = parts.gpu_memory_bytes
    if process_started is None:
        process_started = run_costs.process_start_time()
    setup_seconds = time.monotonic() - process_started - collating
    return Setup(args, device, precision, info, data, tasks.description, model, step, epoch_shapes, plan_shapes,
                 rank_plan, ctx, parts.compiled, started, parts, tasks, evaluation, process_started, setup_seconds)


def shard_shapes(data: Any, plan_shapes: list[report.BatchShape], world_size: int) -> list[list[report.BatchShape]]:
    """Each rank's batch shapes for epoch 0 split over `world_size` processes: the plan's own batches reuse
    `plan_shapes`; only the last round's split pieces are collated."""
    plan = data.batch_plan(0)
    known = {tuple(batch): shape for batch, shape in zip(plan, plan_shapes)}
    encoded = data.encoded(0)
    shapes: list[list[report.BatchShape]] = []
    for rank in range(world_size):
        shapes.append([known.get(tuple(batch)) or _shape(data.collate([encoded[i] for i in batch]))
                       for batch in distributed.shard_batch_plan(plan, rank, world_size)])
    return shapes


def _shape(batch: Any) -> report.BatchShape:
    rows, length = batch.input_ids.shape
    return report.BatchShape(int(rows), int(length), int(batch.num_tokens))


# ------------------------------------------------------------------------------------------------- timing

@dataclass
class Timings:
    """What the timing loop recorded, one entry per timed batch."""
    positions: list[int] = field(default_factory=list)     # index of the batch in epoch 0's plan
    batch_ms: list[float] = field(default_factory=list)    # the batch's wall time, data preparation included
    data_ms: list[float] = field(default_factory=list)     # host: next batch + copy to the device
    tokens: list[int] = field(default_factory=list)
    padded_tokens: list[int] = field(default_factory=list)
    sample_lengths: list[float] = field(default_factory=list)  # mean real tokens per sample (for FLOPs)
    interrupted: bool = False
    startup_seconds: float = 0.0  # setup to the timed window: loading, calibration, compiling, warm-up
    warmup_shapes: list[report.BatchShape] = field(default_factory=list)
    warmup_seconds: float = 0.0   # the untimed warm-up steps' wall time


class BatchClock:
    """Per-batch wall times measured the way the trainer runs: no host sync between steps.

    On CUDA an event is recorded on the stream after each step, and a batch's time is the GPU-timeline gap
    between its event and the previous one: the GPU's compute plus any time it sat idle waiting for the host
    (data preparation, Python, kernel launches). Summed, that is the wall time of the loop, and the host is
    free to run ahead exactly as in training. The events are read after one synchronisation at the end.
    On CPU every operation is synchronous, so perf_counter between steps measures the same thing.
    """

    def __init__(self, device: Any) -> None:
        import torch
        self.cuda = device.type == "cuda"
        self._torch = torch
        self.marks: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def mark(self) -> None:
        self.marks.append(self._now())

    def durations_ms(self, count: int) -> list[float]:
        """Milliseconds of the first `count` batches (one sync point, after timing)."""
        marks = self.marks[: count + 1]
        if self.cuda:
            self._torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1000 for a, b in zip(marks, marks[1:])]


def _epoch_batches(data: Any, plan: list[list[int]], start: int) -> Iterator[tuple[int, Any]]:
    """(position, batch) of this process's batches of epoch 0 from `start`, wrapping around: the order the
    trainer draws them in."""
    encoded = data.encoded(0)
    position = start % len(plan)
    while True:
        for indices in plan[position:]:
            yield position, data.collate([encoded[i] for i in indices])
            position += 1
        position = 0


def compile_graph_variants(s: Setup) -> tuple[list[report.BatchShape], float]:
    """--compile: one untimed step on a batch of each graph variant in the epoch (one row or several, padded
    or not, recomputed or not), so compiling happens now and not in the timed window; returns how many.
    Every process steps through the same list (under torchrun the gradient all-reduces must pair up)."""
    import training

    if not s.compiled:
        return [], 0.0
    encoded = s.data.encoded(0)
    plan = (s.data.collate([encoded[i] for i in indices]) for indices in s.data.batch_plan(0))
    variants = training.one_batch_per_graph_variant(s.step, plan)
    start = time.perf_counter()
    with training.out_of_memory_as_user_error(s.device):
        for batch in variants:
            s.step(batch.to(s.device))
        training.synchronize(s.device)
    return [_shape(batch) for batch in variants], time.perf_counter() - start


def run_longest_batch(s: Setup) -> tuple[report.BatchShape, float]:
    """One step on the biggest batch of the epoch, so an out-of-memory shows up in the first seconds (under
    torchrun every process steps on it: any of them may draw it in a later epoch)."""
    import training

    plan = s.data.batch_plan(0)
    index = max(range(len(plan)), key=lambda i: s.plan_shapes[i].rows * s.plan_shapes[i].length)
    encoded = s.data.encoded(0)
    batch = s.data.collate([encoded[i] for i in plan[index]])
    start = time.perf_counter()
    with training.out_of_memory_as_user_error(s.device):
        s.step(batch.to(s.device))
        training.synchronize(s.device)
    return s.plan_shapes[index], (time.perf_counter() - start) * 1000


def time_batches(s: Setup, warmup: int, num_batches: int, on_start: Any = None) -> Timings:
    """Run `warmup` untimed then `num_batches` timed steps; Ctrl-C stops early, keeping what was timed. A tqdm
    bar (rank 0) shows the timed batches with their running mean ms/batch (host clock: on CUDA the host may run
    a few steps ahead of the device; the recorded times are the device's)."""
    from tqdm import tqdm

    import training

    batches = _epoch_batches(s.data, s.rank_plan, 0)
    warmup_started = time.perf_counter()
    warmup_shapes = []
    for _ in range(warmup):
        _, batch = next(batches)
        warmup_shapes.append(_shape(batch))
        s.step(batch.to(s.device))
    training.synchronize(s.device)  # the timed window starts with an idle device
    warmup_seconds = time.perf_counter() - warmup_started
    startup_seconds = time.perf_counter() - s.started
    if on_start:
        on_start()
    clock = BatchClock(s.device)
    records: list[tuple[int, float, int, int, float]] = []
    interrupted = False
    bar = tqdm(total=num_batches, desc="Timing", unit="batch", file=sys.stderr, leave=False,
               disable=not s.ctx.is_main, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    clock.start()
    window_started = time.perf_counter()
    try:
        for _ in range(num_batches):
            start = time.perf_counter()
            position, batch = next(batches)
            batch = batch.to(s.device)
            data_ms = (time.perf_counter() - start) * 1000
            s.step(batch)
            clock.mark()
            rows, length = batch.input_ids.shape
            # One append per batch, after its mark, so an interrupt cannot leave the lists out of step.
            records.append((position, data_ms, batch.num_tokens, int(rows * length),
                            batch.num_tokens / max(1, len(batch.samples))))
            bar.update(1)
            bar.set_postfix_str(f"{1000 * (time.perf_counter() - window_started) / len(records):.0f} ms/batch",
                                refresh=False)
    except KeyboardInterrupt:
        if not records or s.ctx.is_distributed:  # the other processes may be mid-step: no agreed stop point
            raise
        interrupted = True
    finally:
        bar.close()
    timings = Timings(interrupted=interrupted, startup_seconds=startup_seconds, warmup_shapes=warmup_shapes,
                      warmup_seconds=warmup_seconds)
    timings.batch_ms = clock.durations_ms(len(records))
    for position, data_ms, tokens, padded, sample_length in records:
        timings.positions.append(position)
        timings.data_ms.append(data_ms)
        timings.tokens.append(tokens)
        timings.padded_tokens.append(padded)
        timings.sample_lengths.append(sample_length)
    return timings


def _peak_memory(device: Any) -> tuple[int, int | None, str]:
    """(peak bytes, peak reserved bytes or None, what was measured)."""
    import torch

    import training
    if device.type == "cuda":
        return (training.peak_memory_bytes(device), int(torch.cuda.max_memory_reserved(device)),
                "allocated by PyTorch on the GPU")
    return training.peak_memory_bytes(device), None, "process peak RSS"


# ------------------------------------------------------------------------------------------------- result

@dataclass(frozen=True)
class GroupTotals:
    """What the timed batches amount to over all processes (tokens, FLOPs) and on the largest one (memory)."""
    seconds: float              # rank 0's timed wall seconds: the processes step in lockstep
    tokens: int
    padded_tokens: int
    model_flops: float
    peak_bytes: int
    reserved_bytes: int | None
    memory_kind: str


def group_totals(s: Setup, timings: Timings) -> GroupTotals:
    """Sum the timed batches' tokens and model FLOPs, and take the peak memory; under torchrun over every
    process (collectives: every process calls this)."""
    import model as model_lib

    flops_cache: dict[float, float] = {}
    model_flops = 0.0
    for tokens, length in zip(timings.tokens, timings.sample_lengths):
        if length not in flops_cache:
            flops_cache[length] = model_lib.flops_per_token(s.model, length)
        model_flops += flops_cache[length] * tokens
    tokens, padded_tokens = sum(timings.tokens), sum(timings.padded_tokens)
    peak_bytes, reserved_bytes, memory_kind = _peak_memory(s.device)
    ctx = s.ctx
    if ctx.is_distributed:
        # Every process timed as many steps, in lockstep (the all-reduce waits for the slowest): rank 0's
        # seconds are the group's; tokens and FLOPs add up over the processes; memory is the largest one's.
        tokens, padded_tokens, model_flops = ctx.all_reduce_sum([tokens, padded_tokens, model_flops])
        peaks = ctx.gather_objects((peak_bytes, reserved_bytes))
        peak_bytes = max(peak for peak, _ in peaks)
        reserved_bytes = None if reserved_bytes is None else max(reserved for _, reserved in peaks)
        memory_kind += f", the largest of the {ctx.world_size} processes"
    return GroupTotals(sum(timings.batch_ms) / 1000, int(tokens), int(padded_tokens), float(model_flops),
                       int(peak_bytes), reserved_bytes, memory_kind)


def diagnose(s: Setup, timings: Timings, projection: report.EpochProjection, reserved_bytes: int | None) -> list[str]:
    """The report's diagnostics, from what the timing saw."""
    total_ms = timings.batch_ms
    total_memory = s.device_info.get("memory_cap_bytes") or s.device_info.get("total_memory_bytes")
    return report.diagnose(report.Measurements(
        device_type=s.device.type, data_share=sum(timings.data_ms) / sum(total_ms),
        memory_peak_bytes=reserved_bytes, memory_total_bytes=total_memory if s.device.type == "cuda" else None,
        overhead_share=report.fixed_cost_share(projection, sum(total_ms) / len(total_ms)),
        skipped_steps=int(s.step.skipped_steps), optimizer_steps=max(1, len(total_ms) // s.args.grad_accum),
        precision=s.precision.name, drift=projection.drift, load_average=os.getloadavg()[0],
        cpu_count=os.cpu_count(), compiled=s.compiled))


def projection_fields(projection: report.EpochProjection) -> tuple[EpochProjectionInfo, dict[str, ProjectionInfo]]:
    """The projection the epoch time comes from, and every projection made, as the result records them."""
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    best = projection.best
    chosen = EpochProjectionInfo(best.kind, best.name, finite(best.expected_error), projection.reason,
                                 best.extrapolated_batches, projection.drift)
    return chosen, {kind: ProjectionInfo(p.name, p.seconds, finite(p.expected_error), p.heldout_rmse_ms,
                                         tuple(p.model.coefficients))
                    for kind, p in projection.projections.items()}


def parallel_estimate(s: Setup, cost_model: report.CostModel) -> ParallelEstimate | None:
    """--estimate-gpus N: the epoch on N such GPUs, from this process's cost model (None without the flag)."""
    if not s.args.estimate_gpus:
        return None
    rank_shapes = shard_shapes(s.data, s.plan_shapes, s.args.estimate_gpus)
    # DDP all-reduces the gradients in the parameters' dtype: fp32 master weights in every precision here.
    gradient_bytes = sum(p.numel() * p.element_size() for p in s.model.parameters() if p.requires_grad)
    return report.estimate_data_parallel(cost_model, rank_shapes, s.args.grad_accum, gradient_bytes,
                                         s.args.allreduce_gbps)


@dataclass
class RunCostMeasurement:
    """What the run costs besides its training steps (run_costs.py), measured after the timing."""
    costs: Any                 # run_budget.RunCosts
    schedule: Any              # run_budget.Schedule
    policy: Any                # run_budget.BudgetPolicy
    info: RunCostsInfo
    schedule_info: Schedule


def measure_run_costs(s: Setup, timings: Timings, projection: report.EpochProjection,
                      compiled: tuple[list[report.BatchShape], float]) -> RunCostMeasurement:
    """Time one checkpoint write, one final-model save, one plot, an epoch's preparation, and real decoding of
    the evaluation set (and of --views prediction), within run_costs.measurement_allowance of the benchmark so
    far; then the start-up and the run costs the recommendations plan with."""
    import run_budget
    import run_plan

    args = s.args
    model = projection.best.model

    def steady(shapes: list[report.BatchShape]) -> float:
        return float(model.predict(shapes).sum()) / 1000 if shapes else 0.0

    # Start-up as the trainer pays it: process start to its training step built, plus the one-off extra of the
    # first steps over the steady cost (compiling under --compile, the allocator's first growth). The
    # benchmark's own longest-batch probe and the epoch collation are not part of a training run.
    startup = (s.setup_seconds + max(0.0, compiled[1] - steady(compiled[0]))
               + max(0.0, timings.warmup_seconds - steady(timings.warmup_shapes)))
    so_far = time.monotonic() - s.process_started
    files = _time_files(s)
    eval_cost, fitted, spent = _time_evaluation(s, so_far, files.spent)
    prediction, spent = _time_prediction(s, fitted, so_far, spent)
    saves = files.saves
    costs = run_budget.RunCosts(
        startup_seconds=startup, epoch_seconds=projection.seconds, batches_per_epoch=len(s.epoch_shapes),
        eval_pass_seconds=eval_cost.pass_seconds if eval_cost else 0.0, checkpoint_seconds=saves.checkpoint_seconds,
        final_save_seconds=saves.final_save_seconds, plot_seconds=files.plot_seconds,
        first_plot_extra_seconds=files.first_plot_extra, epoch_data_seconds=files.epoch_data,
        expected_error=_finite(projection.best.expected_error), batch_seconds=_batch_seconds(s, projection),
        eval_error=eval_cost.expected_error if eval_cost else None)
    schedule = run_budget.Schedule(len(s.epoch_shapes), grad_accum=args.grad_accum, eval_enabled=bool(s.evaluation),
                                   eval_every=args.eval_every, save_every=args.save_every)
    slowest = max(timings.batch_ms) / 1000
    policy = run_budget.BudgetPolicy(min_margin=run_budget.min_margin_for(s.device.type),
                                     reserve_seconds=run_budget.stop_rule_reserve(costs, slowest),
                                     max_useful_epochs=args.max_useful_epochs)
    total = time.monotonic() - s.process_started
    info = RunCostsInfo(startup_seconds=startup, checkpoint_seconds=saves.checkpoint_seconds,
                        checkpoint_bytes=saves.checkpoint_bytes, final_save_seconds=saves.final_save_seconds,
                        final_save_bytes=saves.final_save_bytes, plot_seconds=files.plot_seconds, added_seconds=spent,
                        added_share=spent / total, benchmark_seconds=total, evaluation=eval_cost,
                        prediction_views=args.views or 1, prediction_seconds_per_task=prediction,
                        first_plot_extra_seconds=files.first_plot_extra, epoch_data_seconds=files.epoch_data)
    return RunCostMeasurement(costs, schedule, policy, info, run_plan.schedule_record(args, s.evaluation))


@dataclass(frozen=True)
class FileCosts:
    """The saves, the plot and an epoch's preparation, timed once each."""
    saves: Any                 # run_costs.SaveTimes
    plot_seconds: float        # one redraw
    first_plot_extra: float    # the first redraw's one-off (importing matplotlib, its font cache)
    epoch_data: float          # drawing, encoding and batching a later epoch's samples
    spent: float               # what timing them took


def _time_files(s: Setup) -> FileCosts:
    """One checkpoint and one final model (rank 0, on the output folder's file system), matplotlib's import and
    one plot redraw, and epoch 1's preparation (each process prepares its own)."""
    import run_costs
    from run_monitor import plot_metrics, plotting

    saves, plot_seconds, plot_import = None, 0.0, 0.0
    if s.ctx.is_main:
        saves = run_costs.measure_saves("runs", s.model, s.parts.optimizer, s.parts.scheduler, s.step)
        import tempfile
        with tempfile.TemporaryDirectory(prefix=".run-costs-plot-") as folder:
            records = _plot_records(bool(s.evaluation))
            # The first redraw imports matplotlib: a one-off the trainer pays at its first epoch end, planned
            # there (with the checkpoints, where the run counts its redraws), timed alone: the difference of two
            # redraws was lost in their noise (a redraw took 0.12-0.35 s here, the import 0.3 s).
            plot_import = run_costs.time_call(plotting)
            plot_seconds = run_costs.time_call(lambda: plot_metrics(records, Path(folder) / "plot.png"))
    saves, plot_seconds, plot_import = s.ctx.broadcast_object((saves, plot_seconds, plot_import))
    # Each later epoch's samples are drawn, encoded and put in batches before its first step (epoch 0's were, in
    # the start-up); without augmentation every epoch's samples are epoch 0's, and only the shuffle is left.
    epoch_data = run_costs.time_call(lambda: s.data.prepare(1))
    spent = saves.checkpoint_seconds + saves.final_save_seconds + plot_seconds + plot_import + epoch_data
    return FileCosts(saves, plot_seconds, plot_import, epoch_data, spent)


def _time_evaluation(s: Setup, so_far: float, spent: float) -> tuple[EvaluationCost | None, Any, float]:
    """One evaluation pass, projected from real decoding within what the allowance leaves (None when
    --eval-tasks 0); with the fitted decode cost and the added time so far."""
    import run_costs

    evaluation = s.evaluation
    if not evaluation:
        return None, None, spent
    # Each process decodes its share of the tasks (the trainer splits evaluation the same way).
    share = distributed.shard_items(evaluation.tasks, s.ctx)
    batches = run_costs.evaluation_pass(share, s.args.max_length, evaluation.batch_size, evaluation.attempts,
                                        s.args.seed, evaluation.views)
    measured = _decode_timed(s, batches, run_costs.measurement_allowance(so_far, spent), "Timing evaluation")
    scoring = run_costs.scoring_seconds(batches, measured.model)
    seconds = measured.pass_seconds + scoring
    error = measured.expected_error * measured.pass_seconds / seconds if seconds else 0.0  # of the pass with scoring
    cost = EvaluationCost(
        pass_seconds=seconds, expected_error=error,
        inputs=measured.inputs, batches=measured.batches, timed_batches=len(measured.timed),
        timed_seconds=math.fsum(measured.timed.values()), spent_seconds=measured.spent_seconds,
        heldout_error=measured.heldout_error, cost_model=measured.model.as_json(), scoring_seconds=scoring)
    return cost, measured.model, spent + measured.spent_seconds


def _time_prediction(s: Setup, fitted: Any, so_far: float, spent: float) -> tuple[float | None, float]:
    """--views K: seconds per task of evaluation.py --submission, which decodes each task's test inputs under K
    views in one call; the evaluation set stands in for the challenges file (its known answers give the decode
    lengths). Decoded for real only when evaluation did not fit a cost already."""
    import run_costs

    if s.args.views is None:
        return None, spent
    from evaluation import tasks_with_answers
    tasks = s.evaluation.tasks if s.evaluation else tuple(tasks_with_answers(s.tasks.tasks, 100))
    batches = run_costs.prediction_pass(tasks, s.args.max_length, s.args.views, s.args.seed)
    if fitted is None:
        measured = _decode_timed(s, batches, run_costs.measurement_allowance(so_far, spent), "Timing prediction")
        spent += measured.spent_seconds
        fitted, seconds = measured.model, measured.pass_seconds
    else:
        seconds = run_costs.project_pass(batches, fitted, {})
    return (seconds + run_costs.scoring_seconds(batches, fitted)) / max(1, len(tasks)), spent


def _plot_records(evaluates: bool, epochs: int = 3, steps: int = 20) -> list[dict[str, Any]]:
    """metrics.jsonl lines like a run's after a few epochs (log steps, epoch means, evaluations), for timing one
    redraw of training_curves.png: its cost is the figure's, nearly independent of the number of points."""
    records: list[dict[str, Any]] = []
    for epoch in range(epochs):
        for batch in range(1, steps + 1):
            records.append({"kind": "step", "epoch": epoch, "step": epoch * steps + batch, "batch": batch,
                            "batches": steps, "loss": 2.0 / (1 + epoch * steps + batch)})
        record = {"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * steps, "batch": steps, "batches": steps,
                  "loss": 2.0 / (1 + (epoch + 1) * steps)}
        if evaluates:
            record.update(eval_accuracy=0.1 * epoch, eval_task_accuracy=0.1 * epoch, eval_attempts=1)
        records.append(record)
    return records


def _decode_timed(s: Setup, batches: list[Any], allowance: float, what: str) -> Any:
    """run_costs.measure_evaluation with the model in eval mode (as evaluate puts it), a bar on rank 0."""
    import run_costs

    was_training = s.model.training
    s.model.eval()
    try:
        return run_costs.measure_evaluation(s.model, batches, precision=s.precision, time_limit=allowance,
                                            progress=s.ctx.is_main, desc=what)
    finally:
        s.model.train(was_training)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _batch_seconds(s: Setup, projection: report.EpochProjection) -> tuple[float, ...]:
    """Each batch of this process's epoch 0, in training order, as the cost model predicts it, scaled to the
    projected epoch (a partial epoch, --max-batches, is planned on the batches it really trains)."""
    predicted = [float(x) / 1000 for x in projection.best.model.predict(s.epoch_shapes)]
    total = math.fsum(predicted)
    scale = projection.seconds / total if total > 0 else 0.0
    return tuple(max(0.0, x * scale) for x in predicted)


def build_result(s: Setup, timings: Timings, longest: tuple[report.BatchShape, float],
                 projection: report.EpochProjection, run: RunCostMeasurement) -> BenchmarkResult:
    """The result: what --json writes and what the report prints."""
    import model as model_lib
    import run_budget
    import training

    args, ctx = s.args, s.ctx
    n_epoch = len(s.epoch_shapes)   # per process
    rows = run_budget.recommendations(run.costs, run.schedule, policy=run.policy,
                                      time_budget_seconds=args.time_budget)
    tier = report.speed_tier(projection.seconds)
    totals = group_totals(s, timings)
    flops_per_second = totals.model_flops / totals.seconds / ctx.world_size  # per device, against one's peak
    peak = report.peak_flops(str(s.device_info["name"]), s.precision.name) if s.device.type == "cuda" else None
    # Half a second of dense matmuls in the training dtype, after timing so it cannot disturb it: the
    # utilisation this device can actually reach, beside the spec-sheet peak.
    measured_peak = training.measure_matmul_peak(s.device, s.precision)
    total, trainable = model_lib.count_parameters(s.model)
    settings = {**cli_common.speed_settings(args, s.device_info, s.precision.name, ctx.world_size),
                "data_description": s.data_description}
    command, why = next_command(args, rows, tier, launcher=python_launcher(cli_common.launcher(ctx)))
    chosen, projections = projection_fields(projection)
    device = {**cli_common.jsonable(s.device_info), "type": s.device.type, "precision": s.precision.name}
    return BenchmarkResult(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        complete=not timings.interrupted, interrupted=timings.interrupted,
        device=DeviceInfo(**{k: v for k, v in device.items() if k in DeviceInfo.__dataclass_fields__}),
        settings=settings, world_size=ctx.world_size, backend=ctx.backend,
        model=ModelSize(total, trainable),
        data=DataSummary(s.data_description, len(s.data.lengths(0)), len(s.data.skipped(0))),
        warmup_batches=args.warmup, compiled=s.compiled, startup_seconds=timings.startup_seconds,
        timed_batches=len(timings.batch_ms),
        per_batch_ms=report.Stats.of(timings.batch_ms).as_ms_stats(),
        data_ms=report.Stats.of(timings.data_ms).as_ms_stats(),
        data_share=sum(timings.data_ms) / sum(timings.batch_ms),
        tokens_per_second=totals.tokens / totals.seconds,
        padded_tokens_per_second=totals.padded_tokens / totals.seconds,
        peak_memory_bytes=totals.peak_bytes, peak_reserved_bytes=totals.reserved_bytes,
        peak_memory_kind=totals.memory_kind,
        model_flops_per_second=flops_per_second, peak_flops=peak, mfu=flops_per_second / peak if peak else None,
        measured_matmul_flops=measured_peak, mfu_of_measured_peak=flops_per_second / measured_peak,
        real_token_share=totals.tokens / totals.padded_tokens if totals.padded_tokens else 1.0,
        flops_formula=report.FLOPS_FORMULA, checkpoint_above=s.step.checkpoint_above,
        longest_batch=LongestBatch(longest[0].rows, longest[0].length, longest[0].tokens, longest[1]),
        batches_per_epoch=n_epoch, plan_batches_per_epoch=len(s.plan_shapes),
        epoch_seconds=projection.seconds, epoch_projection=chosen, projections=projections,
        max_useful_epochs=args.max_useful_epochs,
        recommendations=tuple(Recommendation(**row.as_json()) for row in rows),
        tier=tier.name, tier_label=tier.label, tier_range=report.tier_range_text(tier), tier_advice=tier.advice,
        diagnostics=tuple(diagnose(s, timings, projection, totals.reserved_bytes)),
        skipped_steps=int(s.step.skipped_steps),  # note: a sync point, once, after timing
        next_command=command, next_command_why=why,
        estimate=parallel_estimate(s, projection.best.model),
        run_costs=run.info, schedule=run.schedule_info)


def python_launcher(launcher: Sequence[str]) -> list[str]:
    """`launcher` with a bare `python` replaced by the interpreter running this script (a bare `python` may be
    one without torch), written relative to the current folder when it lies under it (`.venv/bin/python`)."""
    if list(launcher) != ["python"] or not sys.executable:
        return list(launcher)
    executable = sys.executable
    try:
        relative = os.path.relpath(executable)
    except ValueError:   # another drive (Windows)
        return [executable]
    if not relative.startswith(os.pardir):
        return [relative if os.sep in relative else os.path.join(os.curdir, relative)]
    on_path = shutil.which(os.path.basename(executable))
    if on_path and os.path.realpath(on_path) == os.path.realpath(executable):
        return [os.path.basename(executable)]   # what `python3` on the PATH runs anyway
    return [executable]


def choose_row(args: argparse.Namespace, rows: Sequence[Any], tier: report.Tier) -> tuple[Any, str]:
    """The recommendation the next command runs, and why: the --time-budget row when given; otherwise the
    shortest budget of the table whose plan trains at least one whole epoch (the largest budget's row when
    none does)."""
    import run_budget

    if args.time_budget is not None:
        row = next(r for r in rows if r.source == "--time-budget")
        return row, f"fits --time-budget {report.duration_text(args.time_budget)}: {run_budget.format_row(row)}"
    table = [r for r in rows if r.source == "table"]
    whole = [r for r in table if r.plan is not None and r.max_batches is None]
    row = whole[0] if whole else table[-1]
    which = ("the shortest budget in the table that trains a whole epoch" if whole
             else "the longest budget in the table (none of them holds a whole epoch)")
    return row, (f"{which}: {run_budget.format_row(row)}; pass --time-budget (e.g. 2h) to plan yours "
                 f"(the {tier.label.lower()} tier)")


def next_command(args: argparse.Namespace, rows: Sequence[Any], tier: report.Tier,
                 launcher: Sequence[str] = ("python",)) -> tuple[str, str]:
    """The trainer command with these settings (started by `launcher`) and the chosen row, and why.

    `--random-init` is not repeated: random weights time the same as the pretrained ones, and the point of
    the run is to fine-tune the pretrained model (the trainer accepts this result for it)."""
    flags = [flag for flag in trainer_flags(args) if flag != "--random-init"]
    row, why = choose_row(args, rows, tier)
    if row.plan is None:
        return "", why
    if args.time_budget is not None and args.json:
        why += (f"; or let the trainer read this result: --epochs auto --time-budget "
                f"{report.duration_text(args.time_budget)} --throughput-json {args.json}")
    if args.random_init:
        why += (f"; timed with random weights, it trains the pretrained {args.model_name} "
                f"(add --random-init to train from scratch)")
    if row.max_batches is not None:
        head = ["--epochs", "1", "--max-batches", str(row.max_batches)]
    else:
        head = ["--epochs", str(row.epochs)]
    return shlex.join([*launcher, "trainloop_gpu_finetuned.py", *head, *flags]), why


# ------------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import run_costs

    s = setup(args, run_costs.process_start_time())   # start-up counts from process start, imports included
    try:
        return _measure(s)
    finally:
        s.ctx.cleanup()


def _measure(s: Setup) -> int:
    args, info, say = s.args, s.device_info, s.ctx.print  # only rank 0 prints and writes
    per = f" per process ({s.ctx.world_size} processes)" if s.ctx.is_distributed else ""
    skipped = len(s.data.skipped(0))
    left_out = f" ({skipped} too long for --max-length {args.max_length}, left out)" if skipped else ""
    say(f"Benchmarking {args.model_name} on {info['name']} ({s.precision.name}): {s.data_description}, "
        f"{len(s.data.encoded(0))} samples{left_out}, {len(s.epoch_shapes)} batches per epoch{per}")
    if s.compiled:
        say("Decoder blocks compiled (--compile): the first steps include compiling, outside the timed window")
    import run_setup

    recompute = run_setup.describe_long_batches(args, s.step, s.data)
    if recompute:
        say(recompute[0].upper() + recompute[1:])
    compiled = compile_graph_variants(s)
    longest = run_longest_batch(s)
    say(f"Longest batch of the epoch ({longest[0].rows} x {longest[0].length} tokens) fits. "
        f"Warming up ({args.warmup} batch{'' if args.warmup == 1 else 'es'})...")
    import training

    with training.out_of_memory_as_user_error(s.device):  # fragmentation can still run out later
        timings = time_batches(s, args.warmup, args.num_batches,
                               on_start=lambda: say(f"Timing {args.num_batches} batches..."))
    projection = report.project_epoch(s.epoch_shapes, timings.positions, timings.batch_ms, seed=args.seed)
    if not timings.interrupted:
        say("Timing a checkpoint, the final save" + (", and evaluation by real decoding" if s.evaluation else "")
            + " (what the run does besides training)...")
    with training.out_of_memory_as_user_error(s.device, "while timing evaluation (--eval-batch-size "
                                                        f"{args.eval_batch_size}: lower it first): "):
        run = measure_run_costs(s, timings, projection, compiled)
    result = build_result(s, timings, longest, projection, run)
    say()
    say(report.format_report(result))
    if args.json and s.ctx.is_main:
        result.write(args.json)
        say(f"\nResult written to {args.json}")
    if timings.interrupted:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if args.time_budget is not None:
        import run_budget

        problem = run_budget.budget_problem(args.time_budget, run.costs, run.schedule, run.policy)
        if problem:
            raise UserError(problem)
    return 0


if __name__ == "__main__":
    run_cli(main)
