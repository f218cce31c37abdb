"""The training run's plan: computed once, before the model loads, from the flags, the benchmark result and
the resumed checkpoint, and frozen from then on.

The flags (`args`) stay as the user gave them (merged with a resumed run's settings); everything derived
from them lives here: how many epochs (`--epochs auto` reads the benchmark), how many batches each epoch
has on each process, the optimizer steps the schedule spans, the output folder, and what is evaluated when.
The checkpoint records `RunPlan.record()`, and a resume reads its epochs and max batches back.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import benchmark_result
import checkpointing
import distributed
import throughput_report
from benchmark_result import BenchmarkResult
from errors import UserError
from run_monitor import clock

RUNS_DIR = Path("runs")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
MODEL_DIR = "model"
PLAN_FIELDS = ("epochs", "max_batches")   # what a resume takes from the checkpoint's plan unless given again


@dataclass(frozen=True)
class EvalPlan:
    """What is evaluated, and when: after each epoch, every `every` optimizer steps (0: only then), stopping
    after `early_stop` evaluations without a better accuracy (0: never). No tasks: evaluation is off."""
    tasks: tuple[Any, ...]            # arc_dataset.Task with known test outputs
    description: str | None
    every: int
    attempts: int
    batch_size: int
    early_stop: int
    views: int = 1                    # --eval-views: augmented views decoded and voted per test input
    score: str = "votes"              # --eval-score

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` evaluates mid-epoch."""
        return bool(self.tasks) and bool(self.every) and step % self.every == 0


@dataclass(frozen=True)
class RunPlan:
    """The shape of the run, fixed before it starts."""
    epochs: int
    max_batches: int | None
    epoch_batches: tuple[int, ...]     # batches each process trains per epoch
    total_steps: int                   # optimizer steps the learning-rate schedule spans
    tokens_per_batch: float            # real tokens per batch, epoch 0's mean (for the ETA of later epochs)
    output_dir: Path
    evaluation: EvalPlan
    deadline: float | None             # time.monotonic() by which the run must have stopped (--time-budget)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / checkpointing.CHECKPOINT_DIR

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def plot_path(self) -> Path:
        return self.output_dir / PLOT_FILE

    def tokens_of_epochs(self, first: int) -> int:
        """Real tokens still to train in epochs `first`.. (estimated from epoch 0's batches: same data)."""
        return int(self.tokens_per_batch * sum(self.epoch_batches[first:]))

    def record(self) -> dict[str, Any]:
        """What a checkpoint's meta.json keeps of the plan."""
        return {"epochs": self.epochs, "max_batches": self.max_batches, "epoch_batches": list(self.epoch_batches),
                "total_steps": self.total_steps, "output_dir": str(self.output_dir)}


def plan_evaluation(args: argparse.Namespace, tasks: Any) -> EvalPlan:
    """The evaluation tasks (--eval-data, or the training tasks' test inputs) and when they are scored."""
    from arc_dataset import load_tasks
    from evaluation import tasks_with_answers

    chosen: Sequence[Any] = ()
    description = None
    if args.eval_tasks:
        source = load_tasks(args.eval_data, None, args.strict) if args.eval_data else tasks
        chosen = tasks_with_answers(source.tasks, args.eval_tasks)
        description = source.description + ("" if args.eval_data else " (test inputs)")
        if not chosen:
            raise UserError(f"{source.description}: no task with known test outputs to evaluate on; give "
                            f"--eval-data with solutions, or --eval-tasks 0")
    return EvalPlan(tuple(chosen), description, args.eval_every, args.eval_attempts, args.eval_batch_size,
                    getattr(args, "early_stop", 0), args.eval_views, args.eval_score)  # the benchmark has no --early-stop


@dataclass(frozen=True)
class BenchmarkReading:
    """What the --throughput-json result gives this run: the result when it applies (None otherwise), the
    epochs and max batches (from it for --epochs auto), the whole-run plan it makes for this run's epochs
    (run_budget.RunPlan; None when the result does not apply or the run resumes), and notes to print."""
    result: BenchmarkResult | None
    epochs: int | str
    max_batches: int | None
    whole_run: Any = None
    margin: float | None = None
    notes: tuple[str, ...] = ()


def schedule_record(args: argparse.Namespace, evaluation: "EvalPlan") -> benchmark_result.Schedule:
    """The settings a whole-run plan's counts depend on, as the benchmark records them and the trainer checks."""
    return benchmark_result.Schedule(
        eval_tasks=len(evaluation.tasks) if evaluation else 0, eval_data=args.eval_data if evaluation else None,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, eval_attempts=args.eval_attempts,
        eval_views=args.eval_views, save_every=args.save_every, grad_accum=args.grad_accum)


