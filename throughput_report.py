"""From timed training steps to an epoch-time projection, epoch counts per time budget, and a report.

Everything here is pure (no torch, no model), so it is unit-tested on fixed timings and shared with the
trainer: `settings_mismatches` to check a result (benchmark_result.py reads it), `duration_text` to write a
--time-budget back, and `format_report`. The recommendations plan the whole run (run_budget.py);
`recommend_for_budget` is the training-steps-only count, the floor run_budget's tests compare against.

How the epoch is projected (see `project_epoch`). ARC sample lengths vary ~100x (median ~750 tokens, max ~7460),
so the mean of a few hundred timed batches can be far from the mean of the epoch. Two projections are made:
  * mean x batches: the guide's formula, epoch = mean per-batch time x batches per epoch;
  * a per-batch cost model, time = a + b*tokens (+ c*attention), least squares on the timed batches, summed
    over the epoch's own batch shapes (every batch of the epoch is known before training starts).
Both are the same estimator family (the mean is the cost model with only `a`), so the one that predicts
held-out timed batches best in k-fold cross-validation is recommended. Its expected error is a 95% interval:
the bootstrap spread of the fitted model's prediction for the batches that were not timed, plus the
batch-to-batch scatter the model does not explain; when the device's speed visibly drifted during timing
(`timing_drift`), that drift is added. It cannot foresee a machine that gets slower or busier later.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np

from atomic_io import write_text_atomic
from cli_common import duration_arg, parse_duration  # noqa: F401  (re-exported; --time-budget is a cli_common flag)
from benchmark_result import BenchmarkResult, MsStats, ParallelEstimate, Recommendation

DEFAULT_BUDGET_HOURS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0)
DEFAULT_MAX_USEFUL_EPOCHS = 10
GUIDE_BATCHES_PER_EPOCH = 3232   # ARC-AGI-2 training, batch size 1: the epoch the guide's ms/batch tiers assume

# The guide's decision tree in ms/batch at 3232 batches (400 / 600 / 800 ms), as epoch time so that a tier means
# the same on any GPU, batch size and dataset: about 21.5, 32.3 and 43.1 minutes.
TIER_LIMITS_SECONDS: tuple[float, float, float] = tuple(
    ms / 1000 * GUIDE_BATCHES_PER_EPOCH for ms in (400.0, 600.0, 800.0))  # type: ignore[assignment]

# Dense peak TFLOP/s (no sparsity), from the vendors' data sheets. fp16/bf16: tensor cores. fp32: plain FP32
# (PyTorch leaves TF32 matmuls off by default). Order matters: the first pattern that matches the name wins.
_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, 51.0),
    (r"\bH100\b", 989.0, 67.0),
    (r"\bH200\b", 989.0, 67.0),
    (r"\bA100\b", 312.0, 19.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bT4\b", 65.0, 8.1),
    (r"\bV100\b", 125.0, 15.7),
    (r"\bP100\b", 18.7, 9.3),
)

FLOPS_FORMULA = ("model FLOPs per real token = 6 x parameters in the forward path + 12 x layers x heads x "
                 "head_dim x sequence length (nanoGPT's estimate; PaLM, Appendix B); "
                 "MFU = model FLOPs of the timed batches / timed seconds / device peak")


# ---------------------------------------------------------------------------------------------------------------
# Per-batch statistics

@dataclass(frozen=True)
class Stats(MsStats):
    """Summary of per-batch times in milliseconds (the result file's MsStats, and how many there were)."""
    count: int

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> "Stats":
        values = np.asarray(values_ms, dtype=float)
        if values.size == 0:
            raise ValueError("no timings to summarise")
        return cls(count=int(values.size), mean=float(values.mean()), median=float(np.median(values)),
                   min=float(values.min()), max=float(values.max()),
                   std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                   p90=float(np.percentile(values, 90)))

    def as_ms_stats(self) -> MsStats:
        """The summary a result file holds (without the count: that is `timed_batches`)."""
        return MsStats(self.mean, self.median, self.min, self.max, self.std, self.p90)


# ---------------------------------------------------------------------------------------------------------------
# Per-batch cost model

@dataclass(frozen=True)
class BatchShape:
    """What a batch costs to run: `rows` x `length` padded tokens, of which `tokens` are real."""
    rows: int
    length: int
    tokens: int


MODEL_KINDS = ("constant", "linear", "quadratic")
_MIN_BATCHES = {"constant": 1, "linear": 8, "quadratic": 12}
_KIND_TEXT = {"constant": "mean x batches",
              "linear": "cost model a + b*tokens",
              "quadratic": "cost model a + b*tokens + c*tokens^2"}


def _features(shapes: Sequence[BatchShape], kind: str) -> np.ndarray:
    """Design matrix. Tokens are padded tokens (rows x length: what the GPU computes); the quadratic term is
    rows x length^2, the attention work. Scaled to thousands so least squares is well conditioned."""
    rows = np.array([s.rows for s in shapes], dtype=float)
    length = np.array([s.length for s in shapes], dtype=float)
    columns = [np.ones_like(rows)]
    if kind in ("linear", "quadratic"):
        columns.append(rows * length / 1e3)
    if kind == "quadratic":
        columns.append(rows * length ** 2 / 1e6)
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class CostModel:
    """Per-batch milliseconds as a function of the batch shape, fitted by least squares."""
    kind: str
    coefficients: tuple[float, ...]

    @classmethod
    def fit(cls, kind: str, shapes: Sequence[BatchShape], ms: Sequence[float]) -> "CostModel":
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown cost model {kind!r}")
        coef, *_ = np.linalg.lstsq(_features(shapes, kind), np.asarray(ms, dtype=float), rcond=None)
        return cls(kind, tuple(float(c) for c in coef))

    def predict(self, shapes: Sequence[BatchShape]) -> np.ndarray:
        """Milliseconds per batch; never below zero (a fitted curve can dip there for tiny batches)."""
        return np.maximum(_features(shapes, self.kind) @ np.asarray(self.coefficients), 0.0)

    def describe(self) -> str:
        names = ("ms", "ms per 1k tokens", "ms per 1M tokens^2")
        terms = ", ".join(f"{c:.4g} {n}" for c, n in zip(self.coefficients, names))
        return f"{_KIND_TEXT[self.kind]} ({terms})"


def cross_validated_rmse(kind: str, shapes: Sequence[BatchShape], ms: Sequence[float],
                         folds: int = 5, seed: int = 0) -> float:
    """Root-mean-square error (ms) of `kind` on batches it was not fitted on, k-fold."""
    n = len(ms)
    folds = max(2, min(folds, n))
    values = np.asarray(ms, dtype=float)
    order = np.random.default_rng(seed).permutation(n)
    errors = np.empty(n)
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held)
        model = CostModel.fit(kind, [shapes[i] for i in kept], values[kept])
        errors[held] = model.predict([shapes[i] for i in held]) - values[held]
    return float(np.sqrt(np.mean(errors ** 2)))


