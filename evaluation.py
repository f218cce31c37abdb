"""Exact-match evaluation and prediction on ARC test inputs, greedy or voted over augmented views, and the
command that writes a Kaggle submission.

One code path (`predict_samples`) serves the trainer's evaluation (`evaluate`) and the submission CLI. Each
test input is decoded greedily under K views (views.task_views: view 0 the task as it is, the others a
rotation/flip, a colour permutation keeping 0 and a shuffled demonstration order), the K decodes of a test
input in one batch; each output is mapped back through its view, identical grids are grouped, and the
candidates are ranked by votes, ties (or the whole order, `score="product"`) decided by the candidate's
teacher-forced log-probability summed over all K views (the ARChitects' augmentation scoring). Attempts 1
and 2 are the two best distinct grids. A test input is right when its expected output is one of them; a
task is solved when all its test inputs are right.

Scores an evaluation reports (EvalResult.metrics(), one metrics.jsonl line per evaluation):
  eval_accuracy          per test input, as before: the greedy answer (view 0), pass@1; with --eval-attempts
                         2, right if view 0 or view 1 (a fixed augmented view, mapped back) is right
  eval_greedy_accuracy   per test input: view 0 alone (pass@1 greedy decoding)
  eval_pass2_voted       per test input: the expected output among the two best-ranked grids over all views
  eval_task_pass2_voted  per task: every test input right by eval_pass2_voted
  eval_views             K; eval_scoring "votes" or "product"
With one view the voted attempts are the decodes made (view 0, and view 1 for --eval-attempts 2).
The trainer's `--eval-views K` is one more keyword of the call it makes today:
`evaluate(model, tasks, max_length=, precision=, device=, attempts=, seed=, batch_size=, should_stop=,
progress=, views=K, score="votes")`; `batch_size` stays the rows per decode call (8 views of one input).

The KV cache is not shared between views: each view permutes the colours, rotates every grid and
reorders the demonstrations, so two views' prompts share only their first token (BOS). The one shared
prefix is a view's prompt when scoring several candidates under it; that scoring is a single forward
pass per chunk (no decode loop), and it runs only when three or more candidates compete for the two
attempts, so it is not worth a cache (benchmarks/voting_and_ttt.py reports its share of the time).

The three Kaggle steps (the budgets are examples for a 12-hour session, not measured on a T4):

    # 1. train on ARC training data (the trainer stops inside its budget and saves runs/base/model)
    python trainloop_gpu_finetuned.py --data arc-agi-2 --epochs auto --time-budget 5h \
        --throughput-json results.json --device cuda --output-dir runs/base
    # 2. test-time train on the test challenges' own train pairs (leave-one-out; no solutions, so no evaluation)
    python trainloop_gpu_finetuned.py --model-name runs/base/model --data arc-agi_test_challenges.json \
        --eval-tasks 0 --epochs 3 --time-budget 4h --device cuda --output-dir runs/ttt
    # 3. predict: 8 views voted, a valid submission.json whatever happens within the budget
    python evaluation.py --model runs/ttt/model --data arc-agi_test_challenges.json --submission submission.json \
        --views 8 --time-budget 2h

The submission command (CPU example first; on a GPU the default is 8 views, on a CPU 1):

    python evaluation.py --model runs/x/model --data data/arc-agi_test_challenges.json --submission submission.json
    python evaluation.py --model runs/x/checkpoints/step-00001000 --data data/arc-agi_evaluation_challenges.json \\
        --submission submission.json --views 8 --time-budget 2h --json scores.json    # solutions found beside
    python evaluation.py --check submission.json [--data data/arc-agi_test_challenges.json]
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while torch loads is "interrupted", exit 130
    from errors import quiet_interrupts
    quiet_interrupts()

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from arc_dataset import (EOS, MAX_TARGET_TOKENS, Augmentation, Sample, Task, augment_sample, encode_prompt,
                         evaluation_samples, grid_tokens)
from errors import UserError
from model import generate_grids, sequence_log_probs
from views import SCORES, Candidate, group_candidates, needs_scores, rank_candidates, second_attempt_view, task_views

__all__ = ["EvalResult", "Prediction", "evaluate", "merge_results", "predict_samples", "tasks_with_answers",
           "second_attempt_view", "main"]


@dataclass
class EvalResult:
    """Counts from one evaluation; accuracies are fractions in [0, 1]."""
    attempts: int
    views: int = 1
    score: str = "votes"
    num_inputs: int = 0
    correct_inputs: int = 0          # right within `attempts` greedy tries (view 0, then view 1)
    correct_first: int = 0           # right on the first try (greedy pass@1, view 0)
    correct_voted: int = 0           # expected output among the two best-ranked grids over all views
    num_tasks: int = 0
    solved_tasks: int = 0            # every test input right within `attempts` tries
    solved_voted_tasks: int = 0      # every test input right by the voted pass@2
    malformed: int = 0               # decodes whose output was not a grid
    scored_inputs: int = 0           # test inputs whose candidates needed log-probability scoring
    scoring_seconds: float = 0.0     # of `seconds`, spent scoring candidates (teacher-forced forward passes)
    seconds: float = 0.0
    solved: dict[str, bool] = field(default_factory=dict)
    solved_voted: dict[str, bool] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct_inputs / self.num_inputs if self.num_inputs else 0.0

    @property
    def first_attempt_accuracy(self) -> float:
        return self.correct_first / self.num_inputs if self.num_inputs else 0.0

    @property
    def voted_accuracy(self) -> float:
        return self.correct_voted / self.num_inputs if self.num_inputs else 0.0

    @property
    def task_accuracy(self) -> float:
        return self.solved_tasks / self.num_tasks if self.num_tasks else 0.0

    @property
    def voted_task_accuracy(self) -> float:
        return self.solved_voted_tasks / self.num_tasks if self.num_tasks else 0.0

    def metrics(self) -> dict[str, float | int | str]:
        """The fields a metrics.jsonl line carries (the module docstring says what each means)."""
        out: dict[str, float | int | str] = {
            "eval_accuracy": round(self.accuracy, 6),
            "eval_task_accuracy": round(self.task_accuracy, 6),
            "eval_greedy_accuracy": round(self.first_attempt_accuracy, 6),
            "eval_pass2_voted": round(self.voted_accuracy, 6),
            "eval_task_pass2_voted": round(self.voted_task_accuracy, 6),
            "eval_views": self.views,
            "eval_scoring": self.score,
            "eval_inputs": self.num_inputs,
            "eval_tasks": self.num_tasks,
            "eval_attempts": self.attempts,
            "eval_malformed": self.malformed,
            "eval_seconds": round(self.seconds, 3),
        }
        if self.attempts > 1:
            out["eval_pass1_accuracy"] = round(self.first_attempt_accuracy, 6)
        return out

    def describe(self) -> str:
        """One line for the console."""
        text = (f"{self.correct_inputs}/{self.num_inputs} test inputs ({self.accuracy:.1%}), "
                f"{self.solved_tasks}/{self.num_tasks} tasks ({self.task_accuracy:.1%})")
        if self.attempts > 1:
            text += f" with 2 attempts; first attempt {self.first_attempt_accuracy:.1%}"
        if self.views > 1:
            text += (f"; {self.views}-view voted pass@2 {self.correct_voted}/{self.num_inputs} "
                     f"({self.voted_accuracy:.1%}), {self.solved_voted_tasks} tasks")
        if self.malformed:
            text += f"; {self.malformed} outputs were not grids"
        return f"{text} [{self.seconds:.0f} s]"


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from the results of disjoint shares of the tasks (evaluation split over torchrun processes):
    the counts add up, each task's verdict comes from the share that held it, and the time is the slowest
    share's (the others wait for it)."""
    if not parts:
        raise ValueError("no results to merge")
    merged = EvalResult(attempts=parts[0].attempts, views=parts[0].views, score=parts[0].score)
    for part in parts:
        for name in ("num_inputs", "correct_inputs", "correct_first", "correct_voted", "num_tasks",
                     "solved_tasks", "solved_voted_tasks", "malformed", "scored_inputs", "scoring_seconds"):
            setattr(merged, name, getattr(merged, name) + getattr(part, name))
        merged.solved.update(part.solved)
        merged.solved_voted.update(part.solved_voted)
    merged.seconds = max(part.seconds for part in parts)
    return merged


