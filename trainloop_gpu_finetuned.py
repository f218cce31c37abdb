"""Fine-tune a Qwen model on ARC-AGI tasks, for hours on one GPU, with a loop you can leave running and trust.

    # the guide's smoke test, then a real run (see epochs-guide.md)
    python trainloop_gpu_finetuned.py --epochs 1 --max-batches 100 --device cuda
    python trainloop_gpu_finetuned.py --epochs 5 --device cuda

    # as many epochs as 2 hours allow, according to the benchmark measured with the same settings
    python measure_throughput.py --device cuda --json results.json
    python trainloop_gpu_finetuned.py --epochs auto --time-budget 2h --throughput-json results.json --device cuda

    # continue the newest run after Ctrl-C, a time budget or a lost session (same settings, exact)
    python trainloop_gpu_finetuned.py --resume
    python trainloop_gpu_finetuned.py --resume runs/20250101-120000

    # CPU, a few seconds: the 2-layer test model (evaluation off: an untrained model writes the longest grid
    # allowed before it learns to stop, which takes a while on CPU)
    python trainloop_gpu_finetuned.py --model-name tiny --device cpu --epochs 2 --max-batches 20 --eval-tasks 0

    # several GPUs (DistributedDataParallel; see distributed.py for several machines), and the same on CPU
    torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py --epochs 5 --device cuda
    torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py --model-name tiny --device cpu --epochs 1 --eval-tasks 0

What it does, per epoch: trains on every leave-one-out sample (3232 on ARC-AGI-2 training) with a tqdm bar
whose ETA comes from the tokens still to go (sample lengths vary ~100x, so counting batches would swing),
evaluates exact-match accuracy on held-out test inputs (greedy decoding; pass@2 with --eval-attempts 2),
appends to metrics.jsonl, checkpoints atomically, and redraws training_curves.png. At the end it saves the
final model (model.save_model) and prints where everything is.

Stopping: Ctrl-C or SIGTERM finishes the current batch, saves a checkpoint, prints the resume command and
exits 130 (a second Ctrl-C quits at once). --time-budget stops the same way, early enough to save, using
the measured step and save times. Non-finite losses: the fp16 GradScaler skips such steps; --max-bad-steps
in a row stop the run (without fp16's scaler, the first non-finite loss does), keeping the last good
checkpoint. Out of memory: one line saying what to change, exit 2.

Under torchrun each of the N processes trains its share of every epoch: optimizer step k trains batches
k*N .. k*N+N-1 of the epoch's plan, one per process, with gradients averaged over the processes, so an epoch
has ceil(batches / N) steps and the result equals one process with --grad-accum N (up to floating-point
order). Rank 0 alone prints, logs, plots and writes checkpoints; evaluation is split over the processes.
A resume needs the same number of processes (the position in the epoch is counted in steps of N batches).
Stopping is agreed: every process checks at the same optimizer steps (about every STOP_CHECK_SECONDS) whether
any of them got a signal or ran out of time, so they all stop after the same step and rank 0 saves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

import checkpointing
import distributed
import throughput_report
from arc_dataset import SYMBOLS, load_tasks
from atomic_io import write_text_atomic
from cli_common import (DEFAULT_MODEL, HelpFormatter, add_shared_args, jsonable, non_negative_int, positive_int, speed_settings,
                        validate_shared_args)
from errors import EXIT_INTERRUPTED, UserError, run_cli
from distributed import DistributedContext
from evaluation import EvalResult, evaluate, merge_results, tasks_with_answers
from model import count_parameters, save_model
from run_setup import build_training_data, build_training_step, describe_long_batches
from training import (describe_device, load_optimizer_state, oom_message, peak_memory_bytes, resolve_device,
                      resolve_precision, synchronize)

RUNS_DIR = Path("runs")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
MODEL_DIR = "model"
SCRIPT = "python trainloop_gpu_finetuned.py"

# Settings that decide what the model computes; `--resume` continues exactly, so these cannot change.
TRAJECTORY_ARGS = ("model_name", "random_init", "lora_rank", "data", "solutions", "max_length", "batch_size",
                   "tokens_per_batch", "augment", "seed", "lr", "weight_decay", "grad_accum", "max_grad_norm",
                   "warmup_steps")
# Settings that decide what code runs and which weights load. A checkpoint is untrusted input, so these come from
# the command line only: a resume never takes them from meta.json, and refuses when the checkpoint's differ.
MODEL_SOURCE_ARGS = ("model_name", "random_init", "trust_remote_code")
SLOWDOWN_FACTOR = 1.5         # steps this much slower than early in the run -> warn (once)
BENCHMARK_SLOWDOWN = 1.25     # epoch projected this much longer than measure_throughput.py said -> warn (once)
REFERENCE_STEPS = 100         # steps (after the first) that define "early in the run"
WINDOW_STEPS = 50             # recent steps compared against that reference
# Under torchrun, how often the processes agree whether to stop (a signal, the time budget). Each check is one
# host-side all-reduce of a few numbers over gloo (0.35 ms between two CPU processes here) that also makes
# the processes wait for each other, so it runs every ~2 s of training rather than every step: torchrun
# SIGKILLs its workers --shutdown-timeout (30) s after forwarding Ctrl-C, which leaves time to save.
STOP_CHECK_SECONDS = 2.0


# --------------------------------------------------------------------------------------------- arguments

def epochs_arg(text: str) -> int | str:
    """argparse type: a whole number of epochs >= 1, or 'auto'."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_shared_args(parser)
    run = parser.add_argument_group("training run")
    run.add_argument("--epochs", type=epochs_arg, default=1,
                     help="epochs to train, or 'auto': the most that --time-budget allows according to "
                          "--throughput-json (measure_throughput.py --json)")
    run.add_argument("--max-batches", type=positive_int, default=None,
                     help="stop each epoch after this many batches (smoke test: --epochs 1 --max-batches 100); "
                          "under torchrun, per process: each step trains one batch on each")
    run.add_argument("--time-budget", type=throughput_report.duration_arg, default=None, metavar="DURATION",
                     help="wall-clock budget such as 30m, 2h or 1.5h (bare numbers are seconds): stop with a "
                          "checkpoint and the final model before it runs out, judged from measured step and "
                          "save times")
    run.add_argument("--throughput-json", default=None, metavar="PATH",
                     help="a measure_throughput.py --json result: gives --epochs auto its epoch count, and "
                          "otherwise the speed this run is compared against")
    run.add_argument("--output-dir", default=None,
                     help="where metrics, checkpoints, plot and final model go (if not given: runs/<date-time>, "
                          "or with --resume the resumed run's folder)")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                     help="continue a run exactly (model, optimizer, schedule, scaler, RNG, position in the "
                          "epoch) with its saved settings: PATH is a run folder or a checkpoint; without "
                          "PATH, the newest checkpoint of --output-dir, or of the newest run in runs/")
    run.add_argument("--save-every", type=non_negative_int, default=1000,
                     help="also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    run.add_argument("--keep-checkpoints", type=positive_int, default=2,
                     help="how many of the newest checkpoints to keep on disk")
    run.add_argument("--log-every", type=positive_int, default=50,
                     help="optimizer steps between metrics.jsonl lines (the loss is read from the device "
                          "only then)")
    run.add_argument("--max-bad-steps", type=positive_int, default=20,
                     help="stop after this many optimizer steps in a row with a non-finite loss or gradient "
                          "(fp16: skipped by the GradScaler; without the scaler the first one stops the run)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-data", default=None,
                            help="tasks whose test inputs are scored (any --data format; if not given: the test "
                                 "inputs of the training tasks, which training never sees)")
    evaluation.add_argument("--eval-tasks", type=non_negative_int, default=100,
                            help="evaluate on the first N tasks with known test outputs (0: no evaluation); "
                                 "greedy decoding costs a forward pass per generated token")
    evaluation.add_argument("--eval-every", type=non_negative_int, default=0,
                            help="also evaluate every N optimizer steps (0: at the end of each epoch only)")
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=8,
                            help="test inputs decoded together, shortest prompts first (a decode step costs "
                                 "about the same for 8 as for 1 on a GPU); lower it if evaluation runs out of "
                                 "memory")
    evaluation.add_argument("--eval-attempts", type=int, choices=(1, 2), default=1,
                            help="2: a second attempt on an augmented view, mapped back (pass@2, the ARC "
                                 "Prize metric)")
    evaluation.add_argument("--early-stop", type=non_negative_int, default=0,
                            help="stop after N evaluations in a row without a better eval accuracy (0: off)")
    return parser