# ---------------------------------------------------------------------------------------------------------------
# Epoch projection

@dataclass(frozen=True)
class Projection:
    """One way of projecting the epoch: seconds and a 95% expected error (a fraction of `seconds`)."""
    kind: str
    seconds: float
    expected_error: float
    heldout_rmse_ms: float | None
    model: CostModel
    extrapolated_batches: int  # epoch batches longer than any timed one (the model extrapolates there)

    @property
    def name(self) -> str:
        return _KIND_TEXT[self.kind]


@dataclass(frozen=True)
class EpochProjection:
    """All projections made, the recommended one, and why it was chosen."""
    batches_per_epoch: int
    projections: dict[str, Projection]
    recommended: str
    reason: str
    drift: float | None = None  # see timing_drift

    @property
    def best(self) -> Projection:
        return self.projections[self.recommended]

    @property
    def seconds(self) -> float:
        return self.best.seconds


def project_epoch(epoch_shapes: Sequence[BatchShape], timed_positions: Sequence[int], timed_ms: Sequence[float],
                  bootstrap: int = 200, seed: int = 0) -> EpochProjection:
    """Project one epoch's wall time from timed batches.

    `epoch_shapes` is every batch of the epoch in order; `timed_positions[i]` is the index in the epoch of the
    batch timed as `timed_ms[i]` (milliseconds, data preparation included). Batches that were timed count with
    their measured time; the others are predicted. A batch timed more than once (the timing wrapped around the
    epoch) counts with its mean.
    """
    n_epoch = len(epoch_shapes)
    if n_epoch == 0:
        raise ValueError("the epoch has no batches")
    if len(timed_ms) == 0 or len(timed_ms) != len(timed_positions):
        raise ValueError("need one epoch position per timed batch, and at least one")
    ms = np.asarray(timed_ms, dtype=float)
    positions = np.asarray(timed_positions, dtype=int)
    shapes = [epoch_shapes[p] for p in positions]

    measured: dict[int, list[float]] = {}
    for p, t in zip(positions.tolist(), ms.tolist()):
        measured.setdefault(p, []).append(t)
    measured_ms = sum(float(np.mean(v)) for v in measured.values())
    untimed = [s for i, s in enumerate(epoch_shapes) if i not in measured]
    longest_timed = max(s.rows * s.length for s in shapes)
    extrapolated = sum(1 for s in untimed if s.rows * s.length > longest_timed)

    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, len(ms), len(ms)) for _ in range(bootstrap)]
    projections: dict[str, Projection] = {}
    for kind in MODEL_KINDS:
        if len(ms) < _MIN_BATCHES[kind]:
            continue
        model = CostModel.fit(kind, shapes, ms)
        untimed_ms = float(model.predict(untimed).sum()) if untimed else 0.0
        seconds = (measured_ms + untimed_ms) / 1000
        rmse = cross_validated_rmse(kind, shapes, ms, seed=seed) if len(ms) >= 2 else None
        if untimed and len(ms) >= 2:
            # Parameter uncertainty (bootstrap over the timed batches) plus the scatter of individual untimed
            # batches around the model, which partly averages out over many batches.
            sums = [CostModel.fit(kind, [shapes[i] for i in idx], ms[idx]).predict(untimed).sum() for idx in resamples]
            variance = float(np.var(sums, ddof=1)) + len(untimed) * (rmse or 0.0) ** 2
            error = 1.96 * math.sqrt(variance) / 1000 / seconds if seconds > 0 else float("inf")
        elif untimed:
            error = float("inf")  # one timed batch: no way to tell how far off it is
        else:
            error = 0.0  # every batch of the epoch was timed
        projections[kind] = Projection(kind, seconds, error, rmse, model, extrapolated if kind != "constant" else 0)

    recommended, reason = _choose(projections, len(ms), n_epoch)
    if not untimed:
        reason = (f"every one of the {n_epoch} batches of the epoch was timed, so the projection is their measured "
                  f"total (no model needed)")
    drift = timing_drift(projections[recommended].model, shapes, ms)
    if drift is not None and untimed:
        # The statistical error assumes the device keeps one speed; when it visibly did not, the drift seen
        # within the timed window is a fair guess at how far off the rest of the epoch may be.
        projections = {k: replace(p, expected_error=math.hypot(p.expected_error, drift))
                       for k, p in projections.items()}
    return EpochProjection(n_epoch, projections, recommended, reason, drift)


