"""Watching a run: the step-time fit behind the ETA, slowdown warnings, the progress bar, and metrics.jsonl
with its plot. No model, no data: each piece is unit-tested on made-up step times and records.
"""
from __future__ import annotations

import io
import json
import math
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

import throughput_report
from atomic_io import append_line, write_bytes_atomic, write_text_atomic

SLOWDOWN_FACTOR = 1.5         # steps this much slower than early in the run -> warn (once)
BENCHMARK_SLOWDOWN = 1.25     # epoch projected this much longer than measure_throughput.py said -> warn (once)
REFERENCE_STEPS = 100         # steps (after the first) that define "early in the run"
WINDOW_STEPS = 50             # recent steps compared against that reference


class StepTimeModel:
    """Step seconds ~ a + b x tokens, least squares over recent steps (older ones fade with `decay`).

    ARC samples vary ~100x in length, so 'remaining batches x mean batch time' swings with whichever samples
    came last; remaining steps and tokens through this fit does not. The fixed part `a` (optimizer step,
    launch overhead) matters at batch size 1.

    One-off costs are left out, so the ETA is of steady steps: the first `skip_first` steps (the allocator's
    growth, kernel selection, compiling), and later any step over ONE_OFF_FACTOR x what the fit predicts for it
    (a new shape's first allocation). On the tiny CPU model, epoch 0's first steps made the next-epoch ETA 14x
    too long.
    """

    ONE_OFF_FACTOR = 10.0

    def __init__(self, decay: float = 1 - 1 / 500, skip_first: int = 5):
        self.decay = decay
        self.skip_first = skip_first
        self.seen = 0
        self.left_out = 0
        self.n = self.t = self.tt = self.y = self.ty = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.seen += 1
        if self.seen <= self.skip_first:
            return
        if self.n >= 20:
            expected = self.predict(1, tokens)
            if expected is not None and expected > 0 and seconds > self.ONE_OFF_FACTOR * expected:
                self.left_out += 1
                return
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

    def __init__(self, benchmark_model: throughput_report.CostModel | None = None, device_type: str = "cuda"):
        # Advice names only tools of the device the run is on.
        self.check_tool = ("check nvidia-smi" if device_type == "cuda"
                           else "check top for other processes and free memory")
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
                                f"another process: {self.check_tool})")
        if self.benchmark_model is not None:
            expected = sum(benchmark for _, _, benchmark in self.window)
            ratio = actual / max(1e-9, expected)
            if self._slow_twice("benchmark", ratio > BENCHMARK_SLOWDOWN):
                warnings.append(f"steps take {ratio:.2f}x as long as measure_throughput.py measured for batches of "
                                f"these shapes ({1000 * actual / len(self.window):.0f} ms against "
                                f"{1000 * expected / len(self.window):.0f} ms per batch, last {len(self.window)} "
                                f"batches); {self.check_tool} (memory pressure or another process)")
        return warnings

    def _slow_twice(self, kind: str, slow: bool) -> bool:
        """True the first time `slow` holds at two checks in a row (one slow window may be a pause)."""
        self.slow_checks[kind] = self.slow_checks[kind] + 1 if slow else 0
        if self.slow_checks[kind] >= 2 and kind not in self.warned:
            self.warned.add(kind)
            return True
        return False



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



REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"
# The numbers a metrics.jsonl line carries that TensorBoard plots; the tag's prefix says which line they came
# from: train/ (a log step's interval), epoch/ (an epoch's line), eval/ (an evaluation, in an epoch's or an
# eval line). The x axis is the optimizer step.
TENSORBOARD_SCALARS = ("loss", "lr", "tokens_per_second", "epoch_seconds", "skipped_steps")
TENSORBOARD_EVAL_SCALARS = ("eval_accuracy", "eval_task_accuracy", "eval_greedy_accuracy", "eval_pass2_voted",
                            "eval_task_pass2_voted", "eval_seconds")


def report_to_problems(report_to: str) -> list[str]:
    """What stops `--report-to` from working here, found before the run starts (not at its first log line)."""
    import importlib.util
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return ["--report-to tensorboard needs the tensorboard package: pip install -r requirements.txt "
                "(or pip install tensorboard)"]
    return []


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it happens. Only rank 0 of a
    torchrun group writes (`enabled`); the other ranks' writes are no-ops. A write the disk refuses is one
    UserError line (atomic_io), and the file keeps whole lines only. With `report_to="tensorboard"` the same
    numbers also go to TensorBoard event files in `<folder>/tensorboard/` (TensorBoardSink)."""

    def __init__(self, path: Path, enabled: bool = True, report_to: str = "none"):
        self.path = path
        self.enabled = enabled
        self.sink = TensorBoardSink(path.parent / TENSORBOARD_DIR) if enabled and report_to == "tensorboard" else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record), what="the metrics")
        self._report(record)

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def restore(self, source: Path, up_to_step: int) -> None:
        """Start from `source`'s lines up to the resumed checkpoint's step (later ones are redone)."""
        if not self.enabled:
            return
        self._report_resumed_at(up_to_step)
        # A finished run's "kind": "run" line has no step: the resumed run writes its own at its end.
        kept = [r for r in read_metrics(source) if r.get("kind") != "run" and r.get("step", 0) <= up_to_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept), what="the metrics")

    def close(self) -> None:
        """Flush and close the TensorBoard files (metrics.jsonl needs nothing: each line is closed as written)."""
        if self.sink is not None:
            self.sink.close()

    def _report(self, record: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.write(record)

    def _report_resumed_at(self, step: int) -> None:
        if self.sink is not None:
            self.sink.purge_step = step + 1  # the resumed run redoes every step after the checkpoint's


class TensorBoardSink:
    """metrics.jsonl's numbers as TensorBoard scalars (`torch.utils.tensorboard.SummaryWriter`, imported on
    the first write: importing it takes seconds). The writer opens with `purge_step`: 0 for a new run (events
    of an earlier run in the same folder are hidden), the step after the checkpoint for a resumed one, so
    TensorBoard drops the steps the crashed run logged past it and shows the redone ones once. Flushed at
    every epoch and evaluation line; SummaryWriter's own thread flushes the others every 2 minutes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.purge_step: int | None = 0
        self.writer: Any = None

    def write(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind"), record.get("step")
        if step is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purge_step)
            self.purge_step = None  # a writer reopened after close() appends
        prefix = {"step": "train", "epoch": "epoch"}.get(kind)
        for key in TENSORBOARD_SCALARS if prefix else ():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        for key in TENSORBOARD_EVAL_SCALARS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"eval/{key}", value, step)
        if kind in ("epoch", "eval"):
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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