def tasks_with_answers(tasks: Sequence[Task], limit: int | None = None) -> list[Task]:
    """The tasks whose test outputs are all known (only those can be scored), the first `limit` of them."""
    usable = [task for task in tasks if task.test and all(out is not None for _, out in task.test)]
    return usable if limit is None else usable[:limit]


def prompt(sample: Sample, max_length: int, view: Augmentation | None = None) -> torch.Tensor:
    """The generation prompt of a sample, seen through `view` (an augmentation) or as it is."""
    plain = view is None or view.is_identity
    return torch.from_numpy(encode_prompt(sample if plain else augment_sample(sample, view), max_length))


def predict(model: torch.nn.Module, prompts: Sequence[torch.Tensor], precision,
            views: Sequence[Augmentation | None],
            should_stop: Callable[[], bool] | None = None) -> list[np.ndarray | None]:
    """Greedy predictions for prompts decoded together, each mapped back through the view it was built with
    (None: none), None where the output is not a grid. `should_stop` ends decoding early (a deadline)."""
    if should_stop is None:
        grids = generate_grids(model, prompts, MAX_TARGET_TOKENS, precision)
    else:
        grids = generate_grids(model, prompts, MAX_TARGET_TOKENS, precision, should_stop=should_stop)
    return [g if g is None or v is None else v.invert(g) for g, v in zip(grids, views)]