def fixed_cost_share(projection: EpochProjection, mean_ms: float) -> float | None:
    """The share of a batch's time that does not depend on its length: the a + b*tokens fit's intercept over
    the mean batch time (None with too few batches for that fit). Used whichever projection is recommended:
    when time does not depend on length at all, the plain mean wins and the share is all of it."""
    linear = projection.projections.get("linear")
    if linear is None or mean_ms <= 0:
        return None
    return min(1.0, max(0.0, linear.model.coefficients[0] / mean_ms))


def timing_drift(model: CostModel, shapes: Sequence[BatchShape], ms: Sequence[float],
                 threshold: float = 0.02) -> float | None:
    """How much slower (+) or faster (-) the second half of the timed batches ran than the first, after allowing
    for their lengths; None unless it exceeds `threshold` and three standard errors (a steady device, or noise).
    Thermal throttling, clock boost or another process sharing the device show up here."""
    values = np.asarray(ms, dtype=float)
    if len(values) < 8:
        return None
    predicted = np.maximum(model.predict(shapes), 1e-9)
    half = len(values) // 2
    first = values[:half].sum() / predicted[:half].sum()
    second = values[half:].sum() / predicted[half:].sum()
    residual = values - predicted * values.sum() / predicted.sum()
    spread = residual.std(ddof=1)
    standard_error = math.hypot(spread * math.sqrt(half) / predicted[:half].sum(),
                                spread * math.sqrt(len(values) - half) / predicted[half:].sum())
    drift = second / first - 1
    return drift if abs(drift) > threshold and abs(drift) > 3 * standard_error else None


def _choose(projections: dict[str, Projection], n_timed: int, n_epoch: int) -> tuple[str, str]:
    """Pick the projection whose model predicts held-out timed batches best; a richer model must beat a simpler
    one by more than 2% of its held-out error, so noise does not pick it."""
    if len(projections) == 1:
        return "constant", (f"only {n_timed} timed batches: a per-token cost model needs at least "
                            f"{_MIN_BATCHES['linear']}, so the projection is mean x batches")
    best = "constant"
    for kind in MODEL_KINDS[1:]:
        if kind in projections and projections[kind].heldout_rmse_ms < 0.98 * projections[best].heldout_rmse_ms:
            best = kind
    mean_rmse = projections["constant"].heldout_rmse_ms
    if best == "constant":
        return best, (f"per-batch time does not depend measurably on batch length here (a length-based cost "
                      f"model does not predict held-out timed batches better than their mean, "
                      f"{mean_rmse:.1f} ms RMS), so mean x batches is recommended")
    chosen = projections[best]
    return best, (f"per-batch time grows with batch length: the {chosen.name} predicts held-out timed batches "
                  f"to {chosen.heldout_rmse_ms:.1f} ms RMS against {mean_rmse:.1f} ms for their mean, and it sums "
                  f"over all {n_epoch} batches of this epoch instead of assuming the {n_timed} timed ones are "
                  f"typical")


