"""What a run costs besides its training steps, measured on the device with the code the trainer runs.

run_budget.py plans a whole run from these numbers; the benchmark (measure_throughput.py) measures them after
timing the training steps, the trainer can measure its own start-up the same way.

  * Evaluation. The trainer greedy-decodes the evaluation set `--eval-batch-size` prompts at a time, shortest
    prompts first (evaluation.evaluate). `evaluation_pass` lists exactly those batches. `measure_evaluation`
    decodes a sample of them for real (model.generate_token_batch), each row to its KNOWN answer's length
    (`exact_new_tokens`: an untrained or random model stops at the wrong place, a trained one writes the
    answer and its EOS), fits seconds = a x batches + b x prompt tokens + c x generated tokens + d x attended
    positions (non-negative least squares; computed work: rows x the longest prompt, rows x the batch's decode
    steps, since every row runs until the batch's longest answer ends, and the cache positions those steps
    read), and projects one pass: the timed batches at their
    measured time, the others predicted. With --eval-attempts 2 the second attempts (augmented views) are
    planned for every input, an upper bound.
  * Checkpoints. `measure_saves` writes one real checkpoint (model, optimizer, scheduler, step and RNG state,
    through checkpointing.save_checkpoint) and one final model (model.save_model) into a temporary folder on
    the output folder's file system, times both and removes the folder.
  * Start-up. `process_start_time` is when this process started (from /proc/self/stat, on the
    time.monotonic clock), so both scripts measure "process start to the first step" the same way;
    `startup_seconds` adds the one-off extra of the first steps (compiling) to it.

The benchmark's own added time. `measurement_allowance` keeps the added measurements (saves, then
evaluation) under a share (9%, so that it stays under 10%) of the benchmark's total: the saves are timed
first (one of each is the least that measures them), and evaluation gets what is left; it times the cheapest
batch of the typical row count first, then batches spread over the pass (median, longest, shortest,
quartiles, ...), each only if its predicted time fits what remains.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import checkpointing
import evaluation
from arc_dataset import MAX_TARGET_TOKENS, Task, augment_sample, evaluation_samples, grid_tokens
from model import generate_token_batch, save_model

# The benchmark's own added time (saves, plot, evaluation) is planned at this share of its total, so that it
# stays under 10% when the last timed batch runs past its prediction (at 10% it landed at 9.9-10.0%).
MEASUREMENT_SHARE = 0.09
# Assumed error of a predicted (untimed) batch when fewer than 4 were timed, too few to check the fit on held-out
# ones. On this project's loaded 2-core CPU (tiny model) a 2-batch fit missed the third batch by ~+40%.
ASSUMED_FIT_ERROR = 0.5

# ---------------------------------------------------------------------------------------------------------------
# Start-up

_IMPORTED = time.monotonic()


def process_start_time() -> float:
    """When this process started, on the time.monotonic() clock (Linux: /proc/self/stat's start time; 10 ms
    resolution). Elsewhere, when this module was imported (later: imports before it are not counted)."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22, 'starttime': clock ticks after boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        age = since_boot - started_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < since_boot:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return _IMPORTED


def startup_seconds(first_step_at: float, process_started: float | None = None, first_steps_seconds: float = 0.0,
                    first_steps_steady_seconds: float = 0.0) -> float:
    """Process start to the first training step (`first_step_at`, time.monotonic()), plus the one-off extra of
    the first steps (their measured seconds beyond what the steady-state cost model predicts for them:
    compiling under --compile, the allocator's first growth). The benchmark passes its warm-up and graph-variant
    steps; a run's start-up is then what it pays once before its steps run at the projected speed."""
    started = process_start_time() if process_started is None else process_started
    return (first_step_at - started) + max(0.0, first_steps_seconds - first_steps_steady_seconds)


def measurement_allowance(benchmark_seconds: float, spent_seconds: float = 0.0,
                          share: float = MEASUREMENT_SHARE) -> float:
    """Seconds the added measurements may still take so that all of them (`spent_seconds` already) stay under
    `share` of the benchmark's total: added <= share x (benchmark + added)."""
    return max(0.0, share / (1 - share) * benchmark_seconds - spent_seconds)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the pass, its batches, the cost model

def answer_tokens(target: np.ndarray) -> int:
    """Tokens a model writes for this answer: its rows, each with a row end, then EOS."""
    return int(len(grid_tokens(target))) + 1


