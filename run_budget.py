"""The whole run the user launches, planned inside a time budget: start-up, training, evaluation, checkpoints.

Pure (no torch, no model): unit-tested on fixed numbers, shared by the benchmark (its recommendation table)
and the trainer (`--epochs auto`, and its end-of-run comparison of plan and measurement).

    costs = RunCosts(startup_seconds=20, epoch_seconds=900, batches_per_epoch=3232, eval_pass_seconds=95,
                     checkpoint_seconds=6, final_save_seconds=2, expected_error=0.08)
    schedule = Schedule(batches_per_epoch=3232, eval_enabled=True, eval_every=0, save_every=1000)
    row = recommend(2 * 3600, costs, schedule)          # the most epochs whose whole plan fits 2 h
    print(format_row(row))
    # 2 hours -> 6 epochs (~1.78 h: training 1.50 h, evaluation 0.16 h, checkpoints 0.04 h, start-up 0.01 h; ...)

What a run of N epochs does, counted with the trainer's own rules (trainloop_gpu_finetuned.py):
  * every epoch trains min(batches per epoch, --max-batches) batches (per process under torchrun);
  * the optimizer steps on every --grad-accum-th batch, counted over the whole run (the accumulation carries
    across epoch boundaries), so step s ends global batch s x grad_accum;
  * after an optimizer step that is not the epoch's last batch (`_after_step`, mid-epoch only): an evaluation
    when --eval-every divides the step, and a checkpoint when --save-every divides it;
  * at each epoch's end (`_end_epoch_now`): an evaluation (unless --eval-tasks 0), a checkpoint, a plot;
  * at the end (`_finish`): the final model (`model.save_model`) and a last plot.
Evaluations are counted at their full cost: with --eval-attempts 2 the second attempt runs for every input the
first got wrong, planned as all of them (an upper bound; early in training nearly all are wrong).

The margin. The epoch projection carries a 95% expected error; a row fits only if its whole plan, grown by that
error, still ends inside the budget: planned x (1 + margin) + reserve <= budget. The margin is the expected
error (its evaluation part: the evaluation projection's own error when known, see plan_margin), at least
MIN_MARGIN (10%: evaluation and save times have errors of their own, and whole runs of the tiny model on
this project's 2-core CPU landed up to +7% from their plan when other jobs came and went), and UNKNOWN_MARGIN
(25%) when the error is unknown (a single timed batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

# The trainer redraws training_curves.png at an epoch end only when this many seconds have passed since the last
# redraw (and always at the end): with short epochs a redraw per epoch would cost more than the training.
PLOT_EVERY_SECONDS = 60.0

MIN_MARGIN = 0.10
# On a CPU the floor is higher: there the run's process trained up to 14% slower than the benchmark's had timed
# (tiny model, 2 cores, 40 s runs, the same settings back to back), whatever the expected error said.
CPU_MIN_MARGIN = 0.20


def min_margin_for(device_type: str) -> float:
    """The margin's floor on this kind of device (see MIN_MARGIN and CPU_MIN_MARGIN)."""
    return CPU_MIN_MARGIN if device_type == "cpu" else MIN_MARGIN
UNKNOWN_MARGIN = 0.25
DEFAULT_BUDGET_HOURS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0)
DEFAULT_MAX_USEFUL_EPOCHS = 10
PARTS = ("startup", "training", "evaluation", "checkpoints")


# ---------------------------------------------------------------------------------------------------------------
# Inputs

