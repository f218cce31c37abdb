"""Fine-tune a Qwen model on ARC-AGI tasks, for hours on one GPU, with a loop you can leave running and trust.

    # the guide's smoke test, then a real run
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
evaluates exact-match accuracy on held-out test inputs (greedy decoding; pass@2 with --eval-attempts 2;
with --eval-views K also the pass@2 voted over K augmented views, the ARC winners' way),
appends to metrics.jsonl (and with --report-to tensorboard to event files in <output-dir>/tensorboard/),
checkpoints atomically, and redraws training_curves.png (at most once a minute). At the end it saves the
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
Stopping is agreed: every process checks at the same optimizer steps (about every 2 s of training) whether
any of them got a signal or ran out of time, so they all stop after the same step and rank 0 saves.

How it is built: `train()` reads top to bottom. run_plan.py fixes the run's shape once (epochs, batches,
steps, output folder, evaluation); stopping.py holds the stop rules; run_monitor.py the ETA, warnings,
progress bar and metrics; `TrainLoop` below runs the epochs, evaluates and checkpoints.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while torch loads is "interrupted", exit 130
    from errors import quiet_interrupts
    quiet_interrupts()

import argparse
import os
import shlex
import sys
import time
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

import checkpointing
import distributed
import run_lock
import throughput_report
from atomic_io import write_text_atomic
from arc_dataset import SYMBOLS
from cli_common import (DEFAULT_MODEL, Parser, add_run_args, add_shared_args, duration_arg, jsonable, launcher,
                        non_negative_int, positive_int, speed_settings, validate_shared_args)
from distributed import DistributedContext
from errors import EXIT_INTERRUPTED, UserError, printable, run_cli
from evaluation import EvalResult, evaluate, merge_results
from model import count_parameters, save_model
from run_budget import PLOT_EVERY_SECONDS, MeasuredRun, format_comparison, format_plan, run_record
from run_monitor import (REPORT_TO, EpochBar, MetricsLog, SlowdownMonitor, StepTimeModel, clock, plot_metrics,
                         report_to_problems)
from run_plan import (METRICS_FILE, MODEL_DIR, PLAN_FIELDS, RUNS_DIR, RunPlan, benchmark_cost_model, make_plan,
                      plan_evaluation, plural, read_benchmark)
from run_setup import TrainingParts, build_training_data, build_training_step, describe_long_batches
from stopping import STOP_CHECK_SECONDS, NonFiniteGuard, StopRequest, StopRules, early_stop_due
from training import (describe_device, describe_schedule, load_optimizer_state, out_of_memory_as_user_error,
                      resolve_device, resolve_precision, synchronize)

SCRIPT = "trainloop_gpu_finetuned.py"

# Settings that decide what the model computes; `--resume` continues exactly, so these cannot change.
TRAJECTORY_ARGS = ("model_name", "random_init", "lora_rank", "data", "solutions", "max_length", "batch_size",
                   "tokens_per_batch", "augment", "seed", "lr", "weight_decay", "grad_accum", "max_grad_norm",
                   "warmup_steps")
# Settings that decide what code runs and which weights load. A checkpoint is untrusted input, so these come from
# the command line only: a resume never takes them from meta.json, and refuses when the checkpoint's differ.
MODEL_SOURCE_ARGS = ("model_name", "random_init", "trust_remote_code")
# Saved flags whose value is not their text: how a resume reads meta.json's value back to check it.
SAVED_FORMS = {"time_budget": lambda seconds: duration_arg(f"{seconds}s")}


# --------------------------------------------------------------------------------------------- arguments

def epochs_arg(text: str) -> int | str:
    """argparse type: a whole number of epochs >= 1, or 'auto'."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_shared_args(parser)
    add_run_args(parser)
    run = parser.add_argument_group("training run")
    run.add_argument("--epochs", type=epochs_arg, default=1,
                     help="epochs to train, or 'auto': the most that --time-budget allows according to "
                          "--throughput-json (measure_throughput.py --json)")
    run.add_argument("--max-batches", type=positive_int, default=None,
                     help="stop each epoch after this many batches (smoke test: --epochs 1 --max-batches 100); "
                          "under torchrun, per process: each step trains one batch on each")
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
    run.add_argument("--log-every", type=positive_int, default=50,
                     help="optimizer steps between metrics.jsonl lines (the loss is read from the device "
                          "only then)")
    run.add_argument("--max-bad-steps", type=positive_int, default=20,
                     help="stop after this many optimizer steps in a row with a non-finite loss or gradient "
                          "(fp16: skipped by the GradScaler; without the scaler the first one stops the run)")
    run.add_argument("--report-to", choices=REPORT_TO, default="none",
                     help="also write metrics.jsonl's numbers (loss, lr, tokens/s, epoch time, eval accuracies) "
                          "as TensorBoard event files in <output-dir>/tensorboard/ (view them with "
                          "tensorboard --logdir runs/)")
    run.add_argument("--early-stop", type=non_negative_int, default=0,
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
    problems += report_to_problems(getattr(args, "report_to", "none"))
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


def merge_resumed_args(args: argparse.Namespace, explicit: set[str], saved: dict[str, Any]
                       ) -> tuple[argparse.Namespace, list[str]]:
    """The run's settings: the resumed run's for every flag not given now, the command line's for the rest
    (`args` itself is left as given). Refuses changes that would make the continuation inexact; the notes
    say what else changed (e.g. a stretched schedule).

    The model's source (MODEL_SOURCE_ARGS) is never taken from the checkpoint: a tampered meta.json must not
    be able to turn on remote code or swap the weights. A checkpoint of another model is refused instead."""
    check_model_source(args, saved)
    conflicts = [f"--{key.replace('_', '-')} {getattr(args, key)!r} (run: {saved[key]!r})"
                 for key in TRAJECTORY_ARGS if key in explicit and key in saved and getattr(args, key) != saved[key]]
    if conflicts:
        raise UserError(f"--resume continues a run exactly, so its settings cannot change: {'; '.join(conflicts)}; "
                        f"start a new run (without --resume) to use them")
    notes = []
    for key in PLAN_FIELDS:
        if key in explicit and key in saved and getattr(args, key) != saved[key]:
            notes.append(f"--{key.replace('_', '-')} changed from {saved[key]} to {getattr(args, key)}: the "
                         f"learning-rate schedule is stretched to the new length from here on")
    merged = argparse.Namespace(**vars(args))
    for key, value in saved.items():
        if (key not in explicit and key not in ("resume", "output_dir") and key not in MODEL_SOURCE_ARGS
                and hasattr(merged, key)):
            setattr(merged, key, value)
    if "throughput_json" not in explicit and merged.throughput_json and not Path(merged.throughput_json).is_file():
        merged.throughput_json = None  # only used to compare speeds once the epoch count is fixed
    return merged, notes


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


def resumed_settings(meta: dict[str, Any], where: str = "checkpoint meta.json") -> dict[str, Any]:
    """A checkpoint's run settings: its flags, with the plan's epoch count and batch limit (what --epochs auto
    resolved to) in place of the flags that chose them. The plan's values are untrusted: each must be one a
    plan could hold (a whole number of epochs >= 1; a batch limit >= 1 or null), else one line naming it."""
    plan = meta.get("plan") or {}
    for key in PLAN_FIELDS:
        value = plan.get(key)
        if key in plan and not ((type(value) is int and value >= 1) or (key == "max_batches" and value is None)):
            raise UserError(f"{where}: field 'plan.{key}' is {printable(repr(value))[:60]}, not "
                            + ("a whole number of epochs >= 1" if key == "epochs" else "null or a number >= 1"))
    return {**meta["args"], **{key: plan[key] for key in PLAN_FIELDS if key in plan}}


def read_resumed_settings(resume_from: Path) -> dict[str, Any]:
    """The run settings of checkpoint `resume_from`, checked: meta.json's fields (checkpointing.read_meta),
    each saved flag against this trainer's parser (checkpointing.validate_saved_args) and the plan."""
    meta = checkpointing.read_meta(resume_from)
    saved = checkpointing.validate_saved_args(resume_from, meta["args"], build_parser(), SAVED_FORMS)
    return resumed_settings({**meta, "args": saved}, f"checkpoint {resume_from / checkpointing.META_FILE}")


# ------------------------------------------------------------------------------------------------- setup

def join_group(args: argparse.Namespace, resume_from: Path | None) -> DistributedContext:
    """Under torchrun: join the group (a CUDA device becomes cuda:LOCAL_RANK). Alone: a no-op context. A resume
    needs as many processes as the run had."""
    ctx = DistributedContext.from_env(resolve_device(args.device))
    if resume_from is not None:
        saved = checkpointing.read_meta(resume_from).get("world_size", 1)
        if saved != ctx.world_size:
            ctx.cleanup()
            raise UserError(f"--resume {resume_from}: the run was trained by {saved} processes "
                            f"and this is {ctx.world_size}; the position in the epoch counts steps of "
                            f"{saved} batches, so resume with torchrun --nproc_per_node {saved}"
                            if saved > 1 else
                            f"--resume {resume_from}: the run was trained by one process and this is "
                            f"{ctx.world_size}; resume it without torchrun")
    return ctx


@dataclass
class RunOutput:
    """The output folder's metrics log, its lock (held by rank 0 until the run ends) and the run's id."""
    metrics: MetricsLog
    lock: run_lock.OutputLock | None = None
    run_id: str | None = None


def prepare_output(plan: RunPlan, ctx: DistributedContext, resume_from: Path | None,
                   report_to: str = "none") -> RunOutput:
    """Take the output folder for this run (rank 0): create it, lock it against a second trainer, refuse it
    when it holds another run, record the run's id, clear a crashed save's leftovers, and start metrics.jsonl
    afresh for a new run. The lock comes before the leftovers are cleared, or a second trainer would delete
    the first one's half-written checkpoint; the run check before metrics.jsonl is emptied or restored."""
    output = RunOutput(MetricsLog(plan.metrics_path, enabled=ctx.is_main, report_to=report_to))
    if not ctx.is_main:
        return output
    folder = plan.output_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-dir {folder}: cannot create it ({err.strerror})") from None
    if not folder.is_dir():
        raise UserError(f"--output-dir {folder}: not a folder")
    output.lock = run_lock.lock_output_dir(folder)
    try:
        if output.lock.note:
            ctx.print(f"warning: {output.lock.note}", file=sys.stderr)
        output.run_id = run_identity(folder, resume_from)
        run_lock.write_run_identity(folder, output.run_id)
        checkpointing.remove_stale_temporaries(plan.checkpoint_dir)
        if resume_from is None:
            write_text_atomic(plan.metrics_path, "", what="the metrics")  # a new run starts a new metrics file
    except BaseException:
        output.lock.release()
        raise
    return output


def run_identity(folder: Path, resume_from: Path | None) -> str:
    """The run's id (run_lock): a new one for a new run, the checkpoint's on a resume. Refuses a folder that
    holds another run (`--resume A --output-dir B`), before anything there is emptied or replaced. In the
    checkpoint's own run folder only differing recorded ids refuse: a checkpoint from before run ids, or a
    folder copied without its run.json, is at home where it lies."""
    run_id = None if resume_from is None else checkpointing.read_meta(resume_from).get("run_id")
    recorded = run_lock.read_run_id(folder)
    if resume_from is not None and _same_folder(resume_from.parent.parent, folder):
        if run_id is not None and recorded is not None and run_id != recorded:
            run_lock.check_same_run(folder, run_id, resuming=True)
        return run_id or recorded or run_lock.new_run_id()
    run_id = run_id or run_lock.new_run_id()  # elsewhere a checkpoint without an id is another run's
    run_lock.check_same_run(folder, run_id, resuming=resume_from is not None)
    return run_id


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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


def restore(path: Path, parts: TrainingParts, ctx: DistributedContext, metrics: MetricsLog) -> LoopState:
    """Load a checkpoint into the model, optimizer, schedule, step and RNG; returns where the loop was. The
    metrics log restarts from the run's lines up to the checkpoint (later ones are redone). The checkpoint is
    untrusted: its loop fields, optimizer groups and gradients are checked against this run's first."""
    state, _ = checkpointing.load_checkpoint(path, typing.get_type_hints(LoopState), parts.optimizer,
                                             parts.step.params)
    checkpointing.load_model_state(parts.model, state["model"])
    load_optimizer_state(parts.optimizer, state["optimizer"])
    scheduler_state = dict(state["scheduler"])
    if "lr_lambdas" in scheduler_state:  # the schedule function is rebuilt from the (same) settings
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
    parts.scheduler.load_state_dict(scheduler_state)
    parts.step.load_state_dict(state["train_step"])
    for parameter, grad in zip(parts.step.params, state.get("grads") or []):
        parameter.grad = None if grad is None else grad.to(ctx.device)  # mid-accumulation checkpoint
    checkpointing.restore_rng_state(state["rng"])
    loop = LoopState(**state["loop"])
    if not ctx.is_main:
        loop.epoch_samples = []  # rank 0 carries the samples trained before the checkpoint
    metrics.restore(path.parent.parent / METRICS_FILE, loop.step)
    return loop


@dataclass(frozen=True)
class RunInfo:
    """What the banner, the checkpoints and the summary say about the run besides the plan."""
    args: argparse.Namespace       # the run's settings (the command line merged with a resumed run's)
    device_info: dict[str, Any]
    precision: Any                 # training.Precision
    tasks_description: str
    started: float                 # time.monotonic() at start
    run_id: str | None = None      # run_lock: the id in the output folder's run.json and every checkpoint
    process_started: float | None = None   # time.monotonic() when the process started (run_costs)
    whole_run: Any = None          # run_budget.RunPlan from the benchmark (None: no plan applies)
    margin: float | None = None    # the plan's margin


# ------------------------------------------------------------------------------------------------- train

def train(args: argparse.Namespace, resume_from: Path | None, notes: list[str], started: float) -> int:
    """Set up (each step returns what it builds), train, finish; returns the exit code."""
    import run_costs

    process_started = run_costs.process_start_time()   # the run's clock starts with the process, imports included
    ctx = join_group(args, resume_from)
    output = None
    try:
        precision = resolve_precision(ctx.device, args.precision)
        device_info = describe_device(ctx.device)
        tasks, data = build_training_data(args)
        evaluation = plan_evaluation(args, tasks)
        current = speed_settings(args, device_info, precision.name, ctx.world_size)
        batches_per_epoch = distributed.steps_per_epoch(data.num_batches(0), ctx.world_size)
        reading = read_benchmark(args, current, batches_per_epoch, evaluation, resuming=resume_from is not None)
        benchmark, epochs, max_batches = reading.result, reading.epochs, reading.max_batches
        plan = make_plan(args, data, ctx, epochs, max_batches, evaluation, resume_from, started)
        output = prepare_output(plan, ctx, resume_from, args.report_to)
        metrics = output.metrics
        parts = build_training_step(args, ctx, precision, plan.total_steps, data)
        info = RunInfo(args, device_info, precision, tasks.description, started, output.run_id, process_started,
                       reading.whole_run, reading.margin)
        notes = notes + list(reading.notes)
        if resume_from is not None:
            state = restore(resume_from, parts, ctx, metrics)
            notes.append(f"resumed from {resume_from}: epoch {state.epoch}, batch {state.batch}, step {state.step}")
            if state.epoch >= plan.epochs:
                notes.append(f"this run already finished its {plan.epochs} epochs; give --epochs with more to "
                             f"train further")
        else:
            state = LoopState()
        parameters, trainable = count_parameters(parts.model)
        # Before the first save is timed: weights + two AdamW moments of the trained part, ~150 MB/s disk.
        stops = StopRules(ctx, plan.deadline, args.grad_accum, checkpoint_bytes=12 * trainable,
                          model_bytes=4 * parameters)
        guard = NonFiniteGuard(ctx, ctx.device, parts.step.skipped_steps, precision.use_grad_scaler,
                               args.max_bad_steps, precision.name)
        monitor = SlowdownMonitor(benchmark_cost_model(benchmark) if benchmark else None, ctx.device.type)
        ctx.print("\n".join(banner(info, plan, parts, data, ctx, parameters, trainable) + notes))
        loop = TrainLoop(info, plan, parts, data, ctx, state, metrics, stops, guard, monitor,
                         last_checkpoint=resume_from)
        when = (f"at the next step the processes agree on (within ~{STOP_CHECK_SECONDS:.0f} s)"
                if ctx.is_distributed else "after the current batch")
        with StopRequest(announce=ctx.is_main, when=when) as stop:
            outcome = loop.run(stop)
        final_model = None
        if outcome in ("completed", "time budget", "early stop"):
            final_model = loop.save_final_model(outcome)
        loop.plot()
        measured = loop.measured_run()
        loop.metrics.write(run_record(measured, info.whole_run, args.time_budget))  # the last line of metrics.jsonl
        return finish(info, plan, loop, outcome, final_model, measured)
    finally:
        if output is not None:
            output.metrics.close()  # flushes TensorBoard's events, also after an error
        if output is not None and output.lock is not None:
            output.lock.release()  # the kernel would drop it at exit anyway; in-process callers run on
        ctx.cleanup()  # leave the torchrun group, also after an error, so torchrun ends cleanly


def banner(info: RunInfo, plan: RunPlan, parts: TrainingParts, data: Any, ctx: DistributedContext,
           parameters: int, trainable: int) -> list[str]:
    """What the run will do, before it starts (the effective batch, the schedule, evaluation, output)."""
    args, device_info, precision = info.args, info.device_info, info.precision
    if ctx.device.type == "cuda":
        device = (f"{ctx.device} ({device_info['name']}, {device_info.get('total_memory_gb')} GB, compute capability "
                  f"{device_info.get('compute_capability')})")
    else:
        threads = device_info.get("threads")
        device = f"cpu ({device_info['name']}, {threads} thread{'' if threads == 1 else 's'})"
    scaler = " + GradScaler" if precision.use_grad_scaler else ""
    batch = (f"packed rows of {args.tokens_per_batch} tokens" if args.tokens_per_batch
             else f"batch size {args.batch_size}")
    skipped = len(data.skipped(0))
    evaluation = plan.evaluation
    recompute = describe_long_batches(args, parts.step, data)
    lines = [
        f"device: {device}; precision {precision.name}{scaler}"
        + (f"; memory capped at {args.gpu_memory:g} GiB (--gpu-memory)" if args.gpu_memory else ""),
        f"data: {info.tasks_description}; {len(data.encoded(0))} samples"
        + (f" ({skipped} too long for --max-length {args.max_length}, left out)" if skipped else "")
        + f"; {data.num_batches(0)} batches per epoch ({batch}"
        + (f", first {plan.max_batches} used" if plan.max_batches else "") + ")"
        + ("" if args.augment else "; no augmentation"),
        f"model: {args.model_name}, {parameters / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trained"
        + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") + ")"
        + ("; decoder blocks compiled (--compile: the first steps compile)" if parts.compiled else "")
        + (f"; {recompute}" if recompute else ""),
        f"schedule: {plural(plan.epochs, 'epoch')}, {sum(plan.epoch_batches)} batches"
        + (" per process" if ctx.is_distributed else "") + f", {plan.total_steps} "
        f"optimizer steps (grad accum {args.grad_accum}); "
        + describe_schedule(args.lr, plan.total_steps, args.warmup_steps),
        "evaluation: " + (f"{len(evaluation.tasks)} tasks with known outputs from {evaluation.description}; greedy, "
                          f"{plural(evaluation.attempts, 'attempt')}"
                          + (f", and pass@2 voted over {evaluation.views} augmented views ({evaluation.score})"
                             if evaluation.views > 1 else "") + ", after each epoch"
                          + (f" and every {evaluation.every} steps" if evaluation.every else "")
                          + (f"; early stop after {evaluation.early_stop} without improvement"
                             if evaluation.early_stop else "")
                          if evaluation else "off (--eval-tasks 0)"),
        f"output: {plan.output_dir} (checkpoints each epoch"
        + (f" and every {args.save_every} steps" if args.save_every else "")
        + f", newest {args.keep_checkpoints} kept)",
    ]
    if ctx.is_distributed:
        world = ctx.world_size
        lines.insert(1, f"distributed: {world} processes (torchrun, {ctx.backend}; rank 0 on {ctx.device}); "
                        f"each optimizer step trains one batch on each, {world * args.grad_accum} batches in all, "
                        f"so an epoch's {data.num_batches(0)} batches take "
                        f"{distributed.steps_per_epoch(data.num_batches(0), world)} per process")
    if info.whole_run is not None:
        lines.append(f"plan: {format_plan(info.whole_run, info.margin)} (from --throughput-json; the run "
                     f"reports against it at the end)")
    if plan.deadline is not None:
        ends = datetime.now() + timedelta(seconds=plan.deadline - time.monotonic())
        lines.append(f"time budget: {clock(args.time_budget)}: stops with a checkpoint before {ends:%H:%M:%S}")
    return lines


