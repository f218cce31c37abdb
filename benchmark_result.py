"""The result of measure_throughput.py as one typed schema: what --json writes, what the report prints, and
what the trainer reads for --epochs auto and its speed comparison.

`BenchmarkResult` and its parts are frozen dataclasses. `to_json` writes them (the key names are the field
names); `from_json` is the one way back: it checks the format version, every field's presence and type,
refuses NaN / inf and strings where numbers go, compressed or non-UTF-8 bytes, and cost models whose
coefficients do not match their kind, each as one UserError line naming the file and the field.

Pure (no torch, no numpy): the lowest floor with throughput_report above it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from atomic_io import write_text_atomic
from errors import UserError

# /2: recommendations plan the whole run (start-up, training, evaluation, checkpoints), with run_costs and the
# schedule they were counted for; a /1 file has neither, so --epochs auto cannot plan from it.
RESULT_FORMAT = "arc-throughput/2"
PLAN_PARTS = ("startup", "training", "evaluation", "checkpoints")
# Coefficients per cost-model kind: a; a + b*tokens; a + b*tokens + c*tokens^2 (throughput_report.CostModel).
COEFFICIENTS = {"constant": 1, "linear": 2, "quadratic": 3}

Scalar = Union[str, int, float, bool, None]


@dataclass(frozen=True)
class Recommendation:
    """What to run for one time budget (run_budget.BudgetRow.as_json).

    `epochs` is what to pass as --epochs (capped at the useful maximum; 1 when only part of an epoch fits, with
    `max_batches` set; 0 when not even the smallest run fits, with `needed_seconds`); `fits_epochs` is how many
    whole epochs the budget holds. `planned_seconds` is the whole run and `breakdown` its parts (startup,
    training, evaluation, checkpoints: seconds summing to it); `total_hours` is the same as hours; `margin` the
    share of the budget kept for the projection's expected error; `source` "table" or "--time-budget"."""
    budget_hours: float
    epochs: int
    total_hours: float | None
    fits_epochs: int
    capped: bool
    max_batches: int | None
    planned_seconds: float | None = None
    breakdown: dict[str, float] | None = None
    margin: float = 0.0
    counts: dict[str, int] | None = None
    needed_seconds: float | None = None
    source: str = "table"


@dataclass(frozen=True)
class Schedule:
    """The run settings the plan's counts depend on (the trainer's flags of the same names); the trainer takes a
    result's plan only for a run with the same ones."""
    eval_tasks: int                 # tasks evaluated (after --eval-tasks and the set's known answers); 0: off
    eval_data: str | None
    eval_every: int
    eval_batch_size: int
    eval_attempts: int
    eval_views: int
    save_every: int
    grad_accum: int


@dataclass(frozen=True)
class EvaluationCost:
    """One evaluation pass, measured by real decoding (run_costs.measure_evaluation)."""
    pass_seconds: float             # one pass over the evaluation set, projected
    expected_error: float           # its expected error, a fraction
    inputs: int
    batches: int                    # decode calls in one pass
    timed_batches: int
    timed_seconds: float
    spent_seconds: float            # the measurement's wall time, warm-up included
    heldout_error: float | None
    cost_model: dict[str, float]    # seconds per batch / prompt token / generated token / attended position
    scoring_seconds: float = 0.0    # --eval-views > 1: candidate scoring planned on top of decoding


@dataclass(frozen=True)
class RunCostsInfo:
    """What a run costs besides its training steps, measured on the device (run_costs.py), and what measuring
    them added to the benchmark."""
    startup_seconds: float          # process start to the first step, plus the first steps' one-off extra
    checkpoint_seconds: float       # one checkpoint write (model, optimizer, state)
    checkpoint_bytes: int
    final_save_seconds: float       # one model.save_model
    final_save_bytes: int
    plot_seconds: float             # one redraw of training_curves.png
    added_seconds: float            # the benchmark's own added time (saves, plot, evaluation measurement)
    added_share: float              # of the benchmark's total wall time
    benchmark_seconds: float        # process start to the result
    evaluation: EvaluationCost | None   # None: evaluation off (--eval-tasks 0)
    prediction_views: int = 1       # --views for the prediction projection
    prediction_seconds_per_task: float | None = None  # evaluation.py --submission, per task, at --views
    first_plot_extra_seconds: float = 0.0   # the first redraw's one-off (importing matplotlib), beyond plot_seconds
    epoch_data_seconds: float = 0.0         # preparing one later epoch's samples (augmentation, encoding, batches)