@dataclass(frozen=True)
class RunCosts:
    """What each part of a run costs, measured on the device (run_costs.py and the benchmark).

    `startup_seconds`: process start to the first training step (imports, data, model loading, the long-batch
    memory probe), plus the one-off extra of the first steps (compiling under --compile).
    `epoch_seconds`: the projected wall time of one epoch's training steps, `batches_per_epoch` batches;
    `epoch_data_seconds`: preparing an epoch's samples before its first step (drawing the augmentation,
    encoding, batching), which the run counts as training too; epoch 0's is part of the start-up.
    `eval_pass_seconds`: one evaluation pass over the evaluation set at the run's settings (0: evaluation off).
    `checkpoint_seconds`: one checkpoint write; `final_save_seconds`: one `model.save_model`;
    `plot_seconds`: one redraw of training_curves.png (each epoch end and at the end);
    `first_plot_extra_seconds`: what the run's first redraw costs beyond that (importing matplotlib, its font
    cache), planned where the run pays it: with the checkpoints, at the first epoch's end.
    `expected_error`: the epoch projection's 95% expected error as a fraction (None: unknown).
    `eval_error`: the evaluation pass projection's expected error as a fraction (None: as `expected_error`).
    `batch_seconds`: optional predicted seconds of each batch of epoch 0 in training order (the benchmark's
    cost model), so a partial epoch (--max-batches) is planned on the batches it will really train."""
    startup_seconds: float
    epoch_seconds: float
    batches_per_epoch: int
    eval_pass_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    final_save_seconds: float = 0.0
    plot_seconds: float = 0.0
    epoch_data_seconds: float = 0.0
    first_plot_extra_seconds: float = 0.0
    expected_error: float | None = None
    batch_seconds: tuple[float, ...] | None = None
    eval_error: float | None = None

    def __post_init__(self) -> None:
        if self.epoch_seconds <= 0 or self.batches_per_epoch < 1:
            raise ValueError("epoch time and batches per epoch must be positive")
        for name in ("startup_seconds", "eval_pass_seconds", "checkpoint_seconds", "final_save_seconds",
                     "plot_seconds", "first_plot_extra_seconds", "epoch_data_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.batch_seconds is not None and len(self.batch_seconds) != self.batches_per_epoch:
            raise ValueError(f"batch_seconds has {len(self.batch_seconds)} entries for {self.batches_per_epoch} "
                             f"batches")

    def training_seconds(self, batches: int) -> float:
        """Seconds of the first `batches` batches of epoch 0 (a whole epoch: the projection itself)."""
        if batches >= self.batches_per_epoch:
            return self.epoch_seconds
        if self.batch_seconds is not None:
            return math.fsum(self.batch_seconds[:batches])
        return self.epoch_seconds * batches / self.batches_per_epoch


@dataclass(frozen=True)
class Schedule:
    """The run's schedule settings, with the trainer's meaning (per process under torchrun).

    `eval_enabled`: --eval-tasks > 0. `eval_every` / `save_every`: optimizer steps, 0 = only at epoch ends."""
    batches_per_epoch: int
    epochs: int = 1
    max_batches: int | None = None
    grad_accum: int = 1
    eval_enabled: bool = True
    eval_every: int = 0
    save_every: int = 1000

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1 or self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("batches per epoch, epochs and grad_accum must be at least 1")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError("max_batches must be at least 1")
        if self.eval_every < 0 or self.save_every < 0:
            raise ValueError("eval_every and save_every must not be negative")

    @property
    def epoch_batches(self) -> int:
        """Batches each epoch trains: --max-batches caps every epoch."""
        return min(self.batches_per_epoch, self.max_batches or self.batches_per_epoch)

    def with_length(self, epochs: int, max_batches: int | None) -> "Schedule":
        return Schedule(self.batches_per_epoch, epochs, max_batches, self.grad_accum, self.eval_enabled,
                        self.eval_every, self.save_every)


@dataclass(frozen=True)
class BudgetPolicy:
    """How much of a budget a plan may fill. `reserve_seconds`: kept free at the very end besides the margin
    (what the trainer's time-budget stop keeps in hand, so a run on plan never trips it)."""
    min_margin: float = MIN_MARGIN
    unknown_margin: float = UNKNOWN_MARGIN
    reserve_seconds: float = 0.0
    max_useful_epochs: int = DEFAULT_MAX_USEFUL_EPOCHS


def stop_rule_reserve(costs: RunCosts, slowest_step_seconds: float, fixed_seconds: float = 5.0,
                      eval_slack: float = 0.2) -> float:
    """The reserve (BudgetPolicy.reserve_seconds) that keeps a run on plan clear of the trainer's time-budget
    rules at its very end: after its last step the plan still holds the last evaluation, checkpoint and final
    save, while the trainer stops when less than 2 steps + 1.5 checkpoints + 1.5 final saves + `fixed_seconds`
    is left, and skips an evaluation with less than 1.2 of its time (`eval_slack`) on top of that."""
    return (fixed_seconds + 2 * slowest_step_seconds + 0.5 * (costs.checkpoint_seconds + costs.final_save_seconds)
            + eval_slack * costs.eval_pass_seconds)


# ---------------------------------------------------------------------------------------------------------------
# Counting what a run does

@dataclass(frozen=True)
class EventCounts:
    """What a run of a schedule does, by the trainer's rules (see the module docstring)."""
    batches: int
    optimizer_steps: int
    evaluations: int
    checkpoints: int
    final_saves: int
    plots: int


def _multiples(m: int, upto: int) -> int:
    return upto // m if m > 0 else 0


def count_events(schedule: Schedule) -> EventCounts:
    """Exactly how many evaluations, checkpoint writes and saves a run of `schedule` makes.

    Closed form of the trainer's loop: step s ends global batch s*g; it is mid-epoch unless that batch is an
    epoch's last (a multiple of n, the batches per epoch). Steps divisible by E are global batches divisible by
    m = g*E; of those up to N*n, the epoch ends are the multiples of lcm(m, n)."""
    n, g, epochs = schedule.epoch_batches, schedule.grad_accum, schedule.epochs
    total = n * epochs
    steps = total // g
    if steps == 0:
        raise ValueError(f"grad_accum {g} is more than the {total} batches of this run: no optimizer step happens")

    def mid_epoch(every: int) -> int:
        if every == 0:
            return 0
        m = g * every
        return _multiples(m, total) - _multiples(m * n // math.gcd(m, n), total)

    evaluations = (epochs + mid_epoch(schedule.eval_every)) if schedule.eval_enabled else 0
    return EventCounts(batches=total, optimizer_steps=steps, evaluations=evaluations,
                       checkpoints=epochs + mid_epoch(schedule.save_every), final_saves=1, plots=epochs + 1)


# ---------------------------------------------------------------------------------------------------------------
# Plans

@dataclass(frozen=True)
class RunPlan:
    """The planned seconds of each part of one run; `planned_seconds` is their sum."""
    epochs: int
    max_batches: int | None
    counts: EventCounts
    startup: float
    training: float
    evaluation: float
    checkpoints: float   # checkpoint writes, the final-model save and the plot redraws

    @property
    def breakdown(self) -> dict[str, float]:
        return {part: getattr(self, part) for part in PARTS}

    @property
    def planned_seconds(self) -> float:
        return sum(self.breakdown.values())


def plan_run(costs: RunCosts, schedule: Schedule) -> RunPlan:
    """The whole-run plan of `schedule` (its epochs and --max-batches) at `costs`."""
    if schedule.batches_per_epoch != costs.batches_per_epoch:
        raise ValueError(f"the schedule has {schedule.batches_per_epoch} batches per epoch and the costs "
                         f"{costs.batches_per_epoch}")
    counts = count_events(schedule)
    n = schedule.epoch_batches
    if n >= costs.batches_per_epoch:
        training = costs.epoch_seconds * schedule.epochs
    else:
        # Epoch 0 trains its first n batches; later epochs draw others: planned at the epoch's mean batch.
        training = (costs.training_seconds(n)
                    + (schedule.epochs - 1) * costs.epoch_seconds * n / costs.batches_per_epoch)
    training += (schedule.epochs - 1) * costs.epoch_data_seconds  # epoch 0's is prepared in the start-up
    evaluation = counts.evaluations * costs.eval_pass_seconds
    saves = counts.checkpoints * costs.checkpoint_seconds + counts.final_saves * costs.final_save_seconds
    # The trainer redraws the plot at an epoch end only PLOT_EVERY_SECONDS after the last redraw, and once at
    # the end: at most one redraw per PLOT_EVERY_SECONDS of the rest of the run, plus the last.
    rest = costs.startup_seconds + training + evaluation + saves
    counts = replace(counts, plots=min(counts.plots, 1 + int(rest // PLOT_EVERY_SECONDS)))
    return RunPlan(schedule.epochs, schedule.max_batches, counts,
                   startup=costs.startup_seconds,
                   training=training,
                   evaluation=evaluation,
                   checkpoints=saves + counts.plots * costs.plot_seconds
                   + (costs.first_plot_extra_seconds if counts.plots else 0.0))


def margin_for(expected_error: float | None, policy: BudgetPolicy = BudgetPolicy()) -> float:
    """The margin a plan keeps: the projection's expected error, at least `min_margin`; `unknown_margin` when
    the error is unknown (None, infinite or NaN)."""
    if expected_error is None or not math.isfinite(expected_error):
        return max(policy.unknown_margin, policy.min_margin)
    return max(float(expected_error), policy.min_margin)


def plan_margin(plan: RunPlan, costs: RunCosts, policy: BudgetPolicy = BudgetPolicy()) -> float:
    """The margin of one plan: the projection's expected error over the whole plan, except that its
    evaluation part carries the evaluation projection's own error (`eval_error`, when known); at least
    `min_margin`. Without `eval_error` this is margin_for(expected_error)."""
    overall = margin_for(costs.expected_error, policy)
    if costs.eval_error is None or plan.planned_seconds <= 0:
        return overall
    evaluation_error = costs.eval_error if math.isfinite(costs.eval_error) else policy.unknown_margin
    weighted = (overall * (plan.planned_seconds - plan.evaluation) + evaluation_error * plan.evaluation)
    return max(policy.min_margin, weighted / plan.planned_seconds)


def _needed(plan: RunPlan, margin: float, policy: BudgetPolicy) -> float:
    """The budget a plan needs, its upper end under the margin."""
    return plan.planned_seconds * (1 + margin) + policy.reserve_seconds


@dataclass(frozen=True)
class BudgetRow:
    """The recommendation for one budget: `plan` is what to run (None when not even the smallest run fits).

    `epochs`: what to pass as --epochs (capped at the useful maximum); `max_batches` set when only part of an
    epoch fits; `fits_epochs`: how many whole epochs the budget holds; `needed_seconds`: the smallest budget for
    the smallest run, given when nothing fits."""
    budget_seconds: float
    margin: float
    plan: RunPlan | None
    fits_epochs: int
    capped: bool
    needed_seconds: float | None = None
    source: str = "table"   # "table" or "--time-budget"

    @property
    def epochs(self) -> int:
        return self.plan.epochs if self.plan is not None else 0

    @property
    def max_batches(self) -> int | None:
        return self.plan.max_batches if self.plan is not None else None

    @property
    def planned_seconds(self) -> float | None:
        return self.plan.planned_seconds if self.plan is not None else None

    def as_json(self) -> dict[str, Any]:
        """The `recommendations` row of the benchmark's JSON. `total_hours` is the whole run now."""
        plan = self.plan
        return {
            "budget_hours": self.budget_seconds / 3600,
            "epochs": self.epochs,
            "max_batches": self.max_batches,
            "fits_epochs": self.fits_epochs,
            "capped": self.capped,
            "planned_seconds": self.planned_seconds,
            "total_hours": None if plan is None else plan.planned_seconds / 3600,
            "breakdown": None if plan is None else plan.breakdown,
            "margin": self.margin,
            "counts": None if plan is None else vars(plan.counts).copy(),
            "needed_seconds": self.needed_seconds,
            "source": self.source,
        }


def minimum_budget_seconds(costs: RunCosts, schedule: Schedule, policy: BudgetPolicy = BudgetPolicy()) -> float:
    """The shortest budget any run of these settings fits: the smallest run the trainer accepts (one epoch of
    --max-batches grad_accum: one optimizer step) with its start-up, one evaluation when evaluation is on, its
    checkpoint, the final save, grown by the margin. A shorter --time-budget is refused with this number."""
    smallest = min(schedule.grad_accum, schedule.epoch_batches)
    plan = plan_run(costs, schedule.with_length(1, smallest))
    return _needed(plan, plan_margin(plan, costs, policy), policy)


def budget_problem(budget_seconds: float, costs: RunCosts, schedule: Schedule,
                   policy: BudgetPolicy = BudgetPolicy()) -> str | None:
    """Why `budget_seconds` is too short for any run of these settings (one line for the caller to raise as a
    user error), or None when it is long enough."""
    needed = minimum_budget_seconds(costs, schedule, policy)
    if budget_seconds >= needed:
        return None
    smallest = plan_run(costs, schedule.with_length(1, min(schedule.grad_accum, schedule.epoch_batches)))
    margin = plan_margin(smallest, costs, policy)
    parts = [f"start-up {format_seconds(costs.startup_seconds)}"]
    if schedule.eval_enabled:
        parts.append(f"one evaluation {format_seconds(costs.eval_pass_seconds)}")
    parts.append(f"a checkpoint and the final save "
                 f"{format_seconds(costs.checkpoint_seconds + costs.final_save_seconds)}")
    return (f"--time-budget {format_budget(budget_seconds)} is shorter than the smallest run of these settings "
            f"needs: {format_seconds(needed)} ({', '.join(parts)}, and the {margin:.0%} margin); give at least "
            f"--time-budget {_budget_flag(needed)}" + ("" if not schedule.eval_enabled else
                                                        ", or fewer --eval-tasks"))


def recommend(budget_seconds: float, costs: RunCosts, schedule: Schedule, policy: BudgetPolicy = BudgetPolicy(),
              source: str = "table") -> BudgetRow:
    """The most epochs whose whole plan fits `budget_seconds` at the upper end of the margin (capped at the
    useful maximum); when not one epoch fits, the most --max-batches of one epoch that does; when not even
    the smallest run fits, a row without a plan and the budget it needs. `schedule`'s epochs and max_batches
    are ignored: they are what is being chosen (its grad_accum, evaluation and saving settings are kept)."""
    full = schedule.with_length(1, None)

    def fits(epochs: int, max_batches: int | None = None) -> RunPlan | None:
        plan = plan_run(costs, full.with_length(epochs, max_batches))
        needed = _needed(plan, plan_margin(plan, costs, policy), policy)
        return plan if needed <= budget_seconds * (1 + 1e-12) else None

    def row(plan: RunPlan | None, fits_epochs: int, capped: bool = False) -> BudgetRow:
        margin = plan_margin(plan, costs, policy) if plan is not None else margin_for(costs.expected_error, policy)
        return BudgetRow(budget_seconds, margin, plan, fits_epochs, capped, source=source)

    if fits(1) is not None:
        # The plan grows by at least an epoch's training per epoch: double, then bisect.
        low, high = 1, 2
        while fits(high) is not None:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) is not None else (low, middle)
        epochs = min(low, policy.max_useful_epochs)
        return row(fits(epochs), low, low > policy.max_useful_epochs)
    # Part of one epoch: the most batches (at least one optimizer step's) that fit.
    low, high = schedule.grad_accum - 1, schedule.batches_per_epoch
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(1, middle) is not None else (low, middle)
    if low < schedule.grad_accum:
        return BudgetRow(budget_seconds, margin_for(costs.expected_error, policy), None, 0, False,
                         needed_seconds=minimum_budget_seconds(costs, schedule, policy), source=source)
    return row(fits(1, low), 0)


def recommendations(costs: RunCosts, schedule: Schedule, budgets_hours: Iterable[float] = DEFAULT_BUDGET_HOURS,
                    policy: BudgetPolicy = BudgetPolicy(), time_budget_seconds: float | None = None) -> list[BudgetRow]:
    """The recommendation table, one row per budget, and a row of its own for `time_budget_seconds`
    (--time-budget) when given and not already a row of the table."""
    rows = [recommend(hours * 3600, costs, schedule, policy) for hours in budgets_hours]
    if time_budget_seconds is not None:
        rows.append(recommend(time_budget_seconds, costs, schedule, policy, source="--time-budget"))
    return rows


def row_for_budget(rows: Sequence[dict[str, Any]], budget_seconds: float) -> dict[str, Any] | None:
    """`--epochs auto`: the benchmark JSON's row for this budget (the --time-budget row first), or None."""
    matching = [row for row in rows if math.isclose(row["budget_hours"] * 3600, budget_seconds, rel_tol=1e-9)]
    matching.sort(key=lambda row: row.get("source") != "--time-budget")
    return matching[0] if matching else None


# ---------------------------------------------------------------------------------------------------------------
# Budgets as text

def format_budget(seconds: float) -> str:
    """'30 minutes', '1 hour', '2 hours', '45 seconds', '1.5 hours'."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size:
            value = round(seconds / size, 2)
            return f"{value:g} {unit}" + ("" if value == 1 else "s")
    value = round(seconds, 1)
    return f"{value:g} second" + ("" if value == 1 else "s")


def _budget_flag(seconds: float) -> str:
    """A --time-budget value at least `seconds`, rounded up to a readable unit."""
    if seconds >= 3600:
        return f"{math.ceil(seconds / 360) / 10:g}h"
    if seconds >= 120:
        return f"{math.ceil(seconds / 60)}m"
    return f"{math.ceil(seconds)}s"


def format_seconds(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else (
        f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s")


def _unit(seconds: float) -> tuple[str, float, int]:
    """One unit for a whole line, chosen by its total: hours from 6 minutes, else minutes, else seconds."""
    if seconds >= 360:
        return "h", 3600.0, 2
    if seconds >= 60:
        return "min", 60.0, 1
    return "s", 1.0, 1


def format_plan(plan: RunPlan, margin: float | None = None) -> str:
    """'~1.78 h: training 1.55 h, evaluation 0.17 h, checkpoints 0.04 h, start-up 0.02 h; 10% margin'."""
    return format_breakdown(plan.breakdown, plan.counts.evaluations > 0, margin)


def format_breakdown(breakdown: dict[str, float], evaluates: bool = True, margin: float | None = None) -> str:
    """format_plan from the parts' seconds (a benchmark JSON row's `breakdown`), in one unit for the line."""
    total = sum(breakdown.values())
    name, size, digits = _unit(total)

    def shown(value: float) -> str:
        return f"{value / size:.{digits}f} {name}"

    parts = [f"training {shown(breakdown['training'])}"]
    parts.append(f"evaluation {shown(breakdown['evaluation'])}" if evaluates else "no evaluation")
    parts += [f"checkpoints {shown(breakdown['checkpoints'])}", f"start-up {shown(breakdown['startup'])}"]
    text = f"~{shown(total)}: {', '.join(parts)}"
    return text + ("" if margin is None else f"; {margin:.0%} margin")


def format_row_fields(budget_seconds: float, epochs: int, max_batches: int | None, breakdown: dict[str, float] | None,
                      evaluates: bool, margin: float, fits_epochs: int = 0, capped: bool = False,
                      needed_seconds: float | None = None) -> str:
    """format_row from a row's plain fields (what the benchmark's JSON keeps)."""
    head = f"{format_budget(budget_seconds)} ->"
    if breakdown is None:
        return f"{head} too short: the smallest run needs {format_seconds(needed_seconds or 0)}"
    detail = format_breakdown(breakdown, evaluates, margin)
    if max_batches is not None:
        return f"{head} part of an epoch: --epochs 1 --max-batches {max_batches} ({detail})"
    line = f"{head} {epochs} epoch{'' if epochs == 1 else 's'} ({detail})"
    if capped:
        line += f"  * {fits_epochs} fit; returns diminish after ~5-8 epochs"
    return line


def format_row(row: BudgetRow) -> str:
    """`2 hours -> 6 epochs (~1.78 h: training 1.55 h, evaluation 0.17 h, checkpoints 0.04 h, start-up 0.02 h;
    10% margin)`, and the partial-epoch, capped and too-short forms."""
    plan = row.plan
    return format_row_fields(row.budget_seconds, row.epochs, row.max_batches,
                             None if plan is None else plan.breakdown,
                             plan is not None and plan.counts.evaluations > 0, row.margin, row.fits_epochs,
                             row.capped, row.needed_seconds)


# ---------------------------------------------------------------------------------------------------------------
# Planned against measured (the trainer's end of run)

@dataclass
class MeasuredRun:
    """What a run spent, part by part, as the trainer measures it (seconds). `run_seconds`: process start to
    exit; whatever the parts do not cover (banner, epoch-end bookkeeping, exit) is `other`."""
    run_seconds: float = 0.0
    startup: float = 0.0
    training: float = 0.0
    evaluation: float = 0.0
    checkpoints: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, float]:
        return {part: getattr(self, part) for part in PARTS}

    @property
    def other(self) -> float:
        return self.run_seconds - sum(self.breakdown.values())


def run_record(measured: MeasuredRun, plan: RunPlan | None, budget_seconds: float | None = None) -> dict[str, Any]:
    """The `"kind": "run"` line that ends metrics.jsonl: the measured breakdown and, when there was a plan, the
    plan beside it with the whole-run error."""
    record: dict[str, Any] = {"kind": "run", "run_seconds": round(measured.run_seconds, 3),
                              "breakdown": {k: round(v, 3) for k, v in measured.breakdown.items()},
                              "other_seconds": round(measured.other, 3), "counts": dict(measured.counts)}
    if budget_seconds is not None:
        record["budget_seconds"] = budget_seconds
    if plan is not None:
        record["plan"] = {"planned_seconds": round(plan.planned_seconds, 3),
                          "breakdown": {k: round(v, 3) for k, v in plan.breakdown.items()},
                          "counts": vars(plan.counts).copy()}
        record["plan_error"] = round(measured.run_seconds / plan.planned_seconds - 1, 4)
    return record


def format_comparison(measured: MeasuredRun, plan: RunPlan | None) -> list[str]:
    """The end-of-run summary lines: each part planned against measured, then the whole run."""
    if plan is None:
        return [f"  run time     {format_seconds(measured.run_seconds)}: "
                + ", ".join(f"{part.replace('startup', 'start-up')} {format_seconds(value)}"
                            for part, value in measured.breakdown.items())]
    lines = ["  planned against measured:"]
    for part in PARTS:
        planned, actual = getattr(plan, part), getattr(measured, part)
        change = f" ({actual / planned - 1:+.1%})" if planned > 0 else ""
        lines.append(f"    {part.replace('startup', 'start-up'):<12} {format_seconds(planned):>10} planned, "
                     f"{format_seconds(actual):>10} measured{change}")
    lines.append(f"    {'other':<12} {'':>10}          {format_seconds(measured.other):>10} measured")
    lines.append(f"    {'whole run':<12} {format_seconds(plan.planned_seconds):>10} planned, "
                 f"{format_seconds(measured.run_seconds):>10} measured "
                 f"({measured.run_seconds / plan.planned_seconds - 1:+.1%})")
    return lines