def schedule_mismatches(recorded: benchmark_result.Schedule, current: benchmark_result.Schedule) -> list[str]:
    """The schedule settings that differ ('eval_tasks: benchmark 100, this run 0'), one line each."""
    flag = {"eval_tasks": "--eval-tasks", "eval_data": "--eval-data", "eval_every": "--eval-every",
            "eval_batch_size": "--eval-batch-size", "eval_attempts": "--eval-attempts", "eval_views": "--eval-views",
            "save_every": "--save-every", "grad_accum": "--grad-accum"}
    return [f"{flag[name]}: benchmark {getattr(recorded, name)!r}, this run {getattr(current, name)!r}"
            for name in flag if getattr(recorded, name) != getattr(current, name)]


def run_costs_of(result: BenchmarkResult) -> Any:
    """run_budget.RunCosts from a result's measurements (the per-batch predictions are not stored: a partial
    epoch not in the result's rows is planned at the epoch's mean batch)."""
    import run_budget

    costs, evaluation = result.run_costs, result.run_costs.evaluation
    return run_budget.RunCosts(
        startup_seconds=costs.startup_seconds, epoch_seconds=result.epoch_seconds,
        batches_per_epoch=result.batches_per_epoch,
        eval_pass_seconds=evaluation.pass_seconds if evaluation else 0.0,
        checkpoint_seconds=costs.checkpoint_seconds, final_save_seconds=costs.final_save_seconds,
        plot_seconds=costs.plot_seconds, first_plot_extra_seconds=costs.first_plot_extra_seconds,
        epoch_data_seconds=costs.epoch_data_seconds,
        expected_error=result.epoch_projection.expected_error,
        eval_error=evaluation.expected_error if evaluation else None)


def budget_schedule(result: BenchmarkResult) -> Any:
    import run_budget

    schedule = result.schedule
    return run_budget.Schedule(result.batches_per_epoch, grad_accum=schedule.grad_accum,
                               eval_enabled=schedule.eval_tasks > 0, eval_every=schedule.eval_every,
                               save_every=schedule.save_every)


def budget_policy(result: BenchmarkResult) -> Any:
    """The benchmark's policy: the margin rules, and the reserve that keeps a run on plan clear of the stop rules."""
    import run_budget

    costs = run_costs_of(result)
    return run_budget.BudgetPolicy(min_margin=run_budget.min_margin_for(result.device.type),
                                   reserve_seconds=run_budget.stop_rule_reserve(costs, result.per_batch_ms.max / 1000),
                                   max_useful_epochs=result.max_useful_epochs)


def plan_of_row(row: benchmark_result.Recommendation) -> Any:
    """A result's row as run_budget.RunPlan (its parts exactly as the benchmark planned them)."""
    import run_budget

    assert row.breakdown is not None and row.counts is not None
    return run_budget.RunPlan(row.epochs, row.max_batches, run_budget.EventCounts(**row.counts), **row.breakdown)


def read_benchmark(args: argparse.Namespace, current: dict[str, Any], batches_per_epoch: int,
                   evaluation: "EvalPlan | None" = None, resuming: bool = False) -> BenchmarkReading:
    """Read --throughput-json for this run: --epochs auto takes the whole-run row for --time-budget; with
    --epochs N a result measured with these settings plans N epochs, so the run can report against it."""
    import run_budget

    epochs, max_batches = args.epochs, args.max_batches
    if not args.throughput_json:
        return BenchmarkReading(None, epochs, max_batches)
    result = benchmark_result.load(args.throughput_json)
    schedule = schedule_record(args, evaluation) if evaluation is not None else result.schedule
    if epochs == "auto":
        epochs, auto_batches, why, plan, margin = epochs_from_benchmark(
            result, args.throughput_json, args.time_budget, current, batches_per_epoch, schedule)
        if auto_batches is not None:
            max_batches = min(auto_batches, max_batches or auto_batches)
        if plan is not None and max_batches != plan.max_batches:   # --max-batches below the row's
            plan = run_budget.plan_run(run_costs_of(result), budget_schedule(result).with_length(epochs, max_batches))
        return BenchmarkReading(result, epochs, max_batches, None if resuming else plan, margin, (why,))
    differences = throughput_report.settings_mismatches(result.settings, current)
    if differences:
        return BenchmarkReading(None, epochs, max_batches, notes=(f"{args.throughput_json} was measured with other "
                                                                  f"settings; not comparing speeds",))
    plan = None
    if not resuming and not schedule_mismatches(result.schedule, schedule) and result.batches_per_epoch == batches_per_epoch:
        plan = run_budget.plan_run(run_costs_of(result), budget_schedule(result).with_length(int(epochs), max_batches))
    return BenchmarkReading(result, epochs, max_batches, plan,
                            run_budget.plan_margin(plan, run_costs_of(result), budget_policy(result)) if plan else None)