_UNSET = object()


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments, and the names of those given on the command line (a resume keeps the others)."""
    args = build_parser().parse_args(argv)
    probe = build_parser().parse_args(argv, namespace=argparse.Namespace(**{k: _UNSET for k in vars(args)}))
    return args, {key for key, value in vars(probe).items() if value is not _UNSET}


def validate_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments at once, before anything heavy is loaded."""
    problems = validate_shared_args(args)
    if args.epochs == "auto":
        if args.time_budget is None or args.throughput_json is None:
            problems.append("--epochs auto needs --time-budget and --throughput-json (from measure_throughput.py "
                            "--json PATH): the epoch count is what the measured speed fits in the budget")
    if args.throughput_json is not None and not Path(args.throughput_json).is_file():
        problems.append(f"--throughput-json {args.throughput_json}: no such file; run measure_throughput.py "
                        f"--json {args.throughput_json} first")
    if args.eval_tasks == 0 and (args.eval_every or args.early_stop):
        problems.append("--eval-every and --early-stop need evaluation; --eval-tasks is 0")
    if args.resume is None and args.output_dir is not None:
        existing = checkpointing.latest_checkpoint(Path(args.output_dir) / checkpointing.CHECKPOINT_DIR)
        if existing is not None:
            problems.append(f"--output-dir {args.output_dir} already holds a run ({existing.name}); continue it "
                            f"with --resume {args.output_dir} or choose another folder")
    return problems


def merge_resumed_args(args: argparse.Namespace, explicit: set[str], saved: dict[str, Any]) -> list[str]:
    """Take the resumed run's settings for every flag not given now; refuse changes that would make the
    continuation inexact. Returns notes to print (e.g. a changed schedule length).

    The model's source (MODEL_SOURCE_ARGS) is never taken from the checkpoint: a tampered meta.json must not
    be able to turn on remote code or swap the weights. A checkpoint of another model is refused instead."""
    check_model_source(args, saved)
    conflicts = [f"--{key.replace('_', '-')} {getattr(args, key)!r} (run: {saved[key]!r})"
                 for key in TRAJECTORY_ARGS if key in explicit and key in saved and getattr(args, key) != saved[key]]
    if conflicts:
        raise UserError(f"--resume continues a run exactly, so its settings cannot change: {'; '.join(conflicts)}; "
                        f"start a new run (without --resume) to use them")
    notes = []
    for key in ("epochs", "max_batches"):
        if key in explicit and key in saved and getattr(args, key) != saved[key]:
            notes.append(f"--{key.replace('_', '-')} changed from {saved[key]} to {getattr(args, key)}: the "
                         f"learning-rate schedule is stretched to the new length from here on")
    for key, value in saved.items():
        if (key not in explicit and key not in ("resume", "output_dir") and key not in MODEL_SOURCE_ARGS
                and hasattr(args, key)):
            setattr(args, key, value)
    if "throughput_json" not in explicit and args.throughput_json and not Path(args.throughput_json).is_file():
        args.throughput_json = None  # only used to compare speeds once the epoch count is fixed
    return notes