# -------------------------------------------------------------------------------------------- the loop

class TrainLoop:
    """Epochs of steps, with logging, evaluation and checkpoints at their points; returns why it stopped.

    The state that a resume restores is `state` (LoopState) plus the device-side loss sums; the stop rules,
    the non-finite guard and the monitor are their own objects. Evaluation, checkpoints and plots run inside
    `paused()`, which keeps their time out of the epoch's training time."""

    def __init__(self, info: RunInfo, plan: RunPlan, parts: TrainingParts, data: Any, ctx: DistributedContext,
                 state: LoopState, metrics: MetricsLog, stops: StopRules, guard: NonFiniteGuard,
                 monitor: SlowdownMonitor, last_checkpoint: Path | None = None) -> None:
        self.info, self.args, self.plan, self.parts, self.data, self.ctx = info, info.args, plan, parts, data, ctx
        self.state, self.metrics, self.stops, self.guard, self.monitor = state, metrics, stops, guard, monitor
        self.stop = StopRequest(announce=False)
        self.timing = StepTimeModel()
        self.last_checkpoint = last_checkpoint
        self.device = ctx.device
        # Device-side sums (read back only at log steps, epoch ends and checkpoints).
        self.log_loss = torch.tensor(state.log_loss_sum, dtype=torch.float32, device=self.device)
        self.epoch_loss = torch.tensor(state.epoch_loss_sum, dtype=torch.float32, device=self.device)
        self.timed_steps = 0
        self.spent = MeasuredRun()        # seconds per part of the run, for the end-of-run comparison
        self.last_plot = time.monotonic()  # the plot is redrawn PLOT_EVERY_SECONDS apart (and at the end)
        self.first_step_at: float | None = None   # time.monotonic() when the first step began
        self.tick = time.perf_counter()
        self.pause_depth = 0
        self.shown_loss: float | None = None
        self.group_token_ratio = float(ctx.world_size)  # all ranks' tokens / rank 0's (progress bar)

    def run(self, stop: StopRequest) -> str:
        """Train the epochs left; `stop` is the signal handler installed for the run."""
        self.stop = stop
        while self.state.epoch < self.plan.epochs:
            outcome = self.train_epoch()
            if outcome is not None:
                return outcome
            with self.paused():
                outcome = self.end_epoch()
            if outcome is not None:
                return outcome
        return "completed"

    # ---- steps

    def train_epoch(self) -> str | None:
        """Run the rest of the current epoch; returns why it stopped early, or None."""
        loop, epoch = self.state, self.state.epoch
        prepared_from = time.perf_counter()
        total = self.plan.epoch_batches[epoch]
        encoded, batch_plan = self.data.prepare(epoch)
        # This rank's batches (all of them with one process); the plan is the same on every rank.
        mine = distributed.shard_batch_plan(batch_plan, self.ctx.rank, self.ctx.world_size)[:total]
        tokens = [sum(len(encoded[i]) for i in indices) for indices in mine]
        remaining_tokens = sum(tokens[loop.batch:total])
        batches = (self.data.collate([encoded[i] for i in indices]) for indices in mine[loop.batch:])
        bar = EpochBar(total=total, initial=loop.batch, desc=f"Epoch {epoch} Training", dynamic_ncols=True,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr,
                       disable=not self.ctx.is_main)
        bar.stats = self.bar_stats()
        if self.first_step_at is None:  # the start-up ends here, this epoch's preparation in it
            self.first_step_at = time.monotonic()
        else:  # a later epoch's samples (drawn and encoded above) are training time, as planned
            self.spent.training += time.perf_counter() - prepared_from
        self.tick = time.perf_counter()
        try:
            while loop.batch < total:
                index = loop.batch
                batch = next(batches)
                shape = throughput_report.BatchShape(*batch.input_ids.shape, batch.num_tokens)
                loop.epoch_samples.extend(f"{task_id}/{pair}" for task_id, pair in batch.samples)
                with out_of_memory_as_user_error(self.device):
                    out = self.parts.step(batch)
                # Device-side bookkeeping only: no host sync here.
                self.log_loss += out.loss.float()
                self.epoch_loss += out.loss.float()
                self.guard.record(out.loss, self.parts.step.skipped_steps)
                seconds = self.count_training_time()
                self.stops.add_step(seconds)
                loop.batch += 1
                loop.epoch_batches += 1
                loop.log_batches += 1
                loop.epoch_tokens += out.num_tokens
                loop.log_tokens += out.num_tokens
                remaining_tokens -= tokens[index]
                if self.timed_steps > 0:  # the first step of a process is warm-up (allocator, kernels)
                    self.timing.add(tokens[index], seconds)
                    self.monitor.add(tokens[index], shape, seconds, self.timing)
                self.timed_steps += 1
                bar.eta_seconds = self.timing.predict(total - loop.batch, remaining_tokens)
                bar.stats = self.bar_stats()
                bar.update(1)
                if out.optimizer_stepped:
                    loop.step += 1
                    outcome = self.after_step(bar, total)
                    if outcome is not None:
                        return outcome
                elif self.stop and not self.ctx.is_distributed:  # torchrun: stop only where agreed
                    return self.stop_now("interrupted")
        finally:
            bar.close()
        return None

    def after_step(self, bar: EpochBar, total: int) -> str | None:
        """Logging, checks, evaluation and checkpoints due after optimizer step `state.step`."""
        args, loop = self.args, self.state
        mid_epoch = loop.batch < total
        if loop.step % min(args.log_every, args.max_bad_steps) == 0 and self.guard.must_stop():
            return "non-finite"
        if loop.step % args.log_every == 0:
            self.log(bar)
        if mid_epoch and self.plan.evaluation.due(loop.step):
            with self.paused():
                result = self.evaluate()
            if result is not None:
                self.metrics.write({"kind": "eval", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
                                    "batches": total, **result.metrics()})
                self.write(f"step {loop.step}: eval {result.describe()}")
                if early_stop_due(self.plan.evaluation.early_stop, loop.evals_since_best):
                    return self.stop_now("early stop")
        reason = self.stops.agreed_stop(self.stop, loop.step, force=False)
        if reason is not None:
            return self.stop_now(reason)
        if mid_epoch and args.save_every and loop.step % args.save_every == 0:
            if self.guard.must_stop():
                return "non-finite"
            with self.paused():
                self.save("step")
        return None

    def stop_now(self, outcome: str) -> str:
        """Checkpoint and stop, unless the weights are already non-finite (then keep the last good one)."""
        if self.guard.must_stop():
            return "non-finite"
        with self.paused():
            self.save(outcome)
        return outcome

    def count_training_time(self) -> float:
        """Add the wall time since the last tick to this epoch's training time; returns it."""
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        self.spent.training += seconds
        self.state.epoch_seconds += seconds
        self.state.log_seconds += seconds
        return seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation, checkpoints and plots are not training time. The device is synchronised first so
        the queued steps are counted as training, not as the pause."""
        if self.pause_depth == 0:
            synchronize(self.device)  # host sync: before a pause only
            self.count_training_time()
        self.pause_depth += 1
        try:
            yield
        finally:
            self.pause_depth -= 1
            if self.pause_depth == 0:
                self.tick = time.perf_counter()

    def write(self, text: str) -> None:
        """A console line that does not break the progress bar (rank 0 only)."""
        if self.ctx.is_main:
            tqdm.write(text)

    # ---- logging

    def bar_stats(self) -> str:
        loop = self.state
        # All processes' tokens: rank 0's count scaled by the ratio measured at the last log step.
        rate = self.group_token_ratio * loop.epoch_tokens / loop.epoch_seconds if loop.epoch_seconds > 0 else 0.0
        loss = self.shown_loss
        return (f"loss: {loss:.4f}, " if loss is not None else "") + f"{rate:,.0f} tok/s"

    def log(self, bar: EpochBar) -> None:
        loop = self.state
        # host sync: once per log interval (and under torchrun one all-reduce of the loss, one of the counts)
        loss = self.ctx.all_reduce_mean(self.log_loss / max(1, loop.log_batches)).item()
        skipped = int(self.parts.step.skipped_steps.item())
        log_tokens, epoch_tokens = self.ctx.all_reduce_sum([loop.log_tokens, loop.epoch_tokens])
        if loop.epoch_tokens:
            self.group_token_ratio = epoch_tokens / loop.epoch_tokens
        self.shown_loss = loss
        self.metrics.write({
            "kind": "step", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
            "batches": self.plan.epoch_batches[loop.epoch], "loss": loss,
            "lr": self.parts.scheduler.get_last_lr()[0],
            "tokens_per_second": round(log_tokens / loop.log_seconds, 2) if loop.log_seconds > 0 else None,
            "epoch_seconds": round(loop.epoch_seconds, 3), "skipped_steps": skipped,
            "elapsed_seconds": round(time.monotonic() - self.info.started, 1)})
        self.log_loss.zero_()
        loop.log_batches = loop.log_tokens = 0
        loop.log_seconds = 0.0
        bar.stats = self.bar_stats()
        for warning in self.monitor.check():
            self.write(f"warning: {warning}")

    def end_epoch(self) -> str | None:
        """Evaluate, write the epoch's metrics line, checkpoint, redraw the plot; returns a stop reason
        (inside `paused()`)."""
        loop, plan = self.state, self.plan
        if self.guard.must_stop():
            return "non-finite"
        loss = self.ctx.all_reduce_mean(self.epoch_loss / max(1, loop.epoch_batches)).item()  # host sync: per epoch
        epoch_tokens = self.ctx.all_reduce_sum(loop.epoch_tokens)
        trained = [key for part in self.ctx.gather_objects(loop.epoch_samples) for key in part]
        record = {"kind": "epoch", "epoch": loop.epoch, "step": loop.step, "batch": loop.batch,
                  "batches": plan.epoch_batches[loop.epoch], "loss": loss,
                  "lr": self.parts.scheduler.get_last_lr()[0],
                  "tokens_per_second": round(epoch_tokens / loop.epoch_seconds, 2) if loop.epoch_seconds else None,
                  "epoch_seconds": round(loop.epoch_seconds, 3),
                  "skipped_steps": int(self.parts.step.skipped_steps.item()),
                  # samples trained this epoch by all processes, and how many of them more than once
                  "samples": len(set(trained)), "samples_repeated": len(trained) - len(set(trained)),
                  "world_size": self.ctx.world_size}
        result = self.evaluate() if plan.evaluation else None
        if result is not None:
            record.update(result.metrics())
        self.metrics.write(record)
        summary = (f"epoch {loop.epoch}: loss {loss:.4f}, {record['batches']} batches in "
                   f"{clock(loop.epoch_seconds)} ({record['tokens_per_second'] or 0:,.0f} tok/s)")
        if result is not None:
            summary += f"; eval {result.describe()}"
        epochs_left = plan.epochs - loop.epoch - 1
        if epochs_left:
            left = self.timing.predict(sum(plan.epoch_batches[loop.epoch + 1:]), plan.tokens_of_epochs(loop.epoch + 1))
            if left is not None:
                summary += f"; {plural(epochs_left, 'more epoch')} ~{clock(left)} of training"
        self.ctx.print(summary)
        loop.epoch += 1
        loop.batch = loop.epoch_batches = loop.epoch_tokens = 0
        loop.epoch_seconds = 0.0
        loop.epoch_loss_sum = 0.0
        loop.epoch_samples = []
        self.epoch_loss.zero_()
        self.save("epoch")
        if time.monotonic() - self.last_plot >= PLOT_EVERY_SECONDS:
            self.plot()
        reason = self.stops.agreed_stop(self.stop, loop.step, force=True)
        if reason == "interrupted":
            return reason
        if result is not None and early_stop_due(plan.evaluation.early_stop, loop.evals_since_best):
            return "early stop"
        if loop.epoch < plan.epochs and reason == "time budget":
            return reason
        return None

    # ---- evaluation

    def evaluate(self) -> EvalResult | None:
        """Exact-match evaluation (None when skipped for the time budget or interrupted part-way), timed as the
        run's evaluation part; call inside `paused()`."""
        start = time.perf_counter()
        try:
            return self._evaluate()
        finally:
            self.spent.evaluation += time.perf_counter() - start
            self.spent.counts["evaluations"] = self.spent.counts.get("evaluations", 0) + 1

    def _evaluate(self) -> EvalResult | None:
        evaluation, loop = self.plan.evaluation, self.state
        fits, left = self.stops.evaluation_fits()
        if not fits:
            self.write(f"skipping evaluation: the last one took {self.stops.eval_seconds:.0f} s and the time budget "
                       f"has {max(0.0, left):.0f} s to spare")
            return None
        # Under torchrun each process decodes every world_size-th task; the results are gathered below.
        share = distributed.shard_items(evaluation.tasks, self.ctx)
        bar = tqdm(total=sum(len(t.test) for t in share), desc=f"Epoch {loop.epoch} Evaluation",
                   unit="input", leave=False, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   disable=not self.ctx.is_main)
        try:
            with out_of_memory_as_user_error(self.device, f"during evaluation (--eval-batch-size "
                                                          f"{evaluation.batch_size}: lower it first): "):
                result = evaluate(self.parts.model, share, max_length=self.args.max_length,
                                  precision=self.info.precision, device=self.device, attempts=evaluation.attempts,
                                  seed=self.args.seed, batch_size=evaluation.batch_size,
                                  should_stop=lambda: bool(self.stop) or self.stops.out_of_time(),
                                  progress=lambda done, n: bar.update(1), views=evaluation.views,
                                  score=evaluation.score)
        finally:
            bar.close()
        parts = self.ctx.gather_objects(result)
        result = None if any(part is None for part in parts) else merge_results(parts)
        if result is None:
            self.write(f"evaluation of {len(evaluation.tasks)} tasks stopped part-way; not recorded")
            return None
        self.stops.eval_seconds = result.seconds
        loop.last_eval = {"epoch": loop.epoch, "step": loop.step, **result.metrics()}
        if loop.best_eval is None or result.accuracy > loop.best_eval:
            loop.best_eval = result.accuracy
            loop.best_eval_epoch = loop.epoch + loop.batch / max(1, self.plan.epoch_batches[loop.epoch])
            loop.evals_since_best = 0
        else:
            loop.evals_since_best += 1
        return result

    # ---- checkpoints, plot, final model

    def save(self, reason: str) -> None:
        """Checkpoint the exact state at the current batch boundary (timed for the budget); call inside
        `paused()`."""
        start = time.perf_counter()
        self.state.log_loss_sum = float(self.log_loss.item())      # host sync: checkpoint time only
        self.state.epoch_loss_sum = float(self.epoch_loss.item())
        self.last_checkpoint = write_checkpoint(self.info, self.plan, self.parts, self.ctx, self.state, reason)
        self.stops.save_seconds = time.perf_counter() - start
        self.spent.checkpoints += self.stops.save_seconds
        self.spent.counts["checkpoints"] = self.spent.counts.get("checkpoints", 0) + 1

    def plot(self) -> None:
        if self.ctx.is_main:
            with self.paused():
                start = time.perf_counter()
                plot_metrics(self.metrics.records(), self.plan.plot_path)
                self.spent.checkpoints += time.perf_counter() - start
                self.spent.counts["plots"] = self.spent.counts.get("plots", 0) + 1
            self.last_plot = time.monotonic()

    def save_final_model(self, outcome: str) -> Path | None:
        """The final model with the settings that produced it (rank 0 writes; the others wait)."""
        loop, info = self.state, self.info
        run_settings = {"args": jsonable(vars(info.args)), "plan": self.plan.record(), "epochs_done": loop.epoch,
                        "step": loop.step, "outcome": outcome, "last_eval": loop.last_eval,
                        "best_eval": loop.best_eval, "precision": info.precision.name, "device": info.device_info,
                        "world_size": self.ctx.world_size}
        start = time.perf_counter()
        path = save_model(self.parts.model, self.plan.output_dir / MODEL_DIR, run_settings) if self.ctx.is_main else None
        self.ctx.barrier()
        self.spent.checkpoints += time.perf_counter() - start
        self.spent.counts["final_saves"] = 1
        return path

    def measured_run(self) -> MeasuredRun:
        """What the run spent so far, part by part: start-up is process start to the first step; `run_seconds`
        runs to now (the end: the summary's printing and the interpreter's exit are not in it)."""
        started = self.info.process_started if self.info.process_started is not None else self.info.started
        now = time.monotonic()
        self.spent.run_seconds = now - started
        self.spent.startup = (self.first_step_at or now) - started
        self.spent.counts.update(batches=self.state.step * self.args.grad_accum, optimizer_steps=self.state.step)
        return self.spent