@dataclass
class Prediction:
    """What the views of one test input produced, and the ranking that gives its two attempts."""
    sample: Sample
    views: list[Augmentation]
    prompts: list[torch.Tensor]
    grids: list[np.ndarray | None]           # each view's output mapped back (None: not a grid)
    ranked: list[Candidate] = field(default_factory=list)
    scored: bool = False                     # log-probabilities were computed for the candidates

    @property
    def greedy(self) -> np.ndarray | None:
        """View 0's answer: plain greedy decoding."""
        return self.grids[0] if self.grids else None

    @property
    def attempts(self) -> list[np.ndarray]:
        """The two best distinct grids (fewer when fewer were decoded)."""
        return [c.grid for c in self.ranked[:2]]

    def right(self, target: np.ndarray) -> bool:
        return any(np.array_equal(g, target) for g in self.attempts)


def _score_candidates(model: torch.nn.Module, predictions: Sequence[Prediction], precision) -> None:
    """Summed teacher-forced log-probability of every candidate over all its test input's views, in one
    batched call for all the predictions given."""
    prompts, targets, owners = [], [], []
    for prediction in predictions:
        for candidate in prediction.ranked:
            candidate.log_prob = 0.0
            for view, view_prompt in zip(prediction.views, prediction.prompts):
                tokens = np.append(grid_tokens(view.apply(candidate.grid)), EOS).astype(np.int64)
                prompts.append(view_prompt)
                targets.append(torch.from_numpy(tokens))
                owners.append(candidate)
    for candidate, value in zip(owners, sequence_log_probs(model, prompts, targets, precision)):
        candidate.log_prob += value