# ---------------------------------------------------------------------------------------------------------------
# Recommendations per time budget

def recommend_for_budget(budget_hours: float, epoch_seconds: float, batches_per_epoch: int,
                         max_useful_epochs: int = DEFAULT_MAX_USEFUL_EPOCHS) -> Recommendation:
    """Whole epochs that fit `budget_hours` (floor of budget / epoch time), capped at `max_useful_epochs`; when
    not one epoch fits, the --max-batches that does."""
    if epoch_seconds <= 0 or batches_per_epoch < 1:
        raise ValueError("epoch time and batches per epoch must be positive")
    budget_seconds = budget_hours * 3600
    fits = int(math.floor(budget_seconds / epoch_seconds + 1e-9))
    if fits >= 1:
        epochs = min(fits, max_useful_epochs)
        return Recommendation(budget_hours, epochs, epochs * epoch_seconds / 3600, fits, fits > max_useful_epochs,
                              None)
    per_batch = epoch_seconds / batches_per_epoch
    max_batches = int(math.floor(budget_seconds / per_batch + 1e-9))
    return Recommendation(budget_hours, 1 if max_batches else 0, max_batches * per_batch / 3600, 0, False,
                          max_batches)


def recommendations(epoch_seconds: float, batches_per_epoch: int,
                    budgets_hours: Iterable[float] = DEFAULT_BUDGET_HOURS,
                    max_useful_epochs: int = DEFAULT_MAX_USEFUL_EPOCHS) -> list[Recommendation]:
    """The recommendation table, one row per budget."""
    return [recommend_for_budget(b, epoch_seconds, batches_per_epoch, max_useful_epochs) for b in budgets_hours]


# ---------------------------------------------------------------------------------------------------------------
# Estimate for several GPUs (from a one-GPU measurement)

DEFAULT_ALLREDUCE_GBPS = 8.0  # assumed all-reduce bus bandwidth, GB/s: two PCIe GPUs without NVLink (a 2xT4)