def make_plan(args: argparse.Namespace, data: Any, ctx: distributed.DistributedContext, epochs: int,
              max_batches: int | None, evaluation: EvalPlan, resume_from: Path | None, started: float) -> RunPlan:
    """The run's plan from the (merged) flags, the epoch count, the data and the process group."""
    limit = max_batches or math.inf
    # Batches per process: one optimizer step trains one batch on each of the world_size processes.
    epoch_batches = tuple(int(min(distributed.steps_per_epoch(data.num_batches(e), ctx.world_size), limit))
                          for e in range(epochs))
    # TrainStep accumulates across epoch boundaries, so the optimizer steps come from all batches together.
    total_steps = sum(epoch_batches) // args.grad_accum
    if total_steps == 0:
        raise UserError(f"--grad-accum {args.grad_accum} is more than the {sum(epoch_batches)} batches of "
                        f"this run: no optimizer step would happen")
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
    elif resume_from is not None:
        output_dir = resume_from.parent.parent
    else:  # rank 0's clock names the run (the ranks may start a second apart)
        output_dir = Path(ctx.broadcast_object(str(RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S"))))
    tokens_per_batch = float(data.lengths(0).sum()) / data.num_batches(0)  # without encoding epoch 0
    deadline = started + args.time_budget if args.time_budget else None
    return RunPlan(int(epochs), max_batches, epoch_batches, total_steps, tokens_per_batch, output_dir, evaluation,
                   deadline)


def epochs_from_benchmark(result: BenchmarkResult, path: str, budget_seconds: float, current: dict[str, Any],
                          batches_per_epoch: int, schedule: benchmark_result.Schedule | None = None
                          ) -> tuple[int, int | None, str, Any, float]:
    """(epochs, max_batches or None, explanation, the whole-run plan, its margin) for --epochs auto: the result's
    row for this budget (its --time-budget row first), or the same planning for a budget it has no row for.

    Refuses (UserError, with every difference) when the result was measured with other speed-relevant
    settings, on another device, on data with another number of batches per epoch, or for another schedule
    (evaluation and checkpoint flags: the plan counts their cost); and a budget too short for any run.
    """
    import run_budget

    differences = throughput_report.settings_mismatches(result.settings, current)
    if result.batches_per_epoch != batches_per_epoch:
        differences.append(f"batches per epoch: benchmark {result.batches_per_epoch}, this run {batches_per_epoch}")
    if schedule is not None:
        differences += schedule_mismatches(result.schedule, schedule)
    if differences:
        world_size = current.get("world_size", 1)
        how = (f"torchrun --nproc_per_node {world_size} measure_throughput.py" if world_size > 1
               else "measure_throughput.py")
        raise UserError(f"--epochs auto: {path} was measured with other settings, so its plan does not apply "
                        f"({'; '.join(differences)}); rerun {how} with this run's flags on this "
                        f"device, or give --epochs N")
    costs, plan_schedule, policy = run_costs_of(result), budget_schedule(result), budget_policy(result)
    problem = run_budget.budget_problem(budget_seconds, costs, plan_schedule, policy)
    if problem:
        raise UserError(f"--epochs auto: {problem}")
    rows = [row for row in result.recommendations if row.breakdown is not None
            and math.isclose(row.budget_hours * 3600, budget_seconds, rel_tol=1e-9)]
    rows.sort(key=lambda row: row.source != "--time-budget")
    if rows:
        row = rows[0]
        plan, margin, fits, capped = plan_of_row(row), row.margin, row.fits_epochs, row.capped
    else:
        budget_row = run_budget.recommend(budget_seconds, costs, plan_schedule, policy, source="--time-budget")
        plan, margin, fits, capped = budget_row.plan, budget_row.margin, budget_row.fits_epochs, budget_row.capped
    budget = run_budget.format_budget(budget_seconds)
    where = f"{path}: {result.epoch_seconds / 60:.1f} min per epoch on {result.settings.get('device')}"
    detail = run_budget.format_plan(plan, margin)
    if plan.max_batches is not None:
        return 1, plan.max_batches, (f"--epochs auto: 1 epoch of {plan.max_batches} batches in {budget} ({detail}; "
                                     f"{where}; a whole epoch does not fit)"), plan, margin
    capped_text = f", capped at the useful maximum though {fits} fit" if capped else ""
    return plan.epochs, None, (f"--epochs auto: {plural(plan.epochs, 'epoch')} in {budget} ({detail}; "
                               f"{where}{capped_text})"), plan, margin


def benchmark_cost_model(result: BenchmarkResult) -> throughput_report.CostModel:
    """The per-batch cost model measure_throughput.py recommended (benchmark_result checked its shape)."""
    kind = result.epoch_projection.kind
    return throughput_report.CostModel(kind, result.projections[kind].coefficients)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