def predict_samples(model: torch.nn.Module, samples: Sequence[Sample], *, views: int, max_length: int,
                    precision, seed: int = 0, score: str = "votes",
                    should_stop: Callable[[], bool] | None = None,
                    timings: dict[str, float] | None = None) -> list[Prediction]:
    """Decode every sample under its first `views` views in one batch (all rows together, one KV cache),
    map back, group, score where it matters (views.needs_scores) and rank. The trainer's evaluation and the
    submission CLI both call this; `should_stop` ends the decoding early (rows still running: not grids).
    `timings["scoring"]` (when given) accumulates the seconds spent scoring candidates."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    predictions = []
    for sample in samples:
        sample_views = task_views(sample, views, seed)
        predictions.append(Prediction(sample, sample_views, [prompt(sample, max_length, v) for v in sample_views], []))
    rows = [(p, v) for p in predictions for v in p.views]
    grids = predict(model, [p.prompts[k] for p in predictions for k in range(len(p.views))], precision,
                    [None if v.is_identity else v for _, v in rows], should_stop)
    for (prediction, _), grid in zip(rows, grids):
        prediction.grids.append(grid)
    rerank(model, predictions, precision, score, timings)
    return predictions


def rerank(model: torch.nn.Module, predictions: Sequence[Prediction], precision, score: str,
           timings: dict[str, float] | None = None) -> None:
    """Group each prediction's grids into candidates and rank them, scoring (batched) those that need it."""
    for prediction in predictions:
        prediction.ranked = group_candidates(prediction.grids)
        prediction.scored = needs_scores(prediction.ranked, score)
    to_score = [p for p in predictions if p.scored]
    if to_score:
        start = time.perf_counter()
        _score_candidates(model, to_score, precision)
        if timings is not None:
            timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - start
    for prediction in predictions:
        prediction.ranked = rank_candidates(prediction.ranked, score)