def estimate_data_parallel(model: CostModel, rank_shapes: Sequence[Sequence[BatchShape]], grad_accum: int,
                           gradient_bytes: int, bus_gbps: float = DEFAULT_ALLREDUCE_GBPS) -> ParallelEstimate:
    """Epoch time on len(rank_shapes) devices from a cost model fitted on one device.

    `rank_shapes[r]` are the shapes of rank r's batches (distributed.shard_batch_plan of the epoch's plan).
    Assumes every device is as fast as the measured one; each optimizer step lasts as long as the slowest
    rank's `grad_accum` batches (the ranks wait for each other in the all-reduce); and each step adds a ring
    all-reduce of the gradients, 2 (N-1)/N x gradient bytes per device at `bus_gbps`, not overlapped with the
    backward pass. DDP does overlap it, so the all-reduce part errs long; a bus slower than assumed errs short.
    """
    world = len(rank_shapes)
    rounds = len(rank_shapes[0])
    per_batch = np.stack([model.predict(list(shapes)) for shapes in rank_shapes])  # ms, [world, rounds]
    steps = -(-rounds // grad_accum)
    padded = np.zeros((world, steps * grad_accum))
    padded[:, :rounds] = per_batch
    compute_ms = padded.reshape(world, steps, grad_accum).sum(axis=2).max(axis=0).sum()
    allreduce_s = 2 * (world - 1) / world * gradient_bytes / (bus_gbps * 1e9) if world > 1 else 0.0
    assumptions = (f"every GPU as fast as this one; each step waits for the slowest of its {world} processes' "
                   f"batches (this run's cost model on each process's share of the epoch); a ring all-reduce of "
                   f"{format_bytes(gradient_bytes)} of gradients per optimizer step at an assumed {bus_gbps:g} GB/s "
                   f"(--allreduce-gbps), not overlapped with the backward pass (DDP overlaps it, so that part "
                   f"errs long)")
    return ParallelEstimate(world, compute_ms / 1000 + steps * allreduce_s, compute_ms / 1000,
                            steps * allreduce_s, rounds, steps, gradient_bytes, bus_gbps, assumptions)


def format_estimate(estimate: ParallelEstimate, one_device_seconds: float) -> list[str]:
    """The report's section for `--estimate-gpus`: labelled an estimate, with its assumptions."""
    seconds, allreduce = estimate.epoch_seconds, estimate.allreduce_seconds

    def shown(value: float) -> str:
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"

    return [f"ESTIMATE for {estimate.world_size} GPUs (not measured; measure it with torchrun --nproc_per_node "
            f"{estimate.world_size} measure_throughput.py ...):",
            f"  epoch ~{shown(seconds)} s ({seconds / 60:.1f} min), {one_device_seconds / seconds:.2f}x as fast as "
            f"one GPU: {estimate.batches_per_epoch} batches per GPU, {estimate.optimizer_steps} optimizer steps",
            f"  of which gradient all-reduce {shown(allreduce)} s",
            f"  assumes {estimate.assumptions}"]


# ---------------------------------------------------------------------------------------------------------------
# Speed tier (the guide's decision tree)

@dataclass(frozen=True)
class Tier:
    name: str
    label: str
    epochs: int        # the guide's suggested --epochs for this tier
    advice: str


_TIERS = (
    Tier("fast", "Fast", 10, "Recommended: 10 epochs. Good for quick validation and iterative development."),
    Tier("moderate", "Moderate", 5, "Recommended: 5-8 epochs (start with 5). Standard training with decent "
                                    "convergence; most of the improvement comes in the first 5 epochs."),
    Tier("slower", "Slower", 3, "Recommended: 2-4 epochs. Limited time: focus on quality."),
    Tier("slow", "Very slow", 2, "Recommended: 1-2 epochs, and check for issues (see the diagnostics)."),
)


def speed_tier(epoch_seconds: float) -> Tier:
    """The guide's tier for this epoch time (its 400/600/800 ms per batch boundaries at 3232 batches)."""
    for tier, limit in zip(_TIERS, TIER_LIMITS_SECONDS):
        if epoch_seconds < limit:
            return tier
    return _TIERS[-1]


def tier_range_text(tier: Tier) -> str:
    """The epoch-time range of a tier, in minutes, as printed next to it."""
    limits = [t / 60 for t in TIER_LIMITS_SECONDS]
    index = [t.name for t in _TIERS].index(tier.name)
    if index == 0:
        return f"epoch under {limits[0]:.1f} minutes"
    if index == len(limits):
        return f"epoch over {limits[-1]:.1f} minutes"
    return f"epoch {limits[index - 1]:.1f}-{limits[index]:.1f} minutes"


# ---------------------------------------------------------------------------------------------------------------
# Model FLOP utilisation

def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU at this precision, or None when unknown (CPUs, unlisted GPUs)."""
    for pattern, half, single in _PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return (single if precision == "fp32" else half) * 1e12
    return None


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics

@dataclass(frozen=True)
class Measurements:
    """What the timing loop saw, beyond per-batch times; the input to `diagnose`."""
    device_type: str                  # "cuda" or "cpu"
    data_share: float                 # fraction of the timed wall time spent getting batches to the device
    memory_peak_bytes: int | None     # peak reserved by the allocator (what the card must hold)
    memory_total_bytes: int | None
    overhead_share: float | None      # cost-model intercept / mean batch time: the length-independent part
    skipped_steps: int
    optimizer_steps: int
    precision: str
    drift: float | None = None        # timing_drift of the timed batches
    load_average: float | None = None  # 1-minute load average of the machine at the end of timing
    cpu_count: int | None = None
    compiled: bool = False            # --compile: the decoder blocks ran compiled


def diagnose(m: Measurements) -> list[str]:
    """Problems the measurements show, each with what to do; empty when nothing stands out."""
    found = []
    if m.data_share > 0.10:
        found.append(f"data preparation takes {m.data_share:.0%} of each batch: the device waits on the CPU for "
                     f"batches; check that the data is on fast local storage and that the machine's CPUs are free")
    if m.memory_peak_bytes and m.memory_total_bytes and m.memory_peak_bytes > 0.8 * m.memory_total_bytes:
        found.append(f"memory pressure: peak {format_bytes(m.memory_peak_bytes)} of "
                     f"{format_bytes(m.memory_total_bytes)} ({m.memory_peak_bytes / m.memory_total_bytes:.0%}); "
                     f"the allocator may be thrashing: lower --max-length, add --gradient-checkpointing or use "
                     f"--lora-rank 16")
    if m.device_type == "cuda" and m.overhead_share is not None and m.overhead_share > 0.5:
        # The host issues every kernel from Python and the optimizer update costs the same for any batch, so a
        # large length-independent share means the GPU is fed too little work per step.
        found.append(f"CPU/launch-bound steps: {m.overhead_share:.0%} of a batch's time does not depend on its "
                     f"length (fixed per-step cost: Python and kernel launches, the optimizer update), so the GPU "
                     f"idles; more tokens per step amortise it: a larger --batch-size (8: length-grouped, ~95% "
                     f"real tokens, fewer optimizer steps per epoch) or --tokens-per-batch"
                     + ("" if m.compiled else "; and --compile on, which cuts the per-step cost itself (1.30x the "
                                              "tokens/s at batch size 1 on an H200)"))
    if m.drift is not None:
        found.append(f"the device's speed drifted: the second half of the timed batches ran {abs(m.drift):.0%} "
                     f"{'slower' if m.drift > 0 else 'faster'} than the first for the same lengths (thermal "
                     f"throttling, clock boost, or another process on the device); the expected error includes "
                     f"this, and a longer --num-batches or a quiet machine narrows it")
    if m.load_average is not None and m.cpu_count and m.load_average > m.cpu_count:
        found.append(f"the machine is busy: load average {m.load_average:.1f} on {m.cpu_count} CPUs, so other "
                     f"processes competed with this one for the CPU; the timings are unreliable: measure again "
                     f"on a quiet machine")
    if m.skipped_steps:
        found.append(f"{m.skipped_steps} of {m.optimizer_steps} optimizer steps were skipped for inf/NaN gradients "
                     f"({m.precision}); a few while the loss scale settles are normal, many mean fp16 overflows: "
                     f"try --precision bf16 on GPUs that support it, or a lower --lr")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Durations (also the trainer's --time-budget)

def duration_text(seconds: float) -> str:
    """Seconds as a --time-budget value parse_duration reads back: '2h', '90m', '45s', '1.5s'."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def format_duration(hours: float) -> str:
    """'30 minutes', '1 hour', '12 hours', '1.5 hours'."""
    if hours < 1:
        minutes = hours * 60
        return f"{minutes:g} minute" + ("" if minutes == 1 else "s")
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def format_hours(hours: float) -> str:
    """'0.47 hours' as in the guide, or minutes / seconds when that would read as 0.00 hours."""
    if hours >= 0.1:
        return f"{hours:.2f} hours"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} minutes"
    return f"{hours * 3600:.1f} seconds"