def write_checkpoint(info: RunInfo, plan: RunPlan, parts: TrainingParts, ctx: DistributedContext, loop: LoopState,
                     reason: str) -> Path:
    """Write the exact state at a batch boundary atomically (rank 0; the others wait); returns its folder.
    Everything a resume needs: weights, optimizer, schedule, step, RNG, the loop's position and sums, partial
    gradients mid-accumulation, and in meta.json the run's flags, its plan, model config and vocabulary."""
    saved_loop = asdict(loop)
    grads = [p.grad for p in parts.step.params]
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
        state = checkpointing.training_state(parts.model, parts.optimizer, parts.scheduler, parts.step, saved_loop,
                                             grads if has_grads else None)
        meta = {"step": loop.step, "epoch": loop.epoch, "batch": loop.batch, "reason": reason,
                "saved_at": datetime.now().isoformat(timespec="seconds"), "epochs": plan.epochs,
                "args": jsonable(vars(info.args)), "plan": plan.record(),
                "model_config": parts.model.config.to_dict(), "vocabulary": list(SYMBOLS),
                "device": info.device_info, "precision": info.precision.name,
                "last_eval": loop.last_eval, "world_size": ctx.world_size, "run_id": info.run_id}
        checkpointing.save_checkpoint(plan.checkpoint_dir, loop.step, state, meta, info.args.keep_checkpoints,
                                      needed_bytes=checkpointing.tensor_bytes(state))
    ctx.barrier()  # the others wait for rank 0's file (a resume or the next save may need it)
    return plan.checkpoint_dir / checkpointing.checkpoint_name(loop.step)