@dataclass(frozen=True)
class ParallelEstimate:
    """An epoch on `world_size` devices estimated, not measured, from one device's cost model."""
    world_size: int
    epoch_seconds: float
    compute_seconds: float        # the steps' batches, each step as long as its slowest process's batches
    allreduce_seconds: float      # the gradient all-reduces, none of them overlapped with compute
    batches_per_epoch: int        # per process
    optimizer_steps: int
    gradient_bytes: int
    bus_gbps: float
    assumptions: str


@dataclass(frozen=True)
class DeviceInfo:
    """training.describe_device's fields, the precision, and on CUDA the card's memory in bytes."""
    name: str
    type: str
    precision: str
    threads: int | None = None
    cpus: int | None = None
    total_memory_gb: float | None = None
    compute_capability: str | None = None
    cuda: str | None = None
    total_memory_bytes: int | None = None
    memory_cap_bytes: int | None = None     # --gpu-memory, as the allocator enforces it


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    trainable_parameters: int


@dataclass(frozen=True)
class DataSummary:
    description: str
    samples: int
    samples_too_long: int


@dataclass(frozen=True)
class MsStats:
    """Per-batch milliseconds (throughput_report.Stats without the count)."""
    mean: float
    median: float
    min: float
    max: float
    std: float
    p90: float


@dataclass(frozen=True)
class LongestBatch:
    rows: int
    length: int
    tokens: int
    ms: float


@dataclass(frozen=True)
class EpochProjectionInfo:
    """Which projection the epoch time comes from, and why."""
    kind: str
    name: str
    expected_error: float | None      # 95%, a fraction of the epoch time; None: unknown
    reason: str
    extrapolated_batches: int
    drift: float | None


@dataclass(frozen=True)
class ProjectionInfo:
    """One projection of the epoch, with its fitted cost model (milliseconds per batch)."""
    name: str
    seconds: float
    expected_error: float | None
    heldout_rmse_ms: float | None
    coefficients: tuple[float, ...]


@dataclass(frozen=True)
class BenchmarkResult:
    """Everything one benchmark run measured and recommends."""
    created: str
    complete: bool
    interrupted: bool
    device: DeviceInfo
    settings: dict[str, Scalar]          # cli_common.speed_settings + data_description
    world_size: int
    backend: str | None
    model: ModelSize
    data: DataSummary
    warmup_batches: int
    compiled: bool
    startup_seconds: float
    timed_batches: int
    per_batch_ms: MsStats
    data_ms: MsStats
    data_share: float
    tokens_per_second: float
    padded_tokens_per_second: float
    peak_memory_bytes: int
    peak_reserved_bytes: int | None
    peak_memory_kind: str
    model_flops_per_second: float
    peak_flops: float | None
    mfu: float | None
    measured_matmul_flops: float
    mfu_of_measured_peak: float
    real_token_share: float
    flops_formula: str
    checkpoint_above: int | None         # batches over this many tokens recompute activations
    longest_batch: LongestBatch
    batches_per_epoch: int               # per process
    plan_batches_per_epoch: int
    epoch_seconds: float
    epoch_projection: EpochProjectionInfo
    projections: dict[str, ProjectionInfo]
    max_useful_epochs: int
    recommendations: tuple[Recommendation, ...]
    tier: str
    tier_label: str
    tier_range: str
    tier_advice: str
    diagnostics: tuple[str, ...]
    skipped_steps: int
    next_command: str
    next_command_why: str
    estimate: ParallelEstimate | None
    run_costs: RunCostsInfo
    schedule: Schedule
    format: str = RESULT_FORMAT

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is inconsistent between the fields, as 'field: problem' (the types are checked on loading)."""
        found = []
        if self.format != RESULT_FORMAT:
            found.append(f"format: {self.format!r}, this version reads {RESULT_FORMAT!r}")
        if not self.epoch_seconds > 0:
            found.append("epoch_seconds: the result has no epoch time")
        if self.batches_per_epoch < 1:
            found.append("batches_per_epoch: must be at least 1")
        for kind, projection in self.projections.items():
            if kind not in COEFFICIENTS:
                found.append(f"projections.{kind}: not a cost model kind ({', '.join(COEFFICIENTS)})")
            elif len(projection.coefficients) != COEFFICIENTS[kind]:
                found.append(f"projections.{kind}.coefficients: {len(projection.coefficients)} numbers, a {kind} "
                             f"cost model has {COEFFICIENTS[kind]}")
        for i, row in enumerate(self.recommendations):
            if row.breakdown is not None:
                if set(row.breakdown) != set(PLAN_PARTS):
                    found.append(f"recommendations[{i}].breakdown: keys {sorted(row.breakdown)}, expected "
                                 f"{list(PLAN_PARTS)}")
                elif row.planned_seconds is None or not math.isclose(sum(row.breakdown.values()), row.planned_seconds,
                                                                     rel_tol=1e-6, abs_tol=1e-3):
                    found.append(f"recommendations[{i}].breakdown: does not sum to planned_seconds")
        if self.epoch_projection.kind not in self.projections:
            found.append(f"epoch_projection.kind: {self.epoch_projection.kind!r} is not among the projections")
        return found

    @property
    def recommended_projection(self) -> ProjectionInfo:
        return self.projections[self.epoch_projection.kind]

    def to_json(self) -> str:
        return json.dumps(_plain(self), indent=2, allow_nan=False) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically, so a reader never sees half a file."""
        write_text_atomic(path, self.to_json())