def evaluate(model: torch.nn.Module, tasks: Sequence[Task], *, max_length: int, precision,
             device: torch.device, attempts: int = 1, seed: int = 0, batch_size: int = 8,
             should_stop: Callable[[], bool] | None = None,
             progress: Callable[[int, int], None] | None = None,
             views: int = 1, score: str = "votes") -> EvalResult | None:
    """Exact-match accuracy on the test inputs of `tasks` (call `tasks_with_answers` first): greedy and, with
    `views` > 1, voted pass@2 over that many augmented views (see the module docstring).

    Test inputs are decoded in order of prompt length (little padding), max(1, batch_size // views) inputs
    (each with all its views) per batch; with one view and attempts=2, each batch's wrong first answers get
    a second try under view 1 right after it. Returns None when `should_stop()` turns true part-way
    (Ctrl-C, the time budget): a partial score would not compare with the others. `progress(done, total)`
    is called for each test input once it is scored. The model is put in eval mode and restored to the
    mode it had; `device` is where the model is (decoding follows the model).
    """
    if attempts not in (1, 2):
        raise ValueError(f"attempts must be 1 or 2, got {attempts}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    samples = evaluation_samples(tasks)
    result = EvalResult(attempts=attempts, views=views, score=score, num_tasks=len(tasks))
    per_task: dict[str, list[tuple[bool, bool]]] = {task.task_id: [] for task in tasks}
    lengths = [len(prompt(s, max_length)) for s in samples]
    by_length = sorted(range(len(samples)), key=lambda i: lengths[i])
    per_batch = max(1, batch_size // views)
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for first in range(0, len(by_length), per_batch):
            if should_stop is not None and should_stop():
                return None
            chunk = [samples[i] for i in by_length[first:first + per_batch]]
            predictions = predict_samples(model, chunk, views=views, max_length=max_length, precision=precision,
                                          seed=seed, score=score, timings=timings)
            result.malformed += sum(g is None for p in predictions for g in p.grids)
            if views == 1 and attempts == 2:
                retry = [p for p in predictions if not _equal(p.greedy, p.sample.target)]
                if retry:
                    second = [second_attempt_view(p.sample, seed) for p in retry]
                    second_prompts = [prompt(p.sample, max_length, v) for p, v in zip(retry, second)]
                    grids = predict(model, second_prompts, precision, second)
                    result.malformed += sum(g is None for g in grids)
                    for p, v, q, g in zip(retry, second, second_prompts, grids):
                        p.views.append(v)
                        p.prompts.append(q)
                        p.grids.append(g)
                    rerank(model, retry, precision, score, timings)
            for p in predictions:
                target = p.sample.target
                first_right = _equal(p.greedy, target)
                greedy_right = first_right or (attempts == 2 and len(p.grids) > 1 and _equal(p.grids[1], target))
                voted_right = p.right(target)
                result.num_inputs += 1
                result.correct_first += first_right
                result.correct_inputs += greedy_right
                result.correct_voted += voted_right
                result.scored_inputs += p.scored
                per_task[p.sample.task_id].append((greedy_right, voted_right))
                if progress is not None:
                    progress(result.num_inputs, len(samples))
    finally:
        model.train(was_training)
    result.solved = {t: bool(marks) and all(g for g, _ in marks) for t, marks in per_task.items()}
    result.solved_voted = {t: bool(marks) and all(v for _, v in marks) for t, marks in per_task.items()}
    result.solved_tasks = sum(result.solved.values())
    result.solved_voted_tasks = sum(result.solved_voted.values())
    result.scoring_seconds = timings.get("scoring", 0.0)
    result.seconds = time.perf_counter() - start
    return result


def _equal(grid: np.ndarray | None, target: np.ndarray | None) -> bool:
    return grid is not None and target is not None and np.array_equal(grid, target)


# ------------------------------------------------------------------------------------------ submission CLI

def load_for_inference(path: str | Path) -> tuple[torch.nn.Module, str]:
    """A trained model from a final `model/` folder (model.save_model), a checkpoint folder (step-N/, its
    architecture from meta.json's model_config through transformers' own config class, weights read with
    weights_only; no code from the folder runs), or a run folder (its model/, else its newest checkpoint)."""
    import checkpointing
    from model import VOCAB_FILE, load_saved_model

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder (give a run's model/ folder, a checkpoint "
                        f"step-N/ folder or a run folder)")
    if (folder / VOCAB_FILE).is_file():
        return load_saved_model(folder), f"saved model {folder}"
    if (folder / checkpointing.STATE_FILE).is_file():
        return _model_from_checkpoint(folder), f"checkpoint {folder}"
    if (folder / "model" / VOCAB_FILE).is_file():
        return load_saved_model(folder / "model"), f"saved model {folder / 'model'}"
    latest = checkpointing.latest_checkpoint(folder / checkpointing.CHECKPOINT_DIR)
    if latest is not None:
        return _model_from_checkpoint(latest), f"checkpoint {latest}"
    raise UserError(f"--model {folder}: neither a saved model ({VOCAB_FILE}), a checkpoint "
                    f"({checkpointing.STATE_FILE}) nor a run folder with either")


def _model_from_checkpoint(folder: Path) -> torch.nn.Module:
    import checkpointing
    from arc_dataset import SYMBOLS, VOCAB_SIZE
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    state, meta = checkpointing.load_checkpoint(folder, model_only=True)  # prediction uses the weights only
    values = meta.get("model_config")
    if not isinstance(values, dict):
        raise UserError(f"checkpoint {folder}: meta.json has no model_config")
    if meta.get("vocabulary") not in (None, list(SYMBOLS)):
        raise UserError(f"checkpoint {folder}: its vocabulary differs from this code's {list(SYMBOLS)}")
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or not model_type.startswith("qwen") or model_type not in CONFIG_MAPPING:
        raise UserError(f"checkpoint {folder}: model_type {model_type!r} is not a Qwen architecture that this "
                        f"transformers knows (no remote code is run)")
    values = {k: v for k, v in values.items() if k not in ("auto_map", "model_type")}
    try:
        config = CONFIG_MAPPING[model_type](**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"checkpoint {folder}: model_config cannot build a {model_type} config ({err})") from None
    if config.vocab_size != VOCAB_SIZE:
        raise UserError(f"checkpoint {folder}: vocabulary size {config.vocab_size}, expected {VOCAB_SIZE}")
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"checkpoint {folder}: state.pt holds no model weights")
    if any(".lora_" in key for key in weights):
        raise UserError(f"checkpoint {folder} is a LoRA checkpoint (adapters only, no base weights); predict "
                        f"from the run's final model/ folder, where the adapters are merged")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    try:
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"checkpoint {folder}: its weights do not fit its model_config "
                        f"({str(err).strip().splitlines()[0][:160]})") from None
    return model


