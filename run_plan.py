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
                    args.early_stop, args.eval_views, args.eval_score)


def read_benchmark(args: argparse.Namespace, current: dict[str, Any], batches_per_epoch: int
                   ) -> tuple[BenchmarkResult | None, int | str, int | None, list[str]]:
    """The --throughput-json result when it applies to this run (None otherwise), the epochs and max batches
    (from it for --epochs auto), and notes to print."""
    epochs, max_batches = args.epochs, args.max_batches
    if not args.throughput_json:
        return None, epochs, max_batches, []
    result = benchmark_result.load(args.throughput_json)
    if epochs == "auto":
        epochs, auto_batches, why = epochs_from_benchmark(result, args.throughput_json, args.time_budget, current,
                                                          batches_per_epoch)
        if auto_batches is not None:
            max_batches = min(auto_batches, max_batches or auto_batches)
        return result, epochs, max_batches, [why]
    if throughput_report.settings_mismatches(result.settings, current):
        return None, epochs, max_batches, [f"{args.throughput_json} was measured with other settings; not "
                                           f"comparing speeds"]
    return result, epochs, max_batches, []


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
    tokens_per_batch = sum(len(e) for e in data.encoded(0)) / data.num_batches(0)
    deadline = started + args.time_budget if args.time_budget else None
    return RunPlan(int(epochs), max_batches, epoch_batches, total_steps, tokens_per_batch, output_dir, evaluation,
                   deadline)


def epochs_from_benchmark(result: BenchmarkResult, path: str, budget_seconds: float, current: dict[str, Any],
                          batches_per_epoch: int) -> tuple[int, int | None, str]:
    """(epochs, max_batches or None, explanation) for --epochs auto, from a measure_throughput.py result.

    Refuses (UserError, with every difference) when the result was measured with other speed-relevant
    settings, on another device, or on data with another number of batches per epoch.
    """
    differences = throughput_report.settings_mismatches(result.settings, current)
    if result.batches_per_epoch != batches_per_epoch:
        differences.append(f"batches per epoch: benchmark {result.batches_per_epoch}, this run {batches_per_epoch}")
    if differences:
        world_size = current.get("world_size", 1)
        how = (f"torchrun --nproc_per_node {world_size} measure_throughput.py" if world_size > 1
               else "measure_throughput.py")
        raise UserError(f"--epochs auto: {path} was measured with other settings, so its epoch time does not apply "
                        f"({'; '.join(differences)}); rerun {how} with this run's flags on this "
                        f"device, or give --epochs N")
    hours = budget_seconds / 3600
    row = next((r for r in result.recommendations if math.isclose(r.budget_hours, hours, rel_tol=1e-6)), None)
    if row is None:
        row = throughput_report.recommend_for_budget(hours, result.epoch_seconds, batches_per_epoch,
                                                     result.max_useful_epochs)
    budget = (throughput_report.format_duration(hours) if budget_seconds % 60 == 0 else clock(budget_seconds))
    where = f"{path}: {result.epoch_seconds / 60:.1f} min per epoch on {result.settings.get('device')}"
    if row.max_batches is not None:
        if row.max_batches == 0:
            raise UserError(f"--epochs auto: not even one batch fits in {budget} "
                            f"({where}); give a longer --time-budget")
        return 1, row.max_batches, (f"--epochs auto: 1 epoch of {row.max_batches} batches ({where}; "
                                    f"a whole epoch does not fit {budget})")
    capped = f", capped at the useful maximum though {row.fits_epochs} fit" if row.capped else ""
    return row.epochs, None, (f"--epochs auto: {plural(row.epochs, 'epoch')} in {budget} ({where}{capped})")


def benchmark_cost_model(result: BenchmarkResult) -> throughput_report.CostModel:
    """The per-batch cost model measure_throughput.py recommended (benchmark_result checked its shape)."""
    kind = result.epoch_projection.kind
    return throughput_report.CostModel(kind, result.projections[kind].coefficients)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