def _plain(value: Any) -> Any:
    """Dataclasses as dicts, tuples as lists, in field order; NaN/inf are bugs here (allow_nan=False)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------- reading

class _Invalid(Exception):
    """A field that does not match the schema: where (dotted path) and what is wrong."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}" if where else problem)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    return repr(value)


def _convert(value: Any, kind: Any, where: str) -> Any:
    """`value` (parsed JSON) as `kind`, or _Invalid naming `where`."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None:
            if type(None) in options:
                return None
            raise _Invalid(where, "null where a value is required")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except _Invalid as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _Invalid(where, f"{_describe(value)} is not a valid value")
    if kind is type(None):
        if value is not None:
            raise _Invalid(where, f"expected null, got {_describe(value)}")
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise _Invalid(where, f"expected true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(where, f"expected a whole number, got {_describe(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(where, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise _Invalid(where, f"expected a finite number, got {value}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise _Invalid(where, f"expected a string, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _Invalid(where, f"expected a list, got {_describe(value)}")
        item = typing.get_args(kind)[0]
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(where, f"expected an object, got {_describe(value)}")
        item = typing.get_args(kind)[1]
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    raise TypeError(f"benchmark_result cannot read {kind!r}")  # a bug in the schema


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected an object, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in value:
            if f.default is dataclasses.MISSING:
                raise _Invalid(path, "missing")
            continue
        values[f.name] = _convert(value[f.name], hints[f.name], path)
    try:
        return cls(**values)
    except ValueError as err:  # BenchmarkResult's consistency checks
        raise _Invalid("", str(err)) from None


def from_json(text: str | bytes, path: str | os.PathLike = "<result>") -> BenchmarkResult:
    """Parse and check a result; UserError (one line, naming `path` and the field) when it is not one."""
    again = f"run measure_throughput.py --json {path} again"
    if isinstance(text, bytes):
        if text[:2] == b"\x1f\x8b":
            raise UserError(f"{path}: gzip-compressed, not a throughput result; decompress it (gunzip) or {again}")
        if text[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in text[:64]:
            raise UserError(f"{path}: UTF-16 text, not UTF-8; {again} (or convert it to UTF-8)")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text (byte {err.start}); {again}") from None

    try:
        raw = json.loads(text)  # NaN / Infinity parse as floats, which the field's check then refuses by name
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: not a readable throughput result ({err}); {again}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a measure_throughput.py result (a JSON object is expected); {again}")
    if raw.get("format", "arc-throughput/1") != RESULT_FORMAT:
        older = raw.get("format", "arc-throughput/1") in ("arc-throughput/1",)
        why = (" (written before the benchmark planned evaluation, checkpoints and start-up, so it cannot plan "
               "the whole run)" if older else "")
        raise UserError(f"{path}: format {raw.get('format', 'arc-throughput/1')!r}{why}, and this version reads "
                        f"{RESULT_FORMAT!r}; {again}")
    try:
        return _dataclass(BenchmarkResult, raw, "")
    except _Invalid as err:
        raise UserError(f"{path}: not a valid measure_throughput.py result ({err}); {again}") from None


def load(path: str | os.PathLike) -> BenchmarkResult:
    """Read a measure_throughput.py --json result (the one loader)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; run `python measure_throughput.py --json {path}` first") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}); run measure_throughput.py --json {path} "
                        f"again") from None
    return from_json(data, path)
