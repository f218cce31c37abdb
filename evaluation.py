"""Exact-match evaluation on held-out ARC test inputs: what tells you whether another epoch helps.

Each test input gets a greedy-decoded grid from its task's demonstrations; it is correct only when the grid
matches the expected output cell for cell (shape included). A task is solved when every one of its test
inputs is correct. With two attempts (the ARC Prize's pass@2), the second attempt decodes the task seen
through an augmentation (a rotation/flip and a colour permutation that keeps 0) and maps the prediction
back, so it is a genuinely different guess rather than the same greedy output twice; it is skipped when the
first attempt is already right.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from arc_dataset import (MAX_TARGET_TOKENS, Augmentation, Sample, Task, augment_sample, encode_prompt,
                         evaluation_samples)
from model import generate_grids


@dataclass
class EvalResult:
    """Counts from one evaluation; accuracies are fractions in [0, 1]."""
    attempts: int
    num_inputs: int = 0
    correct_inputs: int = 0          # right within `attempts` tries
    correct_first: int = 0           # right on the first try (pass@1)
    num_tasks: int = 0
    solved_tasks: int = 0            # every test input right within `attempts` tries
    malformed: int = 0               # attempts whose output was not a grid
    seconds: float = 0.0
    solved: dict[str, bool] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct_inputs / self.num_inputs if self.num_inputs else 0.0

    @property
    def first_attempt_accuracy(self) -> float:
        return self.correct_first / self.num_inputs if self.num_inputs else 0.0

    @property
    def task_accuracy(self) -> float:
        return self.solved_tasks / self.num_tasks if self.num_tasks else 0.0

    def metrics(self) -> dict[str, float | int]:
        """The fields a metrics.jsonl line carries (eval_accuracy is per test input, pass@attempts)."""
        out: dict[str, float | int] = {
            "eval_accuracy": round(self.accuracy, 6),
            "eval_task_accuracy": round(self.task_accuracy, 6),
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
        if self.malformed:
            text += f"; {self.malformed} outputs were not grids"
        return f"{text} [{self.seconds:.0f} s]"


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from the results of disjoint shares of the tasks (evaluation split over torchrun processes):
    the counts add up, each task's verdict comes from the share that held it, and the time is the slowest
    share's (the others wait for it)."""
    if not parts:
        raise ValueError("no results to merge")
    merged = EvalResult(attempts=parts[0].attempts)
    for part in parts:
        merged.num_inputs += part.num_inputs
        merged.correct_inputs += part.correct_inputs
        merged.correct_first += part.correct_first
        merged.num_tasks += part.num_tasks
        merged.solved_tasks += part.solved_tasks
        merged.malformed += part.malformed
        merged.solved.update(part.solved)
    merged.seconds = max(part.seconds for part in parts)
    return merged


def tasks_with_answers(tasks: Sequence[Task], limit: int | None = None) -> list[Task]:
    """The tasks whose test outputs are all known (only those can be scored), the first `limit` of them."""
    usable = [task for task in tasks if task.test and all(out is not None for _, out in task.test)]
    return usable if limit is None else usable[:limit]


def second_attempt_view(sample: Sample, seed: int) -> Augmentation:
    """A fixed, non-identity augmentation for a sample's second attempt (same for every evaluation, so
    accuracies from different epochs compare)."""
    rng = np.random.default_rng([seed % 2**32, zlib.crc32(sample.task_id.encode()), sample.index])
    augmentation = Augmentation.random(rng, len(sample.demos))
    if augmentation.transform == 0:
        augmentation = Augmentation(1 + int(rng.integers(7)), augmentation.colours, augmentation.demo_order)
    return augmentation


def prompt(sample: Sample, max_length: int, view: Augmentation | None = None) -> torch.Tensor:
    """The generation prompt of a sample, seen through `view` (an augmentation) or as it is."""
    return torch.from_numpy(encode_prompt(sample if view is None else augment_sample(sample, view), max_length))


def predict(model: torch.nn.Module, prompts: Sequence[torch.Tensor], precision,
            views: Sequence[Augmentation | None]) -> list[np.ndarray | None]:
    """Greedy predictions for prompts decoded together, each mapped back through the view it was built with
    (None: none), None where the output is not a grid."""
    grids = generate_grids(model, prompts, MAX_TARGET_TOKENS, precision)
    return [g if g is None or v is None else v.invert(g) for g, v in zip(grids, views)]


def evaluate(model: torch.nn.Module, tasks: Sequence[Task], *, max_length: int, precision,
             device: torch.device, attempts: int = 1, seed: int = 0, batch_size: int = 8,
             should_stop: Callable[[], bool] | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult | None:
    """Greedy exact-match accuracy on the test inputs of `tasks` (call `tasks_with_answers` first).

    Test inputs are decoded `batch_size` at a time, in order of prompt length (little padding), each batch's
    second attempts right after it. Returns None when `should_stop()` turns true part-way (Ctrl-C, the time
    budget): a partial score would not compare with the others. `progress(done, total)` is called for each
    test input once it is scored. The model is put in eval mode and restored to the mode it had; `device`
    is where the model is (decoding follows the model).
    """
    if attempts not in (1, 2):
        raise ValueError(f"attempts must be 1 or 2, got {attempts}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = evaluation_samples(tasks)
    result = EvalResult(attempts=attempts, num_tasks=len(tasks))
    per_task: dict[str, list[bool]] = {task.task_id: [] for task in tasks}
    prompts = [prompt(s, max_length) for s in samples]
    by_length = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for first in range(0, len(by_length), batch_size):
            if should_stop is not None and should_stop():
                return None
            indices = by_length[first:first + batch_size]
            chunk = [samples[i] for i in indices]
            guesses = predict(model, [prompts[i] for i in indices], precision, [None] * len(chunk))
            right = [g is not None and np.array_equal(g, s.target) for g, s in zip(guesses, chunk)]
            result.malformed += sum(g is None for g in guesses)
            result.correct_first += sum(right)
            retry = [k for k, ok in enumerate(right) if not ok] if attempts == 2 else []
            if retry:
                views = [second_attempt_view(chunk[k], seed) for k in retry]
                second = predict(model, [prompt(chunk[k], max_length, v) for k, v in zip(retry, views)],
                                 precision, views)
                result.malformed += sum(g is None for g in second)
                for k, g in zip(retry, second):
                    right[k] = g is not None and np.array_equal(g, chunk[k].target)
            for sample, ok in zip(chunk, right):
                result.num_inputs += 1
                result.correct_inputs += ok
                per_task[sample.task_id].append(ok)
                if progress is not None:
                    progress(result.num_inputs, len(samples))
    finally:
        model.train(was_training)
    result.solved = {task_id: bool(marks) and all(marks) for task_id, marks in per_task.items()}
    result.solved_tasks = sum(result.solved.values())
    result.seconds = time.perf_counter() - start
    return result