# ---------------------------------------------------------------------------------------------- the end

def finish(info: RunInfo, plan: RunPlan, loop: TrainLoop, outcome: str, final_model: Path | None,
           measured: MeasuredRun | None = None) -> int:
    """Print what happened, the run's time planned against measured part by part, and where everything is;
    returns the exit code."""
    args, state, ctx = info.args, loop.state, loop.ctx
    elapsed = clock(time.monotonic() - info.started)
    done = f"{state.epoch} of {plan.epochs} epochs" + (f" + {state.batch} batches" if state.batch else "")
    headline = {
        "completed": f"Training finished: {done}, {state.step} steps in {elapsed}.",
        "time budget": f"Stopped for the time budget ({clock(args.time_budget or 0)}): {done}, {state.step} steps "
                       f"in {elapsed}.",
        "early stop": f"Stopped early: {plan.evaluation.early_stop} evaluations without improvement; {done}, "
                      f"{state.step} steps in {elapsed}.",
        "interrupted": f"Interrupted ({loop.stop.signal_name}): {done}, {state.step} steps in {elapsed}.",
        "non-finite": f"Stopped at step {state.step}: {loop.guard.reason}.",
    }[outcome]
    lines = [headline]
    if measured is not None:
        lines += format_comparison(measured, info.whole_run)
    lines.append(f"  metrics      {loop.metrics.path}")
    if plan.plot_path.is_file():
        lines.append(f"  plot         {plan.plot_path}")
    if loop.last_checkpoint is not None:
        lines.append(f"  checkpoint   {loop.last_checkpoint}")
    if final_model is not None:
        lines.append(f"  final model  {final_model} (model.load_saved_model, or transformers from_pretrained)")
    if state.last_eval is not None:
        best = (f"; best {state.best_eval:.1%} after {state.best_eval_epoch:.2f} epochs of training"
                if state.best_eval is not None else "")
        lines.append(f"  last eval    {state.last_eval['eval_accuracy']:.1%} of test inputs, "
                     f"{state.last_eval['eval_task_accuracy']:.1%} of tasks (epoch {state.last_eval['epoch']}, "
                     f"step {state.last_eval['step']}){best}")
    if outcome == "non-finite":
        again = shlex.join(["--resume", str(loop.last_checkpoint), *model_source_flags(args)])
        retry = (f"retry from the last good checkpoint with other numerics ({again} --precision bf16 or "
                 f"fp32), or " if loop.last_checkpoint is not None else "")
        lines.append(f"  the weights after step {state.step} are not saved; {retry}start a new run with a smaller "
                     f"--lr (now {args.lr:g})")
        ctx.print("\n".join(lines))
        ctx.print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    if outcome in ("interrupted", "time budget") or (outcome == "early stop" and state.epoch < plan.epochs):
        lines.append("  resume with  " + shlex.join([*launcher(ctx), SCRIPT, "--resume", str(plan.output_dir),
                                                     *model_source_flags(args)]))
    ctx.print("\n".join(lines))
    return EXIT_INTERRUPTED if outcome == "interrupted" else 0


# ------------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args, explicit = parse_args(argv)
    settings, resume_from, notes = args, None, []   # settings: the flags, merged with a resumed run's
    if args.resume is not None:
        resume_from = checkpointing.resolve_resume_path(args.resume or None, args.output_dir, RUNS_DIR)
        settings, notes = merge_resumed_args(args, explicit, read_resumed_settings(resume_from))
    problems = validate_args(settings)
    if problems:
        raise UserError("; ".join(problems))
    return train(settings, resume_from, notes, started)


if __name__ == "__main__":
    run_cli(main)