@dataclass(frozen=True)
class PredictSettings:
    """The submission run's settings, checked once after parsing."""
    model: str
    data: str
    submission: Path
    solutions: str | None
    views: int | None            # None: 8 on a GPU, 1 on a CPU
    score: str
    time_budget: float | None
    task_cap: float | None
    json_path: Path | None
    device: str
    precision: str
    max_length: int
    seed: int
    strict: bool
    save_every: float


VIEWS_GPU, VIEWS_CPU = 8, 1
SAFETY_SECONDS = 10.0        # kept back from --time-budget for writing the file and the report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from cli_common import Parser, duration_arg, positive_int

    parser = Parser(description=__doc__)  # one-line flag errors, no abbreviations (as the other scripts)
    parser.add_argument("--model", help="a run's final model/ folder, a checkpoint step-N/ folder, or a run folder")
    parser.add_argument("--data", help="the Kaggle *_challenges.json to predict (or any --data format of the trainer)")
    parser.add_argument("--submission", type=Path, help="where to write submission.json (atomically)")
    parser.add_argument("--solutions", help="Kaggle *_solutions.json to score against (default: found beside --data)")
    parser.add_argument("--views", type=positive_int, default=None,
                        help=f"augmented views per test input (default: {VIEWS_GPU} on a GPU, {VIEWS_CPU} on a CPU)")
    parser.add_argument("--score", choices=SCORES, default="votes",
                        help="rank candidates by votes (ties: summed log-probability over the views) or by "
                             "the summed log-probability ('product' of the views' probabilities)")
    parser.add_argument("--time-budget", type=duration_arg, default=None, metavar="DURATION",
                        help="finish within this time (2h, 90m, 45s): fewer views for the remaining tasks "
                             "when time runs short, the fallback when none is left")
    parser.add_argument("--task-cap", type=duration_arg, default=None, metavar="DURATION",
                        help="most time one task may take (default with --time-budget: 3x its fair share of "
                             "the time left)")
    parser.add_argument("--json", type=Path, default=None, help="write the run's report (and scores) as JSON")
    parser.add_argument("--check", type=Path, default=None, metavar="FILE",
                        help="only validate a submission file (against --data's challenges when given)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="auto: bf16 where native, fp16 on GPUs without bf16 (T4), fp32 on CPU")
    parser.add_argument("--max-length", type=positive_int, default=8192,
                        help="longest prompt + answer in tokens; longer prompts drop demonstrations")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    parser.add_argument("--strict", action="store_true", help="stop at the first invalid task in --data")
    parser.add_argument("--save-every", type=float, default=60.0,
                        help="seconds between rewrites of the partial submission (fallbacks for the rest)")
    args = parser.parse_args(argv)
    problems = []
    if args.check is None:
        for flag in ("model", "data", "submission"):
            if getattr(args, flag) is None:
                problems.append(f"--{flag} is required (or give --check FILE)")
    if args.task_cap is not None and args.time_budget is None:
        problems.append("--task-cap goes with --time-budget")
    if problems:
        parser.error("; ".join(problems))
    return args


def _expected_inputs(data: str, tasks: Sequence[Task]) -> dict[str, list[list[list[int]]]]:
    """Task id -> test input grids the submission must answer: every task of a challenges JSON file, those
    the loader skipped as invalid included (with [[0]] for their inputs, so their answers are [[0]], [[0]])."""
    from submission import grid_list

    expected = {t.task_id: [grid_list(inp) for inp, _ in t.test] for t in tasks if t.test}
    path = Path(data)
    if path.is_file():
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            content = None
        if isinstance(content, dict) and "train" not in content:
            full = {}
            for task_id, raw in content.items():
                if task_id in expected:
                    full[task_id] = expected[task_id]
                    continue
                tests = raw.get("test") if isinstance(raw, dict) else None
                if isinstance(tests, list) and tests:
                    full[task_id] = [[[0]]] * len(tests)
            return full
    return expected


@dataclass
class TaskPacer:
    """Spreads --time-budget over the tasks left: each task gets a deadline (`task_cap`, default three times
    its even share of the time left) and as many of the `views` as the measured seconds per row (view x test
    input, a running mean) say fit its share; a task reached with no time left is skipped (fallback answers)."""
    views: int
    deadline: float | None
    tasks: int
    task_cap: float | None = None
    seconds_per_row: float | None = None

    def next_task(self, done: int, inputs: int) -> tuple[int, float | None] | None:
        """(views, deadline) for the next task of `inputs` test inputs, `done` tasks in; None: skip it."""
        if self.deadline is None:
            return self.views, None
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        share = left / (self.tasks - done)
        cap = self.task_cap if self.task_cap is not None else 3 * share
        views = self.views
        if self.seconds_per_row is not None:
            views = max(1, min(self.views, int(share / (self.seconds_per_row * inputs))))
        return views, min(self.deadline, time.monotonic() + cap)

    def record(self, seconds: float, rows: int) -> None:
        rate = seconds / rows
        self.seconds_per_row = rate if self.seconds_per_row is None else 0.7 * self.seconds_per_row + 0.3 * rate


def run_prediction(settings: PredictSettings) -> dict[str, Any]:
    """Predict every test input, write the submission (and partial ones along the way), score it when the
    solutions are known; returns the report."""
    from tqdm import tqdm

    from arc_dataset import load_tasks
    from submission import SubmissionBuilder, write_submission
    from training import resolve_device, resolve_precision

    started = time.monotonic()
    deadline = started + settings.time_budget - SAFETY_SECONDS if settings.time_budget else None
    device = resolve_device(settings.device)
    precision = resolve_precision(device, settings.precision)
    taskset = load_tasks(settings.data, settings.solutions, settings.strict)
    tasks = [task for task in taskset.tasks if task.test]   # a task without test inputs has nothing to answer
    expected = _expected_inputs(settings.data, tasks)
    counts = {task_id: len(inputs) for task_id, inputs in expected.items()}
    builder = SubmissionBuilder(expected)
    write_submission(settings.submission, builder.submission(), counts)  # a valid file from the first second
    model, described = load_for_inference(settings.model)
    model = model.to(device).eval()
    views = settings.views or (VIEWS_GPU if device.type == "cuda" else VIEWS_CPU)
    print(f"model: {described}; data: {taskset.description}; {len(tasks)} tasks, "
          f"{sum(counts.values())} test inputs; {views} view(s), scoring by {settings.score}; device {device}, "
          f"{precision.name}" + (f"; time budget {settings.time_budget:.0f} s" if deadline else ""), file=sys.stderr)
    pacer = TaskPacer(views, deadline, len(tasks), settings.task_cap)
    per_task: dict[str, dict[str, Any]] = {}
    reduced, timed_out, skipped = [], [], []
    last_save = time.monotonic()
    bar = tqdm(tasks, desc="Predicting", unit="task", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for done, task in enumerate(bar):
        samples = evaluation_samples([task])
        paced = pacer.next_task(done, len(samples))
        if paced is None:
            skipped.append(task.task_id)
            per_task[task.task_id] = {"views": 0, "seconds": 0.0, "fallback": True}
            continue
        k, task_deadline = paced
        if k < views:
            reduced.append(task.task_id)
        stop = (lambda: time.monotonic() > task_deadline) if task_deadline is not None else None
        tick = time.perf_counter()
        predictions = predict_samples(model, samples, views=k, max_length=settings.max_length, precision=precision,
                                      seed=settings.seed, score=settings.score, should_stop=stop)
        seconds = time.perf_counter() - tick
        if stop is not None and stop():
            timed_out.append(task.task_id)
        pacer.record(seconds, k * len(samples))
        for p in predictions:
            builder.add(task.task_id, p.sample.index, p.attempts)
        per_task[task.task_id] = {"views": k, "seconds": round(seconds, 3),
                                  "malformed": sum(g is None for p in predictions for g in p.grids)}
        bar.set_postfix_str(f"{seconds:.1f} s/task, {k} views")
        if time.monotonic() - last_save >= settings.save_every:
            write_submission(settings.submission, builder.submission(), counts)
            last_save = time.monotonic()
    bar.close()
    content = builder.submission()
    write_submission(settings.submission, content, counts)
    timed = [v["seconds"] for v in per_task.values() if v.get("views")]
    report: dict[str, Any] = {
        "submission": str(settings.submission), "model": described, "data": taskset.description,
        "tasks": len(expected), "test_inputs": sum(counts.values()), "invalid_tasks": len(taskset.skipped),
        "views": views, "score_by": settings.score, "seed": settings.seed, "device": str(device),
        "precision": precision.name, "time_budget_seconds": settings.time_budget,
        "seconds": round(time.monotonic() - started, 2),
        "seconds_per_task_mean": round(float(np.mean(timed)), 3) if timed else None,
        "fallback_inputs": builder.no_candidate + builder.missing(),  # missing: invalid or skipped tasks
        "fallback_second_attempts": builder.one_candidate,
        "tasks_with_fewer_views": len(reduced), "tasks_cut_by_time": len(timed_out),
        "tasks_skipped_for_time": len(skipped), "per_task": per_task,
    }
    _finish_report(report, content, tasks, settings)
    return report


def _finish_report(report: dict[str, Any], content: dict[str, Any], tasks: Sequence[Task],
                   settings: PredictSettings) -> None:
    """Print what was written and what the time budget cut, score the submission where the solutions are
    known (adding the scores to `report`), and write the JSON report (--json)."""
    from submission import score_submission

    print(f"wrote {settings.submission}: {report['tasks']} tasks, {report['test_inputs']} test inputs in "
          f"{report['seconds']:.0f} s ({report['seconds_per_task_mean']} s per task); fallback answers: "
          f"{report['fallback_inputs']} test inputs, {report['fallback_second_attempts']} second attempts",
          file=sys.stderr)
    cut = (report["tasks_with_fewer_views"], report["tasks_cut_by_time"], report["tasks_skipped_for_time"])
    if any(cut):
        print(f"time budget: {cut[0]} tasks decoded with fewer than {report['views']} views, {cut[1]} cut "
              f"off at their cap, {cut[2]} given the fallback (no time left)", file=sys.stderr)
    solutions = {t.task_id: [out for _, out in t.test] for t in tasks_with_answers(tasks)}
    if solutions:
        scored = score_submission(content, solutions)
        report["scores"] = scored.to_json()
        for task_id, value in scored.per_task.items():
            print(f"  {task_id}: {value:.3f}")
        print(f"score (pass@2, right test outputs / all): {scored.correct_outputs}/{scored.total_outputs} = "
              f"{scored.score:.4f}; tasks solved (every output right): {scored.solved_tasks}/{len(solutions)}")
    if settings.json_path is not None:
        from atomic_io import write_text_atomic
        write_text_atomic(settings.json_path, json.dumps(report, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check is not None:
        from submission import check_submission_file
        found = check_submission_file(args.check, args.data)
        against = f" against {args.data}" if args.data else ""
        print(f"{args.check}: valid{against} ({len(found)} tasks, {sum(found.values())} test inputs)")
        return 0
    from atomic_io import check_writable
    for flag, path, what in (("--submission", args.submission, "the submission"), ("--json", args.json, "the report")):
        if path is not None:  # before the model loads and the minutes of decoding
            check_writable(path, what, flag)
    settings = PredictSettings(model=args.model, data=args.data, submission=args.submission,
                               solutions=args.solutions, views=args.views, score=args.score,
                               time_budget=args.time_budget, task_cap=args.task_cap, json_path=args.json,
                               device=args.device, precision=args.precision, max_length=args.max_length,
                               seed=args.seed, strict=args.strict, save_every=args.save_every)
    run_prediction(settings)
    return 0


if __name__ == "__main__":
    from errors import run_cli
    run_cli(main)