@dataclass(frozen=True)
class EvalBatch:
    """One decode call of an evaluation pass: its prompts and the length of each known answer."""
    attempt: int                       # 1, or 2 for the second attempt (an augmented view)
    prompts: tuple[torch.Tensor, ...]
    answers: tuple[int, ...]           # tokens of each row's known answer, EOS included
    views: int = 1                     # --eval-views K: each input's K views are rows of the same call

    @property
    def inputs(self) -> int:
        """Test inputs this call answers (its rows are their views)."""
        return self.rows // self.views if self.attempt == 1 else 0

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        """Computed prompt tokens: every row is left-padded to the longest prompt."""
        return self.rows * max(int(p.numel()) for p in self.prompts)

    @property
    def decode_steps(self) -> int:
        """Tokens the batch generates per row: it runs until its longest answer ends (capped like evaluation)."""
        return min(max(self.answers), MAX_TARGET_TOKENS)

    @property
    def generated_tokens(self) -> int:
        """Computed generated tokens: every row runs every step."""
        return self.rows * self.decode_steps

    @property
    def attended_positions(self) -> int:
        """Cache positions the decode steps read: each of the rows attends to its prompt and what it wrote so
        far, rows x steps x (longest prompt + steps / 2). On a CPU this term dominates long prompts (the tiny
        model's 8 x 6519-token batch with 931-token answers: 31.7 s of a 52.8 s pass)."""
        return int(self.rows * self.decode_steps * (self.prompt_tokens // self.rows + self.decode_steps / 2))

    def features(self) -> tuple[float, float, float, float]:
        return 1.0, float(self.prompt_tokens), float(self.generated_tokens), float(self.attended_positions)


def evaluation_pass(tasks: Sequence[Task], max_length: int, batch_size: int, attempts: int = 1,
                    seed: int = 0, views: int = 1) -> list[EvalBatch]:
    """The decode calls of one evaluation pass, in the order evaluation.evaluate makes them: test inputs
    sorted by prompt length, `batch_size` at a time, each batch's second attempts (attempts=2) right after it,
    here for every input of the batch (an upper bound: evaluate retries only the wrong ones). With `views` K > 1,
    max(1, batch_size // K) inputs per call, each with the real prompts of its K views (views.task_views) and
    their answers' lengths (a rotated grid has another row count); evaluate makes no second attempts then."""
    samples = evaluation_samples(tasks)
    if any(s.target is None for s in samples):
        raise ValueError("every evaluation input needs a known answer (use evaluation.tasks_with_answers)")
    prompts = [evaluation.prompt(s, max_length) for s in samples]
    by_length = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    if views > 1:
        return [_views_batch([samples[i] for i in by_length[first:first + max(1, batch_size // views)]],
                             max_length, views, seed)
                for first in range(0, len(by_length), max(1, batch_size // views))]
    batches = []
    for first in range(0, len(by_length), batch_size):
        indices = by_length[first:first + batch_size]
        batches.append(EvalBatch(1, tuple(prompts[i] for i in indices),
                                 tuple(answer_tokens(samples[i].target) for i in indices)))
        if attempts == 2:
            views_ = [evaluation.second_attempt_view(samples[i], seed) for i in indices]
            batches.append(EvalBatch(2, tuple(evaluation.prompt(samples[i], max_length, v)
                                              for i, v in zip(indices, views_)),
                                     tuple(answer_tokens(augment_sample(samples[i], v).target)
                                           for i, v in zip(indices, views_))))
    return batches


def _views_batch(samples: Sequence[Any], max_length: int, views: int, seed: int) -> EvalBatch:
    """One predict_samples call: every sample under its first `views` views, all rows together."""
    from views import task_views

    prompts, answers = [], []
    for sample in samples:
        for view in task_views(sample, views, seed):
            prompts.append(evaluation.prompt(sample, max_length, view))
            answers.append(answer_tokens(sample.target if view.is_identity else augment_sample(sample, view).target))
    return EvalBatch(1, tuple(prompts), tuple(answers), views)


def prediction_pass(tasks: Sequence[Task], max_length: int, views: int, seed: int = 0) -> list[EvalBatch]:
    """The decode calls of `evaluation.py --submission` over `tasks`: one per task, its test inputs under `views`
    views each (run_prediction's predict_samples call). Known answers give the decode lengths."""
    return [_views_batch(evaluation_samples([task]), max_length, views, seed) for task in tasks]


def scoring_seconds(batches: Sequence[EvalBatch], model: "EvalCostModel") -> float:
    """Candidate scoring planned for views > 1 (evaluation.rerank): one teacher-forced pass per call over its
    rows, prompt and answer (what scoring one candidate per input costs); no decode steps. It runs only where
    the views disagree, so this is an estimate from the fitted prompt cost, not a timing."""
    return math.fsum(model.per_batch + model.per_prompt_token * (b.prompt_tokens + b.generated_tokens)
                     for b in batches if b.views > 1)


def nonnegative_least_squares(features: np.ndarray, targets: np.ndarray, max_terms: int | None = None) -> np.ndarray:
    """min ||X c - y|| with c >= 0, exactly, for a few columns: the best unconstrained fit over every subset of
    at most `max_terms` columns whose coefficients are all non-negative (the optimum is one of them)."""
    features = np.asarray(features, dtype=float)
    targets = np.asarray(targets, dtype=float)
    columns = features.shape[1]
    scale = np.maximum(np.abs(features).max(axis=0), 1e-12)  # conditioning: tokens are ~1e3 times batches
    scaled = features / scale
    best, best_residual = np.zeros(columns), float(np.sum(targets ** 2))
    for size in range(1, min(columns, max_terms or columns) + 1):
        for subset in itertools.combinations(range(columns), size):
            coef, *_ = np.linalg.lstsq(scaled[:, subset], targets, rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((scaled[:, subset] @ coef - targets) ** 2))
            if residual < best_residual * (1 - 1e-9) - 1e-15:
                best = np.zeros(columns)
                best[list(subset)] = coef
                best_residual = residual
    return best / scale


@dataclass(frozen=True)
class EvalCostModel:
    """Seconds of one decode call = per_batch + per_prompt_token x prompt tokens + per_generated_token x
    generated tokens + per_attended_position x attended positions (computed work, see EvalBatch)."""
    per_batch: float
    per_prompt_token: float
    per_generated_token: float
    per_attended_position: float = 0.0

    @classmethod
    def fit(cls, batches: Sequence[EvalBatch], seconds: Sequence[float]) -> "EvalCostModel":
        """Non-negative least squares with at most one term fewer than timed batches (a residual is left to
        tell the terms apart); one timed batch: seconds per generated token (decoding is one step per token,
        the prompt one parallel pass)."""
        if not batches:
            raise ValueError("no timed batches to fit")
        x = np.array([b.features() for b in batches])
        y = np.asarray(seconds, dtype=float)
        if len(batches) == 1:
            return cls(0.0, 0.0, float(y[0] / max(1.0, x[0, 2])), 0.0)
        return cls(*(float(c) for c in nonnegative_least_squares(x, y, max_terms=len(batches) - 1)))

    def predict(self, batch: EvalBatch) -> float:
        return float(np.dot(self.coefficients, batch.features()))

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        return self.per_batch, self.per_prompt_token, self.per_generated_token, self.per_attended_position

    def as_json(self) -> dict[str, float]:
        return {"per_batch": self.per_batch, "per_prompt_token": self.per_prompt_token,
                "per_generated_token": self.per_generated_token, "per_attended_position": self.per_attended_position}

    def describe(self) -> str:
        return (f"{self.per_batch * 1e3:.3g} ms per batch + {self.per_prompt_token * 1e6:.3g} us per prompt token "
                f"+ {self.per_generated_token * 1e6:.3g} us per generated token + "
                f"{self.per_attended_position * 1e9:.3g} ns per attended position")


def project_pass(batches: Sequence[EvalBatch], model: EvalCostModel, timed: dict[int, float]) -> float:
    """One pass's seconds: `timed` batches (index -> measured seconds) as measured, the others predicted."""
    return math.fsum(timed[i] if i in timed else model.predict(b) for i, b in enumerate(batches))


def sampling_order(costs: Sequence[float], rows: Sequence[int] | None = None) -> list[int]:
    """Batch indices in the order to time them: first the cheapest batch of the most common row count (with
    `rows`; the pass's typical shape: a lone timed batch is scaled to all the others, and a short last batch
    is not typical of them: decoding 4 rows cost the tiny CPU model 7.7 ms, 8 rows 9.0 ms, not twice that),
    then the median, the dearest, the cheapest, the quartiles, eighths, ... of the batches sorted by cost,
    so any prefix of the order spans the pass."""
    ranked = sorted(range(len(costs)), key=lambda i: costs[i])
    n = len(ranked)
    if n == 0:
        return []
    order: list[int] = []
    if rows is not None:
        counts = Counter(rows)
        typical = max(counts, key=lambda r: (counts[r], r))
        order.append(next(i for i in ranked if rows[i] == typical))
    for position in [(n - 1) // 2, n - 1, 0] + [int(round(f * (n - 1))) for f in _dyadic_fractions(n)]:
        if ranked[position] not in order:
            order.append(ranked[position])
    order += [i for i in ranked if i not in order]
    return order


def _dyadic_fractions(n: int) -> list[float]:
    fractions, denominator = [], 4
    while denominator <= 2 * n:
        fractions += [k / denominator for k in range(1, denominator, 2)]
        denominator *= 2
    return fractions


@dataclass
class EvalMeasurement:
    """What measure_evaluation found: one pass's projected seconds and how it got there."""
    pass_seconds: float
    model: EvalCostModel
    batches: int                          # decode calls in one pass
    timed: dict[int, float] = field(default_factory=dict)   # batch index -> measured seconds
    spent_seconds: float = 0.0            # wall time of the measurement itself, warm-up included
    heldout_error: float | None = None    # leave-one-out relative error of a timed batch's prediction
    inputs: int = 0
    prompt_tokens: int = 0                # of the whole pass (computed)
    generated_tokens: int = 0

    @property
    def expected_error(self) -> float:
        """The pass projection's expected error, a fraction (run_budget.RunCosts.eval_error): its predicted part's
        share times the held-out error of a prediction (ASSUMED_FIT_ERROR when fewer than 4 were timed)."""
        if self.pass_seconds <= 0:
            return 0.0
        predicted = max(0.0, self.pass_seconds - math.fsum(self.timed.values()))
        per_batch = self.heldout_error if self.heldout_error is not None else ASSUMED_FIT_ERROR
        return predicted / self.pass_seconds * per_batch

    def as_json(self) -> dict[str, Any]:
        """What the benchmark stores under "evaluation" in its JSON result."""
        return {"pass_seconds": self.pass_seconds, "expected_error": self.expected_error, "cost_model": self.model.as_json(), "batches": self.batches,
                "timed_batches": len(self.timed), "timed_seconds": math.fsum(self.timed.values()),
                "spent_seconds": self.spent_seconds, "heldout_error": self.heldout_error, "inputs": self.inputs,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model: torch.nn.Module, batch: EvalBatch, precision: Any = None) -> float:
    """Seconds of one real decode call of `batch`, every row written to its known answer's length."""
    device = next(model.parameters()).device
    _synchronize(device)
    start = time.perf_counter()
    out = generate_token_batch(model, list(batch.prompts), MAX_TARGET_TOKENS, precision,
                               exact_new_tokens=batch.answers)
    _synchronize(device)
    seconds = time.perf_counter() - start
    assert [len(t) for t in out] == [min(a, MAX_TARGET_TOKENS) for a in batch.answers]
    return seconds


def measure_evaluation(model: torch.nn.Module, batches: Sequence[EvalBatch], *, precision: Any = None,
                       time_limit: float = math.inf, max_batches: int | None = None, progress: bool = True,
                       clock: Callable[[EvalBatch], float] | None = None,
                       desc: str = "Timing evaluation") -> EvalMeasurement:
    """Time real decoding of a sample of `batches` (evaluation_pass) within `time_limit` seconds and project
    one pass. The first batch of `sampling_order` is always timed (after an untimed warm-up decode in its
    shape, so one-off costs do not enter the fit); every further one is timed only if its predicted seconds
    fit what is left of the limit. `clock` replaces the real decode (tests)."""
    if not batches:
        raise ValueError("no evaluation batches")
    clock = clock or (lambda b: time_decode(model, b, precision))
    began = time.perf_counter()
    proxy = [float(b.prompt_tokens + b.generated_tokens) for b in batches]
    order = sampling_order(proxy, [b.rows for b in batches])
    if max_batches is not None:
        order = order[:max(1, max_batches)]
    first = batches[order[0]]
    # Warm-up in the first timed batch's shape (all its rows, two tokens each): the first call of a shape pays
    # one-offs (allocations; 2.5 ms of the tiny CPU model's 9 ms batch), the run pays them once, not per batch.
    clock(EvalBatch(first.attempt, first.prompts, tuple(min(2, a) for a in first.answers), first.views))
    timed: dict[int, float] = {}
    from tqdm import tqdm
    bar = tqdm(total=len(order), desc=desc, unit="batch", file=sys.stderr, leave=False,
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for index in order:
            if timed:
                left = time_limit - (time.perf_counter() - began)
                if _cautious_prediction(batches, timed, batches[index]) > left:
                    bar.update(1)
                    continue
            timed[index] = clock(batches[index])
            bar.update(1)
            bar.set_postfix_str(f"{len(timed)} timed, ~{time.perf_counter() - began:.0f} s", refresh=False)
    finally:
        bar.close()
    indices = list(timed)
    fitted = EvalCostModel.fit([batches[i] for i in indices], [timed[i] for i in indices])
    heldout = None
    if len(indices) >= 4:
        errors = []
        for k in indices:
            rest = [i for i in indices if i != k]
            prediction = EvalCostModel.fit([batches[i] for i in rest], [timed[i] for i in rest]).predict(batches[k])
            errors.append((prediction - timed[k]) / timed[k])
        heldout = float(np.sqrt(np.mean(np.square(errors))))
    return EvalMeasurement(pass_seconds=project_pass(batches, fitted, timed), model=fitted, batches=len(batches),
                           timed=timed, spent_seconds=time.perf_counter() - began, heldout_error=heldout,
                           inputs=sum(b.inputs for b in batches),
                           prompt_tokens=sum(b.prompt_tokens for b in batches),
                           generated_tokens=sum(b.generated_tokens for b in batches))


def _cautious_prediction(batches: Sequence[EvalBatch], timed: dict[int, float], batch: EvalBatch) -> float:
    """Seconds `batch` may take, to decide whether timing it stays inside the limit: the fit once 4 batches are
    timed; before that the largest of the one-term models scaled to the timed batches (which term dominates,
    decode steps on a GPU or cache reads on a CPU, is not known yet)."""
    if len(timed) >= 4:
        return EvalCostModel.fit([batches[i] for i in timed], list(timed.values())).predict(batch)
    spent = math.fsum(timed.values())
    work = np.array([batches[i].features() for i in timed]).sum(axis=0)
    return max(spent * f / w for f, w in zip(batch.features(), work) if w > 0)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the final model

@dataclass(frozen=True)
class SaveTimes:
    """One checkpoint write and one final-model save, timed on the output folder's file system."""
    checkpoint_seconds: float
    checkpoint_bytes: int
    final_save_seconds: float
    final_save_bytes: int
    folder: str            # where they were written (then removed)

    def as_json(self) -> dict[str, Any]:
        return {"checkpoint_seconds": self.checkpoint_seconds, "checkpoint_bytes": self.checkpoint_bytes,
                "final_save_seconds": self.final_save_seconds, "final_save_bytes": self.final_save_bytes,
                "folder": self.folder}


def _existing_folder(path: Path) -> Path:
    """`path` or its nearest existing parent (the run folder may not exist yet: it is on the same file system)."""
    path = Path(path).absolute()
    while not path.is_dir():
        path = path.parent
    return path


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure_saves(output_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any = None, train_step: Any = None, meta: dict[str, Any] | None = None) -> SaveTimes:
    """Write one real checkpoint and one final model into a temporary folder beside `output_dir` (its nearest
    existing folder), time each, and remove the folder. The optimizer must have stepped (AdamW creates its
    moments at the first step; before it a checkpoint is a third of its real size)."""
    if not optimizer.state:
        raise ValueError("the optimizer has no state yet: time the saves after a training step")
    device = next(model.parameters()).device
    folder = Path(tempfile.mkdtemp(prefix=".run-costs-", dir=_existing_folder(Path(output_dir))))
    try:
        _synchronize(device)
        start = time.perf_counter()
        state = checkpointing.training_state(model, optimizer, scheduler, train_step)
        written = checkpointing.save_checkpoint(folder / checkpointing.CHECKPOINT_DIR, 0, state,
                                                dict(meta or {}, reason="timing"), keep=1)
        checkpoint_seconds = time.perf_counter() - start
        checkpoint_bytes = _folder_bytes(written)
        start = time.perf_counter()
        final = save_model(model, folder / "model", {"reason": "timing"})
        final_seconds = time.perf_counter() - start
        return SaveTimes(checkpoint_seconds, checkpoint_bytes, final_seconds, _folder_bytes(final), str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def time_call(function: Callable[[], Any]) -> float:
    """Seconds of one call (e.g. a redraw of the training-curves plot for RunCosts.plot_seconds)."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start