def format_bytes(n: int | float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


# ---------------------------------------------------------------------------------------------------------------
# The result file

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON object so a reader never sees half a file (benchmarks' own result files)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def settings_mismatches(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Speed-relevant settings that differ between a benchmark result and this run, one line each.
    Only the keys of `current` are compared, so a result may carry extra descriptive keys."""
    return [f"{key}: benchmark {recorded.get(key)!r}, this run {value!r}"
            for key, value in current.items() if recorded.get(key) != value]


# ---------------------------------------------------------------------------------------------------------------
# The printed report

RULE = "=" * 70


def format_stats(title: str, stats: MsStats) -> list[str]:
    return [f"{title}:",
            f"  Average:     {stats.mean:.2f} ms",
            f"  Median:      {stats.median:.2f} ms",
            f"  Min:         {stats.min:.2f} ms",
            f"  Max:         {stats.max:.2f} ms",
            f"  Std Dev:     {stats.std:.2f} ms",
            f"  p90:         {stats.p90:.2f} ms"]


def format_epoch(seconds: float, batches: int, what: str) -> list[str]:
    shown = f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}"
    return [f"Projected Single Epoch Time ({batches} batches, {what}):",
            f"  {shown} seconds",
            f"  {seconds / 60:.1f} minutes",
            f"  {seconds / 3600:.2f} hours"]


def format_recommendations(rows: Sequence[Recommendation], max_useful_epochs: int) -> list[str]:
    """The table: one line per budget with the whole run's plan (run_budget.format_row_fields), the
    --time-budget row marked. Rows without a breakdown (training steps only) are printed as such."""
    import run_budget

    lines = ["RECOMMENDED EPOCH COUNTS", RULE, "If you have [TIME BUDGET] available (the whole run: start-up, "
             "training, evaluation, checkpoints; the margin keeps it inside at the projection's upper end):"]
    for row in rows:
        text = run_budget.format_row_fields(row.budget_hours * 3600, row.epochs, row.max_batches, row.breakdown,
                                            bool(row.counts and row.counts.get("evaluations")), row.margin,
                                            row.fits_epochs, row.capped, row.needed_seconds)
        head, _, rest = text.partition(" -> ")
        lines.append(f"{head:<16} -> {rest}" + ("   <- --time-budget" if row.source == "--time-budget" else ""))
    if any(row.capped for row in rows):
        lines.append(f"* capped at {max_useful_epochs} epochs, the useful maximum (--max-useful-epochs); "
                     f"spend the rest on a bigger model or more data")
    return lines


def _device_lines(result: BenchmarkResult) -> list[str]:
    device = result.device
    lines: list[str] = []
    if device.type == "cuda":
        lines.append(f"GPU: {device.name}")
        if device.total_memory_bytes:
            lines.append(f"GPU Memory: {device.total_memory_bytes / 2**30:.1f} GB"
                         + (f" (this run capped at {device.memory_cap_bytes / 2**30:.1f} by --gpu-memory)"
                            if device.memory_cap_bytes else ""))
        if device.compute_capability:
            lines.append(f"Compute capability: {device.compute_capability}")
    else:
        threads = device.threads if device.threads is not None else "?"
        lines.append(f"CPU: {device.name} ({threads} thread{'' if threads == 1 else 's'})")
    lines.append(f"Precision: {device.precision}")
    if result.world_size > 1:
        lines.append(f"Processes: {result.world_size} (torchrun, {result.backend}), measured together, gradient "
                     f"all-reduce included; batches and times below are per process, tokens/s of all of them")
    lines.append(f"Model: {result.settings.get('model_name')} ({result.model.parameters:,} parameters, "
                 f"{result.model.trainable_parameters:,} trained)")
    too_long = result.data.samples_too_long
    left_out = (f" ({too_long} too long for --max-length {result.settings.get('max_length')}, left out)"
                if too_long else "")
    lines.append(f"Data: {result.data.description}: {result.data.samples} samples{left_out}, "
                 f"{result.batches_per_epoch} batches per epoch")
    return lines


def _speed_lines(result: BenchmarkResult) -> list[str]:
    r, precision = result, result.device.precision
    lines = [f"Throughput: {r.tokens_per_second:,.0f} tokens/s (real input tokens, demonstrations and query, "
             f"padding excluded; {r.padded_tokens_per_second:,.0f} incl. padding)",
             f"  Real tokens: {r.real_token_share:.1%} of the tokens computed (the rest is padding)",
             f"Peak memory: {format_bytes(r.peak_memory_bytes)} ({r.peak_memory_kind})"]
    flops = r.model_flops_per_second
    if r.mfu is not None and r.peak_flops:
        lines.append(f"MFU: {r.mfu:.1%} ({flops / 1e12:.1f} of {r.peak_flops / 1e12:.0f} TFLOP/s {precision} peak)")
    else:
        lines.append(f"MFU: n/a (peak of this device unknown); model FLOPs achieved: {flops / 1e12:.3f} TFLOP/s")
    if r.measured_matmul_flops:
        lines.append(f"  {r.mfu_of_measured_peak:.1%} of this device's measured dense matmul rate "
                     f"({r.measured_matmul_flops / 1e12:.2f} TFLOP/s in {precision}, measured here just now)")
    lines.append(f"  {FLOPS_FORMULA}")
    lines.append(f"Longest batch of the epoch ({r.longest_batch.rows} x {r.longest_batch.length} tokens): fits, "
                 f"first step {r.longest_batch.ms:.0f} ms")
    return lines


def _projection_lines(result: BenchmarkResult) -> list[str]:
    projection = result.epoch_projection
    lines = format_epoch(result.epoch_seconds, result.batches_per_epoch, projection.name)
    error = projection.expected_error
    lines.append(f"  expected error: {'unknown' if error is None else f'±{error:.1%}'} (95%: sampling and model error, "
                 f"assuming the device keeps this speed)")
    for kind, p in result.projections.items():
        mark = "  <- recommended" if kind == projection.kind else ""
        err = "unknown" if p.expected_error is None else f"±{p.expected_error:.1%}"
        heldout = "" if p.heldout_rmse_ms is None else f", held-out error {p.heldout_rmse_ms:.1f} ms/batch"
        lines.append(f"  {p.name:<40} {p.seconds:>10.1f} s  {err}{heldout}{mark}")
    lines.append(f"  Why: {projection.reason}.")
    if projection.extrapolated_batches:
        lines.append(f"  Note: {projection.extrapolated_batches} batches of the epoch are longer than any timed "
                     f"one; the model extrapolates there.")
    return lines


def _run_cost_lines(result: BenchmarkResult) -> list[str]:
    """What the run does besides its training steps, as measured (the recommendations plan with these)."""
    import run_budget

    costs, schedule = result.run_costs, result.schedule
    shown = run_budget.format_seconds
    compiled = ", compiling" if result.compiled else ""
    lines = ["Besides training (measured here with the trainer's settings; the recommendations plan them):",
             f"  start-up     {shown(costs.startup_seconds)} (process start to the first step: loading, data, "
             f"model{compiled}, the first steps' one-off cost)"]
    if costs.epoch_data_seconds > 0:
        lines.append(f"  epoch data   {shown(costs.epoch_data_seconds)} per later epoch (drawing its augmentation, "
                     f"encoding and batching its samples; planned as training)")
    evaluation = costs.evaluation
    if evaluation is None:
        lines.append("  evaluation   off (--eval-tasks 0)")
    else:
        views = (f", {schedule.eval_views} views per input, candidate scoring {shown(evaluation.scoring_seconds)} "
                 f"estimated" if schedule.eval_views > 1 else "")
        attempts = ", second attempts planned for every input" if schedule.eval_attempts == 2 else ""
        lines.append(f"  evaluation   {shown(evaluation.pass_seconds)} per pass ({schedule.eval_tasks} tasks, "
                     f"{evaluation.inputs} test inputs, {evaluation.batches} decode calls of up to "
                     f"{schedule.eval_batch_size} rows{views}{attempts}); {evaluation.timed_batches} timed by real "
                     f"decoding to the known answers' lengths ({shown(evaluation.timed_seconds)}), the rest from "
                     f"the fitted cost; expected error ±{evaluation.expected_error:.0%}")
    lines.append(f"  checkpoints  {shown(costs.checkpoint_seconds)} per write ({format_bytes(costs.checkpoint_bytes)}), "
                 f"final model {shown(costs.final_save_seconds)} ({format_bytes(costs.final_save_bytes)}), plot "
                 f"{shown(costs.plot_seconds)} (the first "
                 f"{shown(costs.plot_seconds + costs.first_plot_extra_seconds)})")
    if costs.prediction_seconds_per_task is not None:
        lines.append(f"  prediction   {shown(costs.prediction_seconds_per_task)} per task with {costs.prediction_views} "
                     f"view{'' if costs.prediction_views == 1 else 's'} (evaluation.py --submission; the evaluation "
                     f"tasks stand in for the challenges file)")
    lines.append(f"  measuring these added {shown(costs.added_seconds)}, {costs.added_share:.1%} of the benchmark's "
                 f"{shown(costs.benchmark_seconds)}")
    return lines


def format_report(result: BenchmarkResult) -> str:
    """The human-readable report of a result (the same object that --json writes)."""
    r = result
    lines = _device_lines(r) + [""]
    if r.interrupted:
        lines += [f"INTERRUPTED: statistics of the {r.timed_batches} batches timed so far", ""]
    lines += format_stats(f"Per-Batch Time Statistics ({r.timed_batches} timed batches after {r.warmup_batches} "
                          f"warm-up; data preparation included)", r.per_batch_ms)
    lines.append(f"  Data prep:   {r.data_ms.mean:.2f} ms mean ({r.data_share:.1%} of batch time)")
    compiled = ", compiling the decoder blocks included (--compile)" if r.compiled else ""
    lines.append(f"  Start-up:    {r.startup_seconds:.1f} s before the first timed batch (loading, memory "
                 f"calibration, warm-up{compiled}); once per run, not per epoch")
    lines += [""] + _speed_lines(r) + [""] + _projection_lines(r)
    if r.estimate is not None:
        lines += [""] + format_estimate(r.estimate, r.epoch_seconds)
    lines += [""] + _run_cost_lines(r)
    lines += [""] + format_recommendations(r.recommendations, r.max_useful_epochs) + [""]
    lines.append(f"Speed tier: {r.tier_label} ({r.tier_range}; {r.per_batch_ms.mean:.0f} ms/batch x "
                 f"{r.batches_per_epoch} batches)")
    lines.append(f"  {r.tier_advice}")
    if r.diagnostics:
        lines.append("Diagnostics:")
        lines += [f"  - {d}" for d in r.diagnostics]
    elif r.tier in ("slower", "slow"):
        lines.append("Diagnostics: no bottleneck stands out (data, memory, CPU, fp16 skips all normal): the model "
                     "and sample lengths cost this much; --lora-rank 16 or a smaller --max-length make it faster")
    if r.next_command:
        lines += ["", "Next command:", f"  {r.next_command}", f"  ({r.next_command_why})"]
    else:
        lines += ["", f"No command: {r.next_command_why}"]
    return "\n".join(lines)