def check_model_source(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Refuse a resume whose command line would load another model than the checkpoint was trained from,
    naming the flag to give (the checkpoint's values are only compared, never used)."""
    wrong = []
    if saved.get("model_name", args.model_name) != args.model_name:
        wrong.append(f"it was trained from --model-name {saved['model_name']!r} and this command loads "
                     f"{args.model_name!r}")
    if bool(saved.get("random_init", False)) != bool(args.random_init):
        wrong.append("it was trained " + ("with" if saved.get("random_init") else "without")
                     + " --random-init and this command " + ("gives" if args.random_init else "does not give")
                     + " it")
    if wrong:
        raise UserError(f"--resume: the checkpoint is of another model than this command loads ({'; '.join(wrong)}); "
                        f"the model and its code are chosen on the command line only, never by a checkpoint: give "
                        f"the same --model-name / --random-init as the run")


def model_source_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that choose the model (repeated in the resume command, since a resume takes
    them from the command line only)."""
    flags = [] if args.model_name == DEFAULT_MODEL else ["--model-name", args.model_name]
    return flags + ["--random-init"] * bool(args.random_init) + ["--trust-remote-code"] * bool(args.trust_remote_code)


# ------------------------------------------------------------------------------------------ --epochs auto

def epochs_from_benchmark(result: dict[str, Any], path: str, budget_seconds: float, current: dict[str, Any],
                          batches_per_epoch: int) -> tuple[int, int | None, str]:
    """(epochs, max_batches or None, explanation) for --epochs auto, from a measure_throughput.py result.

    Refuses (UserError, with every difference) when the result was measured with other speed-relevant
    settings, on another device, or on data with another number of batches per epoch.
    """
    differences = throughput_report.settings_mismatches(result["settings"], current)
    if result["batches_per_epoch"] != batches_per_epoch:
        differences.append(f"batches per epoch: benchmark {result['batches_per_epoch']}, this run {batches_per_epoch}")
    if differences:
        world_size = current.get("world_size", 1)
        how = (f"torchrun --nproc_per_node {world_size} measure_throughput.py" if world_size > 1
               else "measure_throughput.py")
        raise UserError(f"--epochs auto: {path} was measured with other settings, so its epoch time does not apply "
                        f"({'; '.join(differences)}); rerun {how} with this run's flags on this "
                        f"device, or give --epochs N")
    hours = budget_seconds / 3600
    row = next((r for r in result["recommendations"] if math.isclose(r["budget_hours"], hours, rel_tol=1e-6)), None)
    if row is None:
        rec = throughput_report.recommend_for_budget(
            hours, result["epoch_seconds"], batches_per_epoch,
            result.get("max_useful_epochs", throughput_report.DEFAULT_MAX_USEFUL_EPOCHS))
        row = asdict(rec)
    budget = (throughput_report.format_duration(hours) if budget_seconds % 60 == 0
              else _clock(budget_seconds))
    epoch_minutes = result["epoch_seconds"] / 60
    where = f"{path}: {epoch_minutes:.1f} min per epoch on {result['settings'].get('device')}"
    if row.get("max_batches") is not None:
        if row["max_batches"] == 0:
            raise UserError(f"--epochs auto: not even one batch fits in {budget} "
                            f"({where}); give a longer --time-budget")
        return 1, row["max_batches"], (f"--epochs auto: 1 epoch of {row['max_batches']} batches ({where}; "
                                       f"a whole epoch does not fit {budget})")
    capped = (f", capped at the useful maximum though {row['fits_epochs']} fit"
              if row.get("capped") else "")
    return row["epochs"], None, (f"--epochs auto: {_plural(row['epochs'], 'epoch')} in {budget} "
                                 f"({where}{capped})")


# ------------------------------------------------------------------------------------------ speed and ETA

class StepTimeModel:
    """Step seconds ~ a + b x tokens, least squares over recent steps (older ones fade with `decay`).

    ARC samples vary ~100x in length, so 'remaining batches x mean batch time' swings with whichever samples
    came last; remaining steps and tokens through this fit does not. The fixed part `a` (optimizer step,
    launch overhead) matters at batch size 1.
    """

    def __init__(self, decay: float = 1 - 1 / 500):
        self.decay = decay
        self.n = self.t = self.tt = self.y = self.ty = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n = self.n * d + 1
        self.t = self.t * d + tokens
        self.tt = self.tt * d + tokens * tokens
        self.y = self.y * d + seconds
        self.ty = self.ty * d + tokens * seconds

    def coefficients(self) -> tuple[float, float] | None:
        """(seconds per step, seconds per token), or None before three steps were seen."""
        if self.n < 3 or self.t <= 0:
            return None
        det = self.n * self.tt - self.t * self.t
        if det > 1e-9 * self.n * self.tt:
            b = (self.n * self.ty - self.t * self.y) / det
            a = (self.y - b * self.t) / self.n
            if a >= 0 and b >= 0:
                return a, b
            if b < 0:  # time does not grow with length here (noise, or a fixed-size packed row)
                return self.y / self.n, 0.0
        return 0.0, self.y / self.t

    def predict(self, steps: int, tokens: int) -> float | None:
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        return coefficients[0] * steps + coefficients[1] * tokens


class SlowdownMonitor:
    """Says once when steps become markedly slower than early in this run, and once when they are markedly
    slower than measure_throughput.py measured (the guide: 'if times get slower, something may be degrading').

    Both compare the same batches: the last WINDOW_STEPS steps' wall time against what the reference predicts
    for exactly those batches (the fit of this run's first REFERENCE_STEPS steps; the benchmark's own cost
    model, from its JSON, for their shapes), so a run of long samples is not mistaken for a slowdown.
    """

    def __init__(self, benchmark_model: throughput_report.CostModel | None = None):
        self.reference: tuple[float, float] | None = None
        self.benchmark_model = benchmark_model
        self.window: deque[tuple[int, float, float]] = deque(maxlen=WINDOW_STEPS)
        self.steps = 0
        self.slow_checks = {"run": 0, "benchmark": 0}
        self.warned: set[str] = set()

    def add(self, tokens: int, shape: throughput_report.BatchShape, seconds: float, timing: StepTimeModel) -> None:
        self.steps += 1
        benchmark = float(self.benchmark_model.predict([shape])[0]) / 1000 if self.benchmark_model else 0.0
        self.window.append((tokens, seconds, benchmark))
        if self.reference is None and self.steps >= REFERENCE_STEPS:
            self.reference = timing.coefficients()

    def check(self) -> list[str]:
        """Warnings due now (each kind at most once per run); call at log steps."""
        if len(self.window) < WINDOW_STEPS:
            return []
        actual = sum(seconds for _, seconds, _ in self.window)
        warnings = []
        if self.reference is not None:
            a, b = self.reference
            ratio = actual / max(1e-9, sum(a + b * tokens for tokens, _, _ in self.window))
            if self._slow_twice("run", ratio > SLOWDOWN_FACTOR):
                warnings.append(f"steps are now {ratio:.1f}x slower than early in this run for the same sample "
                                f"lengths; something may be degrading (memory pressure, thermal throttling, "
                                f"another process: check nvidia-smi)")
        if self.benchmark_model is not None:
            expected = sum(benchmark for _, _, benchmark in self.window)
            ratio = actual / max(1e-9, expected)
            if self._slow_twice("benchmark", ratio > BENCHMARK_SLOWDOWN):
                warnings.append(f"steps take {ratio:.2f}x as long as measure_throughput.py measured for batches of "
                                f"these shapes ({1000 * actual / len(self.window):.0f} ms against "
                                f"{1000 * expected / len(self.window):.0f} ms per batch, last {len(self.window)} "
                                f"batches); check nvidia-smi for memory pressure or another process")
        return warnings

    def _slow_twice(self, kind: str, slow: bool) -> bool:
        """True the first time `slow` holds at two checks in a row (one slow window may be a pause)."""
        self.slow_checks[kind] = self.slow_checks[kind] + 1 if slow else 0
        if self.slow_checks[kind] >= 2 and kind not in self.warned:
            self.warned.add(kind)
            return True
        return False


def benchmark_cost_model(result: dict[str, Any]) -> throughput_report.CostModel | None:
    """The per-batch cost model measure_throughput.py recommended, from its JSON (None if absent)."""
    kind = result.get("epoch_projection", {}).get("kind")
    coefficients = result.get("projections", {}).get(kind, {}).get("coefficients")
    if kind not in throughput_report.MODEL_KINDS or not coefficients:
        return None
    return throughput_report.CostModel(kind, tuple(coefficients))


class EpochBar(tqdm):
    """tqdm with the guide's look and an ETA from remaining tokens (`eta_seconds`, set by the loop):
    `Epoch 0 Training:  25%|██▌       | 807/3232 [06:45<20:15] loss: 0.4521, 2,345 tok/s`."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{token_eta}]{stats}"

    def __init__(self, *args: Any, **kwargs: Any):
        self.eta_seconds: float | None = None
        self.stats = ""
        super().__init__(*args, bar_format=self.FORMAT, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        eta = getattr(self, "eta_seconds", None)
        values["token_eta"] = "?" if eta is None else tqdm.format_interval(eta)
        values["stats"] = f" {self.stats}" if getattr(self, "stats", "") else ""
        return values


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------------------------- metrics, plot

class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it happens. Only rank 0 of a
    torchrun group writes (`enabled`); the other ranks' writes are no-ops."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def restore(self, source: Path, up_to_step: int) -> None:
        """Start from `source`'s lines up to the resumed checkpoint's step (later ones are redone)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(source) if r.get("step", 0) <= up_to_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss and eval accuracy against epochs (fractional: epoch + batches done / batches), as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    def position(r: dict[str, Any]) -> float:
        return r["epoch"] + r.get("batch", r["batches"]) / max(1, r["batches"])

    steps = [r for r in records if r.get("kind") == "step" and math.isfinite(r.get("loss", math.nan))]
    epochs = [r for r in records if r.get("kind") == "epoch" and math.isfinite(r.get("loss", math.nan))]
    evals = [r for r in records if r.get("eval_accuracy") is not None]
    if not steps and not epochs:
        return None
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    loss_axes, eval_axes = figure.subplots(2, 1, sharex=True)
    if steps:
        loss_axes.plot([position(r) for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6,
                       label="training loss (log interval mean)")
    if epochs:
        loss_axes.plot([r["epoch"] + 1 for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    loss_axes.set_ylabel("loss (cross-entropy on output grids)")
    loss_axes.legend(loc="upper right")
    loss_axes.grid(alpha=0.3)
    if evals:
        attempts = evals[-1].get("eval_attempts", 1)
        eval_axes.plot([position(r) for r in evals], [100 * r["eval_accuracy"] for r in evals], "o-",
                       label=f"test inputs (pass@{attempts})")
        eval_axes.plot([position(r) for r in evals], [100 * r["eval_task_accuracy"] for r in evals], "s--",
                       label="tasks (all test inputs right)")
        eval_axes.legend(loc="lower right")
    else:
        eval_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=eval_axes.transAxes)
    eval_axes.set_ylabel("exact match (%)")
    eval_axes.set_xlabel("epoch")
    eval_axes.set_ylim(-2, 102)
    eval_axes.grid(alpha=0.3)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------- signals

class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current batch; a second Ctrl-C
    stops at once (KeyboardInterrupt: exit 130 without saving). `announce`: print the notice (rank 0 only, so
    torchrun's N processes do not all say it)."""

    def __init__(self, announce: bool = True) -> None:
        self.signal_name: str | None = None
        self.announce = announce
        self.when = "after the current batch"
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal_name}: stopping {self.when} to save a checkpoint "
                  f"(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- the trainer

@dataclass
class LoopState:
    """Where the loop is and what it has summed so far: saved in every checkpoint for an exact resume."""
    epoch: int = 0
    batch: int = 0                 # next batch index within the epoch
    step: int = 0                  # optimizer steps taken
    epoch_seconds: float = 0.0     # training wall time of this epoch so far (no eval, no checkpoints)
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    epoch_tokens: int = 0
    log_loss_sum: float = 0.0
    log_batches: int = 0
    log_tokens: int = 0
    log_seconds: float = 0.0
    best_eval: float | None = None
    best_eval_epoch: float | None = None
    evals_since_best: int = 0
    last_eval: dict[str, Any] | None = None
    # "task_id/pair" of every sample trained this epoch, by all ranks (at a checkpoint, gathered to rank 0):
    # the epoch's metrics line counts them, so a shard that misses or repeats samples shows.
    epoch_samples: list[str] = field(default_factory=list)


class Trainer:
    """setup -> train (epochs of steps, evaluation, checkpoints) -> finish (final model, plot, summary)."""

    def __init__(self, args: argparse.Namespace, resume_from: Path | None, notes: list[str], started: float):
        self.args = args
        self.resume_from = resume_from
        self.notes = notes
        self.started = started
        self.deadline = started + args.time_budget if args.time_budget else None
        self.stop = StopRequest()
        self.loop = LoopState()
        self.timing = StepTimeModel()
        self.benchmark: dict[str, Any] | None = None
        self.save_seconds: float | None = None
        self.eval_seconds: float | None = None
        self.last_checkpoint: Path | None = None
        self.final_model: Path | None = None
        self._timed_steps = 0
        self._tick = time.perf_counter()
        self._pause_depth = 0
        self._recent_steps: deque[float] = deque(maxlen=WINDOW_STEPS)
        self._shown_loss: float | None = None
        self._bad_reason = "non-finite loss"
        self._check_every = 1           # optimizer steps between agreed stop checks (torchrun)
        self._next_check = 0
        self._group_token_ratio = 1.0   # all ranks' tokens / rank 0's, at the last log step (progress bar)

    # ---- setup

    def setup(self) -> None:
        args = self.args
        # Under torchrun: join the group; a CUDA device becomes cuda:LOCAL_RANK. Alone: a no-op context.
        self.ctx = DistributedContext.from_env(resolve_device(args.device))
        self.device = self.ctx.device
        self.stop.announce = self.ctx.is_main
        if self.ctx.is_distributed:
            self.stop.when = f"at the next step the processes agree on (within ~{STOP_CHECK_SECONDS:.0f} s)"
        self._group_token_ratio = float(self.ctx.world_size)
        if self.resume_from is not None:
            saved = checkpointing.read_meta(self.resume_from).get("world_size", 1)
            if saved != self.ctx.world_size:
                raise UserError(f"--resume {self.resume_from}: the run was trained by {saved} processes "
                                f"and this is {self.ctx.world_size}; the position in the epoch counts steps of "
                                f"{saved} batches, so resume with torchrun --nproc_per_node {saved}"
                                if saved > 1 else
                                f"--resume {self.resume_from}: the run was trained by one process and this is "
                                f"{self.ctx.world_size}; resume it without torchrun")
        self.precision = resolve_precision(self.device, args.precision)
        self.device_info = describe_device(self.device)
        self._setup_data()
        self._setup_epochs()
        self._setup_output()
        self._setup_model()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.ctx.is_main:
            self.metrics.path.write_text("")  # a new run starts a new metrics file
        self._init_accumulators()
        self.monitor = SlowdownMonitor(benchmark_cost_model(self.benchmark) if self.benchmark else None)
        self._print_banner()

    def close(self) -> None:
        """Leave the torchrun group (also after an error, so torchrun ends cleanly)."""
        if hasattr(self, "ctx"):
            self.ctx.cleanup()

    def _setup_data(self) -> None:
        args = self.args
        self.tasks, self.data = build_training_data(args)
        self.eval_tasks = []
        self.eval_description = None
        if args.eval_tasks:
            source = load_tasks(args.eval_data, None, args.strict) if args.eval_data else self.tasks
            self.eval_tasks = tasks_with_answers(source.tasks, args.eval_tasks)
            self.eval_description = source.description + ("" if args.eval_data else " (test inputs)")
            if not self.eval_tasks:
                raise UserError(f"{source.description}: no task with known test outputs to evaluate on; give "
                                f"--eval-data with solutions, or --eval-tasks 0")

    def _setup_epochs(self) -> None:
        args = self.args
        if args.throughput_json:
            result = throughput_report.load_result(args.throughput_json)
            current = speed_settings(args, self.device_info, self.precision.name, self.ctx.world_size)
            if args.epochs == "auto":
                epochs, max_batches, why = epochs_from_benchmark(result, args.throughput_json, args.time_budget,
                                                                 current, self._batches_per_epoch(0))
                args.epochs = epochs
                if max_batches is not None:
                    args.max_batches = min(max_batches, args.max_batches or max_batches)
                self.notes.append(why)
                self.benchmark = result
            elif not throughput_report.settings_mismatches(result["settings"], current):
                self.benchmark = result
            else:
                self.notes.append(f"{args.throughput_json} was measured with other settings; not comparing speeds")
        self.epochs = int(args.epochs)
        self.tokens_per_batch = sum(len(e) for e in self.data.encoded(0)) / self.data.num_batches(0)
        limit = args.max_batches or math.inf
        # Batches per process: one optimizer step trains one batch on each of the world_size processes.
        self.epoch_batches = [int(min(self._batches_per_epoch(e), limit)) for e in range(self.epochs)]
        # TrainStep accumulates across epoch boundaries, so the optimizer steps come from all batches together.
        self.total_steps = sum(self.epoch_batches) // args.grad_accum
        if self.total_steps == 0:
            raise UserError(f"--grad-accum {args.grad_accum} is more than the {sum(self.epoch_batches)} batches of "
                            f"this run: no optimizer step would happen")

    def _batches_per_epoch(self, epoch: int) -> int:
        """Batches each process trains in `epoch`: the epoch's batches / world_size, rounded up."""
        return distributed.steps_per_epoch(self.data.num_batches(epoch), self.ctx.world_size)

    def _setup_output(self) -> None:
        args = self.args
        if args.output_dir is None:  # rank 0's clock names the run (the ranks may start a second apart)
            args.output_dir = self.ctx.broadcast_object(str(RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S")))
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / checkpointing.CHECKPOINT_DIR
        if self.ctx.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"--output-dir {self.output_dir}: cannot create it ({err.strerror})") from None
            checkpointing.remove_stale_temporaries(self.checkpoint_dir)
        self.metrics = MetricsLog(self.output_dir / METRICS_FILE, enabled=self.ctx.is_main)
        self.plot_path = self.output_dir / PLOT_FILE

    def _setup_model(self) -> None:
        args = self.args
        parts = build_training_step(args, self.ctx, self.precision, self.total_steps, self.data)
        self.model, self.optimizer, self.scheduler, self.train_step = (
            parts.model, parts.optimizer, parts.scheduler, parts.step)
        self.compiled = parts.compiled
        self.parameters, self.trainable = count_parameters(self.model)
        # Before the first save is timed: weights + two AdamW moments of the trained part, ~150 MB/s disk.
        self.checkpoint_bytes = 12 * self.trainable
        self.model_bytes = 4 * self.parameters

    def _restore(self, path: Path) -> None:
        state, meta = checkpointing.load_checkpoint(path)
        checkpointing.load_model_state(self.model, state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        scheduler_state = dict(state["scheduler"])
        if "lr_lambdas" in scheduler_state:  # the schedule function is rebuilt from the (same) settings
            scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
        self.scheduler.load_state_dict(scheduler_state)
        self.train_step.load_state_dict(state["train_step"])
        for parameter, grad in zip(self.train_step.params, state.get("grads") or []):
            parameter.grad = None if grad is None else grad.to(self.device)  # mid-accumulation checkpoint
        checkpointing.restore_rng_state(state["rng"])
        self.loop = LoopState(**state["loop"])
        if not self.ctx.is_main:
            self.loop.epoch_samples = []  # rank 0 carries the samples trained before the checkpoint
        source = path.parent.parent / METRICS_FILE
        self.metrics.restore(source, self.loop.step)
        self.last_checkpoint = path
        self.notes.append(f"resumed from {path}: epoch {self.loop.epoch}, batch {self.loop.batch}, "
                          f"step {self.loop.step}")
        if self.loop.epoch >= self.epochs:
            self.notes.append(f"this run already finished its {self.epochs} epochs; give --epochs with more to "
                              f"train further")

    def _print_banner(self) -> None:
        args, info = self.args, self.device_info
        if self.device.type == "cuda":
            device = (f"{self.device} ({info['name']}, {info.get('total_memory_gb')} GB, compute capability "
                      f"{info.get('compute_capability')})")
        else:
            threads = info.get("threads")
            device = f"cpu ({info['name']}, {threads} thread{'' if threads == 1 else 's'})"
        scaler = " + GradScaler" if self.precision.use_grad_scaler else ""
        batch = (f"packed rows of {args.tokens_per_batch} tokens" if args.tokens_per_batch
                 else f"batch size {args.batch_size}")
        skipped = len(self.data.skipped(0))
        lines = [
            f"device: {device}; precision {self.precision.name}{scaler}"
            + (f"; memory capped at {args.gpu_memory:g} GiB (--gpu-memory)" if args.gpu_memory else ""),
            f"data: {self.tasks.description}; {len(self.data.encoded(0))} samples"
            + (f" ({skipped} too long for --max-length {args.max_length}, left out)" if skipped else "")
            + f"; {self.data.num_batches(0)} batches per epoch ({batch}"
            + (f", first {args.max_batches} used" if args.max_batches else "") + ")"
            + ("" if args.augment else "; no augmentation"),
            f"model: {args.model_name}, {self.parameters / 1e6:.1f}M parameters ({self.trainable / 1e6:.1f}M trained"
            + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") + ")"
            + ("; decoder blocks compiled (--compile: the first steps compile)" if self.compiled else "")
            + (f"; {recompute}" if (recompute := describe_long_batches(args, self.train_step, self.data)) else ""),
            f"schedule: {_plural(self.epochs, 'epoch')}, {sum(self.epoch_batches)} batches"
            + (" per process" if self.ctx.is_distributed else "") + f", {self.total_steps} "
            f"optimizer steps (grad accum {args.grad_accum}); lr {args.lr:g}, "
            f"{min(args.warmup_steps, self.total_steps)} warm-up steps then cosine to 0",
            "evaluation: " + (f"{len(self.eval_tasks)} tasks with known outputs from {self.eval_description}; greedy, "
                              f"{args.eval_attempts} attempt{'s' if args.eval_attempts > 1 else ''}, after each epoch"
                              + (f" and every {args.eval_every} steps" if args.eval_every else "")
                              + (f"; early stop after {args.early_stop} without improvement" if args.early_stop
                                 else "")
                              if self.eval_tasks else "off (--eval-tasks 0)"),
            f"output: {self.output_dir} (checkpoints each epoch"
            + (f" and every {args.save_every} steps" if args.save_every else "")
            + f", newest {args.keep_checkpoints} kept)",
        ]
        if self.ctx.is_distributed:
            world = self.ctx.world_size
            lines.insert(1, f"distributed: {world} processes (torchrun, {self.ctx.backend}; rank 0 on {self.device}); "
                            f"each optimizer step trains one batch on each, {world * args.grad_accum} batches in all, "
                            f"so an epoch's {self.data.num_batches(0)} batches take "
                            f"{self._batches_per_epoch(0)} per process")
        if self.deadline is not None:
            ends = datetime.now() + timedelta(seconds=self.deadline - time.monotonic())
            lines.append(f"time budget: {_clock(args.time_budget)}: stops with a checkpoint before "
                         f"{ends:%H:%M:%S}")
        self.ctx.print("\n".join(lines + self.notes))

    # ---- training

    def train(self) -> int:
        self.stop.install()
        try:
            outcome = self._run()
        finally:
            self.stop.restore()
        return self._finish(outcome)

    def _run(self) -> str:
        while self.loop.epoch < self.epochs:
            outcome = self._train_epoch()
            if outcome is not None:
                return outcome
            outcome = self._end_epoch()
            if outcome is not None:
                return outcome
        return "completed"

    def _train_epoch(self) -> str | None:
        """Run the rest of the current epoch; returns why it stopped early, or None."""
        loop, epoch = self.loop, self.loop.epoch
        total = self.epoch_batches[epoch]
        encoded = self.data.encoded(epoch)
        # This rank's batches (all of them with one process); the plan is the same on every rank.
        mine = distributed.shard_batch_plan(self.data.batch_plan(epoch), self.ctx.rank, self.ctx.world_size)[:total]
        tokens = [sum(len(encoded[i]) for i in indices) for indices in mine]
        remaining_tokens = sum(tokens[loop.batch:total])
        batches = (self.data.collate([encoded[i] for i in indices]) for indices in mine[loop.batch:])
        bar = EpochBar(total=total, initial=loop.batch, desc=f"Epoch {epoch} Training", dynamic_ncols=True,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr,
                       disable=not self.ctx.is_main)
        bar.stats = self._bar_stats()
        self._tick = time.perf_counter()
        try:
            while loop.batch < total:
                index = loop.batch
                batch = next(batches)
                shape = throughput_report.BatchShape(*batch.input_ids.shape, batch.num_tokens)
                loop.epoch_samples.extend(f"{task_id}/{pair}" for task_id, pair in batch.samples)
                try:
                    out = self.train_step(batch)
                except torch.OutOfMemoryError as exc:
                    raise UserError(oom_message(self.device, exc, peak_memory_bytes(self.device))) from None
                # Device-side bookkeeping only: no host sync here.
                self._log_loss += out.loss.float()
                self._epoch_loss += out.loss.float()
                nonfinite = ~torch.isfinite(out.loss)
                skipped = self.train_step.skipped_steps > self._skipped_before
                self._skipped_before = self.train_step.skipped_steps.clone()
                self._bad_run = (self._bad_run + 1) * (nonfinite | skipped)
                self._bad_total += nonfinite | skipped
                seconds = self._count_training_time()
                self._recent_steps.append(seconds)
                loop.batch += 1
                loop.epoch_batches += 1
                loop.log_batches += 1
                loop.epoch_tokens += out.num_tokens
                loop.log_tokens += out.num_tokens
                remaining_tokens -= tokens[index]
                if self._timed_steps > 0:  # the first step of a process is warm-up (allocator, kernels)
                    self.timing.add(tokens[index], seconds)
                    self.monitor.add(tokens[index], shape, seconds, self.timing)
                self._timed_steps += 1
                bar.eta_seconds = self.timing.predict(total - loop.batch, remaining_tokens)
                bar.stats = self._bar_stats()
                bar.update(1)
                if out.optimizer_stepped:
                    loop.step += 1
                    outcome = self._after_step(bar, total)
                    if outcome is not None:
                        return outcome
                elif self.stop and not self.ctx.is_distributed:  # torchrun: stop only where agreed
                    return self._stop_now("interrupted")
        finally:
            bar.close()
        return None

    def _after_step(self, bar: EpochBar, total: int) -> str | None:
        """Logging, checks, evaluation and checkpoints due after optimizer step `loop.step`."""
        args, loop = self.args, self.loop
        mid_epoch = loop.batch < total
        bad_limit = args.max_bad_steps if self.precision.use_grad_scaler else 1
        if loop.step % min(args.log_every, args.max_bad_steps) == 0:
            if self._bad_steps_now(bad_limit):
                return "non-finite"
        if loop.step % args.log_every == 0:
            self._log(bar)
        if mid_epoch and args.eval_every and loop.step % args.eval_every == 0:
            result = self._evaluate()
            if result is not None:
                self.metrics.write({"kind": "eval", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
                                    "batches": total, **result.metrics()})
                self._write(f"step {loop.step}: eval {result.describe()}")
                if self._early_stop_due():
                    return self._stop_now("early stop")
        reason = self._agreed_stop(force=False)
        if reason is not None:
            return self._stop_now(reason)
        if mid_epoch and args.save_every and loop.step % args.save_every == 0:
            if self._bad_steps_now(bad_limit):
                return "non-finite"
            self._save("step")
        return None

    def _agreed_stop(self, force: bool) -> str | None:
        """'interrupted' (Ctrl-C, SIGTERM) or 'time budget' when this process, or under torchrun any process,
        has to stop; else None.

        Alone, the flags are checked at every call. Under torchrun the processes agree with one host-side
        all-reduce, so they all stop after the same step: at `force`d points (epoch ends) and every
        `_check_every` optimizer steps, which rank 0 sets to about STOP_CHECK_SECONDS of training."""
        wants_stop, out_of_time = bool(self.stop), self._out_of_time()
        if self.ctx.is_distributed:
            if not force and self.loop.step < self._next_check:
                return None
            interval = self._check_interval() if self.ctx.is_main else 0
            stops, late, interval = self.ctx.all_reduce_sum([wants_stop, out_of_time, interval])
            self._check_every = max(1, int(interval))
            self._next_check = self.loop.step + self._check_every
            wants_stop, out_of_time = stops > 0, late > 0
            if wants_stop and not self.stop:
                self.stop.signal_name = "a signal to another process"
        return "interrupted" if wants_stop else "time budget" if out_of_time else None

    def _check_interval(self) -> int:
        """Optimizer steps in about STOP_CHECK_SECONDS, from the recent step times (rank 0's decides)."""
        if not self._recent_steps:
            return 1
        seconds_per_step = self.args.grad_accum * sum(self._recent_steps) / len(self._recent_steps)
        return int(min(1000, max(1, STOP_CHECK_SECONDS // max(seconds_per_step, 1e-6))))

    def _write(self, text: str) -> None:
        """A console line that does not break the progress bar (rank 0 only)."""
        if self.ctx.is_main:
            tqdm.write(text)

    def _count_training_time(self) -> float:
        """Add the wall time since the last tick to this epoch's training time; returns it."""
        now = time.perf_counter()
        seconds, self._tick = now - self._tick, now
        self.loop.epoch_seconds += seconds
        self.loop.log_seconds += seconds
        return seconds

    @contextmanager
    def _paused(self):
        """Evaluation, checkpoints and plots are not training time. The device is synchronised first so
        the queued steps are counted as training, not as the pause."""
        if self._pause_depth == 0:
            synchronize(self.device)  # host sync: before a pause only
            self._count_training_time()
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0:
                self._tick = time.perf_counter()

    def _init_accumulators(self) -> None:
        """Device-side sums (read back only at log steps, epoch ends and checkpoints)."""
        loop = self.loop
        self._log_loss = torch.tensor(loop.log_loss_sum, dtype=torch.float32, device=self.device)
        self._epoch_loss = torch.tensor(loop.epoch_loss_sum, dtype=torch.float32, device=self.device)
        self._bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self._skipped_before = self.train_step.skipped_steps.clone()

    def _bad_steps_now(self, limit: int) -> bool:
        """True when the run must stop for non-finite losses (reads two counters: a host sync point)."""
        run, total = int(self._bad_run.item()), int(self._bad_total.item())
        self._bad_total.zero_()
        bad = run >= limit or (limit == 1 and total > 0)
        if bad:
            self._bad_reason = (f"{run} optimizer steps in a row had a non-finite loss or gradient (the fp16 "
                                f"GradScaler skipped them)" if self.precision.use_grad_scaler else
                                f"the loss became non-finite (NaN/inf) in {self.precision.name}, which has no "
                                f"GradScaler to skip such steps")
        if self.ctx.any_true(bad):  # torchrun: every process stops when one must
            if not bad:
                self._bad_reason = "another process saw non-finite losses or gradients"
            return True
        return False

    def _bar_stats(self) -> str:
        loop = self.loop
        # All processes' tokens: rank 0's count scaled by the ratio measured at the last log step.
        rate = self._group_token_ratio * loop.epoch_tokens / loop.epoch_seconds if loop.epoch_seconds > 0 else 0.0
        loss = self._shown_loss
        return (f"loss: {loss:.4f}, " if loss is not None else "") + f"{rate:,.0f} tok/s"

    def _log(self, bar: EpochBar) -> None:
        loop = self.loop
        # host sync: once per log interval (and under torchrun one all-reduce of the loss, one of the counts)
        loss = self.ctx.all_reduce_mean(self._log_loss / max(1, loop.log_batches)).item()
        skipped = int(self.train_step.skipped_steps.item())
        log_tokens, epoch_tokens = self.ctx.all_reduce_sum([loop.log_tokens, loop.epoch_tokens])
        if loop.epoch_tokens:
            self._group_token_ratio = epoch_tokens / loop.epoch_tokens
        self._shown_loss = loss
        self.metrics.write({
            "kind": "step", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
            "batches": self.epoch_batches[loop.epoch], "loss": loss, "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": round(log_tokens / loop.log_seconds, 2) if loop.log_seconds > 0 else None,
            "epoch_seconds": round(loop.epoch_seconds, 3), "skipped_steps": skipped,
            "elapsed_seconds": round(time.monotonic() - self.started, 1)})
        self._log_loss.zero_()
        loop.log_batches = loop.log_tokens = 0
        loop.log_seconds = 0.0
        bar.stats = self._bar_stats()
        for warning in self.monitor.check():
            self._write(f"warning: {warning}")

    def _end_epoch(self) -> str | None:
        """Evaluate, write the epoch's metrics line, checkpoint, redraw the plot; returns a stop reason."""
        with self._paused():
            return self._end_epoch_now()

    def _end_epoch_now(self) -> str | None:
        loop, args = self.loop, self.args
        if self._bad_steps_now(args.max_bad_steps if self.precision.use_grad_scaler else 1):
            return "non-finite"
        loss = self.ctx.all_reduce_mean(self._epoch_loss / max(1, loop.epoch_batches)).item()  # host sync: per epoch
        epoch_tokens = self.ctx.all_reduce_sum(loop.epoch_tokens)
        trained = [key for part in self.ctx.gather_objects(loop.epoch_samples) for key in part]
        record = {"kind": "epoch", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
                  "batches": self.epoch_batches[loop.epoch], "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_second": round(epoch_tokens / loop.epoch_seconds, 2) if loop.epoch_seconds else None,
                  "epoch_seconds": round(loop.epoch_seconds, 3),
                  "skipped_steps": int(self.train_step.skipped_steps.item()),
                  # samples trained this epoch by all processes, and how many of them more than once
                  "samples": len(set(trained)), "samples_repeated": len(trained) - len(set(trained)),
                  "world_size": self.ctx.world_size}
        result = self._evaluate() if self.eval_tasks else None
        if result is not None:
            record.update(result.metrics())
        self.metrics.write(record)
        summary = (f"epoch {loop.epoch}: loss {loss:.4f}, {record['batches']} batches in "
                   f"{_clock(loop.epoch_seconds)} ({record['tokens_per_second'] or 0:,.0f} tok/s)")
        if result is not None:
            summary += f"; eval {result.describe()}"
        epochs_left = self.epochs - loop.epoch - 1
        if epochs_left:
            left = self.timing.predict(sum(self.epoch_batches[loop.epoch + 1:]),
                                       self._tokens_of_epochs(loop.epoch + 1))
            if left is not None:
                summary += f"; {epochs_left} more epoch{'s' if epochs_left > 1 else ''} ~{_clock(left)} of training"
        self.ctx.print(summary)
        loop.epoch += 1
        loop.batch = loop.epoch_batches = loop.epoch_tokens = 0
        loop.epoch_seconds = 0.0
        loop.epoch_loss_sum = 0.0
        loop.epoch_samples = []
        self._epoch_loss.zero_()
        self._save("epoch")
        self._plot()
        reason = self._agreed_stop(force=True)
        if reason == "interrupted":
            return reason
        if result is not None and self._early_stop_due():
            return "early stop"
        if loop.epoch < self.epochs and reason == "time budget":
            return reason
        return None

    def _tokens_of_epochs(self, first: int) -> int:
        """Real tokens still to train in epochs `first`.. (estimated from epoch 0's batches: same data)."""
        return int(self.tokens_per_batch * sum(self.epoch_batches[first:]))

    # ---- evaluation

    def _evaluate(self) -> EvalResult | None:
        """Exact-match evaluation (None when skipped for the time budget or interrupted part-way)."""
        with self._paused():
            return self._evaluate_now()

    def _evaluate_now(self) -> EvalResult | None:
        args = self.args
        if self.deadline is not None and self.eval_seconds is not None:
            left = self.deadline - time.monotonic() - self._reserve_seconds()
            if self.ctx.any_true(left < 1.2 * self.eval_seconds):  # torchrun: all skip if one must
                self._write(f"skipping evaluation: the last one took {self.eval_seconds:.0f} s and the time budget "
                            f"has {max(0.0, left):.0f} s to spare")
                return None
        total = len(self.eval_tasks)
        # Under torchrun each process decodes every world_size-th task; the results are gathered below.
        share = distributed.shard_items(self.eval_tasks, self.ctx)
        bar = tqdm(total=sum(len(t.test) for t in share), desc=f"Epoch {self.loop.epoch} Evaluation",
                   unit="input", leave=False, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   disable=not self.ctx.is_main)
        try:
            result = evaluate(self.model, share, max_length=args.max_length, precision=self.precision,
                              device=self.device, attempts=args.eval_attempts, seed=args.seed,
                              batch_size=args.eval_batch_size,
                              should_stop=lambda: bool(self.stop) or self._out_of_time(),
                              progress=lambda done, n: bar.update(1))
        except torch.OutOfMemoryError as exc:
            message = oom_message(self.device, exc, peak_memory_bytes(self.device))
            raise UserError(f"during evaluation (--eval-batch-size {args.eval_batch_size}: lower it first): "
                            f"{message}") from None
        finally:
            bar.close()
        parts = self.ctx.gather_objects(result)
        result = None if any(part is None for part in parts) else merge_results(parts)
        if result is None:
            self._write(f"evaluation of {total} tasks stopped part-way; not recorded")
            return None
        self.eval_seconds = result.seconds
        loop = self.loop
        loop.last_eval = {"epoch": loop.epoch, "step": loop.step, **result.metrics()}
        if loop.best_eval is None or result.accuracy > loop.best_eval:
            loop.best_eval = result.accuracy
            loop.best_eval_epoch = loop.epoch + loop.batch / max(1, self.epoch_batches[loop.epoch])
            loop.evals_since_best = 0
        else:
            loop.evals_since_best += 1
        return result

    def _early_stop_due(self) -> bool:
        return bool(self.args.early_stop) and self.loop.evals_since_best >= self.args.early_stop

    # ---- time budget

    def _reserve_seconds(self) -> float:
        """Time to keep in hand: the next step (twice the slowest recent one), a checkpoint, the final model."""
        recent = max(self._recent_steps, default=0.0)
        save = self.save_seconds if self.save_seconds is not None else 1 + self.checkpoint_bytes / 150e6
        final = (self.save_seconds * self.model_bytes / max(1, self.checkpoint_bytes)
                 if self.save_seconds is not None else 1 + self.model_bytes / 150e6)
        # Under torchrun the stop is only agreed every `_check_every` optimizer steps: keep those in hand too.
        batches = self._check_every * self.args.grad_accum if self.ctx.is_distributed else 1
        return (1 + batches) * recent + 1.5 * save + 1.5 * final + 5

    def _out_of_time(self) -> bool:
        return self.deadline is not None and self.deadline - time.monotonic() < self._reserve_seconds()

    # ---- checkpoints and the end

    def _stop_now(self, outcome: str) -> str:
        """Checkpoint and stop, unless the weights are already non-finite (then keep the last good one)."""
        if self._bad_steps_now(self.args.max_bad_steps if self.precision.use_grad_scaler else 1):
            return "non-finite"
        self._save(outcome)
        return outcome

    def _save(self, reason: str) -> None:
        """Checkpoint the exact state at the current batch boundary (atomically; timed for the budget)."""
        with self._paused():
            self._save_now(reason)

    def _save_now(self, reason: str) -> None:
        start = time.perf_counter()
        loop, ctx = self.loop, self.ctx
        loop.log_loss_sum = float(self._log_loss.item())      # host sync: checkpoint time only
        loop.epoch_loss_sum = float(self._epoch_loss.item())
        saved_loop = asdict(loop)
        grads = [p.grad for p in self.train_step.params]
        # Gradients only exist between optimizer steps of a gradient accumulation.
        has_grads = any(g is not None for g in grads)
        if ctx.is_distributed:
            # Every rank resumes from rank 0's file, so it holds the ranks' mean of what differs between them.
            # Exact, because the sums are linear: each rank's epoch loss sum (or partial gradient) goes into a
            # mean over ranks at the epoch's end (the next all-reduce), and mean(a_r + b_r) = mean(a) + mean(b).
            log_loss, epoch_loss, log_tokens, epoch_tokens = ctx.all_reduce_mean(
                [loop.log_loss_sum, loop.epoch_loss_sum, loop.log_tokens, loop.epoch_tokens])
            saved_loop.update(log_loss_sum=log_loss, epoch_loss_sum=epoch_loss, log_tokens=round(log_tokens),
                              epoch_tokens=round(epoch_tokens),
                              epoch_samples=[k for part in ctx.gather_objects(loop.epoch_samples) for k in part])
            if has_grads:
                grads = [None if g is None else ctx.all_reduce_mean(g).cpu() for g in grads]
        if ctx.is_main:
            state = {
                "model": checkpointing.model_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "train_step": self.train_step.state_dict(),
                "rng": checkpointing.capture_rng_state(),
                "loop": saved_loop,
                "grads": grads if has_grads else None,
            }
            meta = {"step": loop.step, "epoch": loop.epoch, "batch": loop.batch, "reason": reason,
                    "saved_at": datetime.now().isoformat(timespec="seconds"), "epochs": self.epochs,
                    "args": jsonable(vars(self.args)), "model_config": self.model.config.to_dict(),
                    "vocabulary": list(SYMBOLS), "device": self.device_info, "precision": self.precision.name,
                    "last_eval": loop.last_eval, "world_size": ctx.world_size}
            checkpointing.save_checkpoint(self.checkpoint_dir, loop.step, state, meta, self.args.keep_checkpoints)
        ctx.barrier()  # the others wait for rank 0's file (a resume or the next save may need it)
        self.last_checkpoint = self.checkpoint_dir / checkpointing.checkpoint_name(loop.step)
        self.save_seconds = time.perf_counter() - start

    def _plot(self) -> None:
        if not self.ctx.is_main:
            return
        with self._paused():
            plot_metrics(self.metrics.records(), self.plot_path)

    def _finish(self, outcome: str) -> int:
        args, loop = self.args, self.loop
        if outcome in ("completed", "time budget", "early stop"):
            run_settings = {"args": jsonable(vars(args)), "epochs_done": loop.epoch, "step": loop.step,
                            "outcome": outcome, "last_eval": loop.last_eval, "best_eval": loop.best_eval,
                            "precision": self.precision.name, "device": self.device_info,
                            "world_size": self.ctx.world_size}
            if self.ctx.is_main:
                self.final_model = save_model(self.model, self.output_dir / MODEL_DIR, run_settings)
            self.ctx.barrier()
        self._plot()
        elapsed = _clock(time.monotonic() - self.started)
        done = f"{loop.epoch} of {self.epochs} epochs" + (f" + {loop.batch} batches" if loop.batch else "")
        headline = {
            "completed": f"Training finished: {done}, {loop.step} steps in {elapsed}.",
            "time budget": f"Stopped for the time budget ({_clock(args.time_budget or 0)}): {done}, {loop.step} steps "
                           f"in {elapsed}.",
            "early stop": f"Stopped early: {args.early_stop} evaluations without improvement; {done}, {loop.step} "
                          f"steps in {elapsed}.",
            "interrupted": f"Interrupted ({self.stop.signal_name}): {done}, {loop.step} steps in {elapsed}.",
            "non-finite": f"Stopped at step {loop.step}: {self._bad_reason}.",
        }[outcome]
        lines = [headline, f"  metrics      {self.metrics.path}"]
        if self.plot_path.is_file():
            lines.append(f"  plot         {self.plot_path}")
        if self.last_checkpoint is not None:
            lines.append(f"  checkpoint   {self.last_checkpoint}")
        if self.final_model is not None:
            lines.append(f"  final model  {self.final_model} (model.load_saved_model, or transformers "
                         f"from_pretrained)")
        if loop.last_eval is not None:
            best = (f"; best {loop.best_eval:.1%} after {loop.best_eval_epoch:.2f} epochs of training"
                    if loop.best_eval is not None else "")
            lines.append(f"  last eval    {loop.last_eval['eval_accuracy']:.1%} of test inputs, "
                         f"{loop.last_eval['eval_task_accuracy']:.1%} of tasks (epoch {loop.last_eval['epoch']}, "
                         f"step {loop.last_eval['step']}){best}")
        resume = shlex.join([*shlex.split(self._launcher()), "--resume", str(self.output_dir),
                             *model_source_flags(args)])
        if outcome == "non-finite":
            again = shlex.join(["--resume", str(self.last_checkpoint), *model_source_flags(args)])
            retry = (f"retry from the last good checkpoint with other numerics ({again} --precision bf16 or "
                     f"fp32), or " if self.last_checkpoint is not None else "")
            lines.append(f"  the weights after step {loop.step} are not saved; {retry}start a new run with a smaller "
                         f"--lr (now {args.lr:g})")
            self.ctx.print("\n".join(lines))
            self.ctx.print(f"error: {lines[0]}", file=sys.stderr)
            return 1
        if outcome in ("interrupted", "time budget") or (outcome == "early stop" and loop.epoch < self.epochs):
            lines.append(f"  resume with  {resume}")
        self.ctx.print("\n".join(lines))
        return EXIT_INTERRUPTED if outcome == "interrupted" else 0


    def _launcher(self) -> str:
        """How this run was started, for the resume command: the same number of torchrun processes."""
        if not self.ctx.is_distributed:
            return SCRIPT
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.ctx.world_size))
        nodes = "" if per_node == self.ctx.world_size else f" --nnodes {self.ctx.world_size // per_node} ..."
        return f"torchrun{nodes} --nproc_per_node {per_node} trainloop_gpu_finetuned.py"


# ------------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args, explicit = parse_args(argv)
    resume_from, notes = None, []
    if args.resume is not None:
        resume_from = checkpointing.resolve_resume_path(args.resume or None, args.output_dir, RUNS_DIR)
        notes += merge_resumed_args(args, explicit, checkpointing.read_meta(resume_from)["args"])
        if "output_dir" not in explicit:
            args.output_dir = str(resume_from.parent.parent)
    problems = validate_args(args)
    if problems:
        raise UserError("; ".join(problems))
    trainer = Trainer(args, resume_from, notes, started)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    run_cli(main)