def plotting() -> tuple[Any, Any]:
    """matplotlib's Figure and MaxNLocator, imported at the first redraw (no pyplot: no GUI backend, no global
    state). The import is that redraw's one-off cost; the benchmark times it alone."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    return Figure, MaxNLocator


def plot_metrics(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss and eval accuracy (greedy, and the voted pass@2 when evaluation used several views) against the
    optimizer step, epoch ends marked, as a PNG.

    The x axis is the step, not a fraction of an epoch: a line's `batches` is what the epoch trained (under
    --max-batches, a share of the data's epoch the log does not record), so "epoch 0.5-1.0" would misstate a
    100-batch smoke run. Points carry markers while there are few of them, so a resumed run's first line shows.
    """
    Figure, MaxNLocator = plotting()
    steps = [r for r in records if r.get("kind") == "step" and math.isfinite(r.get("loss", math.nan))]
    epochs = [r for r in records if r.get("kind") == "epoch" and math.isfinite(r.get("loss", math.nan))]
    evals = [r for r in records if r.get("eval_accuracy") is not None]
    if not steps and not epochs:
        return None
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    loss_axes, eval_axes = figure.subplots(2, 1, sharex=True)
    if steps:
        loss_axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.7,
                       marker="." if len(steps) <= 60 else None, label="training loss (log interval mean)")
    if epochs:
        loss_axes.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    for axes in (loss_axes, eval_axes):
        for r in epochs:
            axes.axvline(r["step"], color="grey", lw=0.8, ls=":")
    if epochs:  # the epochs along the top: how many were done at each dotted line
        top = loss_axes.secondary_xaxis("top")
        every = math.ceil(len(epochs) / 12)  # at most ~12 labels, the last epoch always among them
        shown = [r for i, r in enumerate(epochs) if (len(epochs) - 1 - i) % every == 0]
        top.set_xticks([r["step"] for r in shown], labels=[str(r["epoch"] + 1) for r in shown])
        sizes = sorted({r["batches"] for r in epochs})
        top.set_xlabel("epochs done" + (f" ({sizes[0]} batches each)" if len(sizes) == 1 else ""), fontsize=9)
    loss_axes.set_ylabel("loss (cross-entropy on output grids)")
    loss_axes.legend(loc="upper right")
    loss_axes.grid(alpha=0.3)
    if evals:
        x = [r["step"] for r in evals]
        views = max(r.get("eval_views", 1) for r in evals)
        greedy = [r.get("eval_greedy_accuracy", r["eval_accuracy"]) for r in evals]
        eval_axes.plot(x, [100 * v for v in greedy], "o-", label="test inputs, greedy (pass@1)")
        if evals[-1].get("eval_attempts", 1) > 1:
            eval_axes.plot(x, [100 * r["eval_accuracy"] for r in evals], "^-", label="test inputs, pass@2 "
                           "(greedy + one augmented view)")
        if views > 1 and all(r.get("eval_pass2_voted") is not None for r in evals):
            eval_axes.plot(x, [100 * r["eval_pass2_voted"] for r in evals], "D-",
                           label=f"test inputs, pass@2 voted over {views} views")
        eval_axes.plot(x, [100 * r["eval_task_accuracy"] for r in evals], "s--", label="tasks (all test inputs right)")
        if views > 1 and all(r.get("eval_task_pass2_voted") is not None for r in evals):
            eval_axes.plot(x, [100 * r["eval_task_pass2_voted"] for r in evals], "D--",
                           label=f"tasks, pass@2 voted over {views} views")
        eval_axes.legend(loc="upper left", fontsize=9)
    else:
        eval_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=eval_axes.transAxes)
    eval_axes.set_ylabel("exact match (%)")
    eval_axes.set_xlabel("optimizer step (dotted: epoch ends)")
    eval_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    eval_axes.set_ylim(-2, 102)
    eval_axes.grid(alpha=0.3)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    write_bytes_atomic(path, png.getvalue(), what="the plot")  # like every other file: atomic, one line if refused
    return path




def clock(seconds: float) -> str:
    """Seconds as H:MM:SS, how the console shows durations."""
    return str(timedelta(seconds=round(seconds)))
