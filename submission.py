"""The Kaggle ARC Prize submission file: building it, writing it atomically, checking it, scoring it.

Format (exactly what Kaggle reads): `{task_id: [{"attempt_1": GRID, "attempt_2": GRID}, ...]}`, one dict per
test input of the task, in the challenges file's order; a GRID is a list of 1..30 rows of 1..30 integers 0-9,
all rows the same length.

Fallback: a test input with no decoded grid (every view's output malformed, or no time left) gets its own
input grid as attempt 1 (many ARC outputs keep the input's shape and much of its content, so it can be right
where nothing else is) and [[0]] as attempt 2; a test input with one distinct candidate gets the input as
attempt 2 (or [[0]] when the candidate is the input). `SubmissionBuilder` counts each case so the report can
say how many answers are fallbacks.

Score (`score_submission`), as the ARC Prize states it for Kaggle: a test output scores 1 when either
attempt matches it exactly, and the score is the sum over all test outputs divided by their number. A task
is also reported as solved when every one of its test outputs is right (the stricter count).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from atomic_io import write_text_atomic
from errors import UserError

ATTEMPT_KEYS = ("attempt_1", "attempt_2")
FALLBACK_GRID = [[0]]
MAX_SIDE = 30
MAX_PROBLEMS_SHOWN = 5


class SubmissionError(UserError):
    """A submission file that Kaggle would reject or misread; the message lists the problems found."""


def grid_list(grid: np.ndarray | Sequence[Sequence[int]]) -> list[list[int]]:
    """A grid as plain JSON lists of Python ints."""
    return np.asarray(grid, dtype=np.int64).tolist()


@dataclass
class SubmissionBuilder:
    """Collects the attempts of every test input, filling and counting fallbacks."""
    expected: dict[str, list[list[list[int]]]]            # task id -> its test input grids, in order
    entries: dict[str, list[dict[str, list[list[int]]] | None]] = field(default_factory=dict)
    no_candidate: int = 0        # test inputs answered entirely by the fallback
    one_candidate: int = 0       # test inputs whose attempt 2 is a fallback

    def __post_init__(self) -> None:
        self.entries = {task_id: [None] * len(inputs) for task_id, inputs in self.expected.items()}

    def add(self, task_id: str, index: int, attempts: Sequence[np.ndarray]) -> dict[str, list[list[int]]]:
        """Record test input `index` of `task_id` from its ranked distinct candidates (0, 1 or more)."""
        query = self.expected[task_id][index]
        grids = [grid_list(g) for g in attempts[:2]]
        if not grids:
            self.no_candidate += 1
            grids = [query, FALLBACK_GRID]
        elif len(grids) == 1:
            self.one_candidate += 1
            grids.append(FALLBACK_GRID if grids[0] == query else query)
        entry = dict(zip(ATTEMPT_KEYS, grids))
        self.entries[task_id][index] = entry
        return entry

    def missing(self) -> int:
        """Test inputs not yet recorded (they get the fallback in `submission()`)."""
        return sum(entry is None for entries in self.entries.values() for entry in entries)

    def submission(self) -> dict[str, list[dict[str, list[list[int]]]]]:
        """The whole file's content: recorded answers, the fallback for every input not yet recorded."""
        return {task_id: [entry if entry is not None else dict(zip(ATTEMPT_KEYS, (self.expected[task_id][k],
                                                                                  FALLBACK_GRID)))
                          for k, entry in enumerate(entries)]
                for task_id, entries in self.entries.items()}


def _grid_problem(value: Any) -> str | None:
    """Why `value` is not a valid ARC grid, or None."""
    if not isinstance(value, list) or not value:
        return "not a non-empty list of rows"
    if len(value) > MAX_SIDE:
        return f"{len(value)} rows (at most {MAX_SIDE})"
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            return f"row {r} is not a non-empty list"
        if width is None:
            width = len(row)
            if width > MAX_SIDE:
                return f"{width} columns (at most {MAX_SIDE})"
        elif len(row) != width:
            return f"row {r} has {len(row)} cells but row 0 has {width}"
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, int) or not 0 <= cell <= 9:
                return f"cell ({r}, {c}) is {cell!r}, not an integer 0-9"
    return None


def submission_problems(content: Any, expected_counts: Mapping[str, int] | None = None) -> list[str]:
    """Every problem with a submission's content (empty: valid). With `expected_counts` (task id -> number
    of test inputs, from the challenges file) the task ids and counts must match exactly."""
    if not isinstance(content, dict):
        return [f"the top level must be an object mapping task ids to lists, got {type(content).__name__}"]
    problems = []
    if expected_counts is not None:
        missing = [t for t in expected_counts if t not in content]
        extra = [t for t in content if t not in expected_counts]
        if missing:
            problems.append(f"{len(missing)} task(s) of the challenges missing, e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} task(s) not in the challenges, e.g. {extra[0]}")
    for task_id, entries in content.items():
        where = f"task {task_id}"
        if not isinstance(entries, list) or not entries:
            problems.append(f"{where}: expected a non-empty list of attempt objects, got {type(entries).__name__}")
            continue
        if expected_counts is not None and task_id in expected_counts and len(entries) != expected_counts[task_id]:
            problems.append(f"{where}: {len(entries)} entries for {expected_counts[task_id]} test inputs")
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f"{where}: test input {k}: expected an object with attempt_1 and attempt_2")
                continue
            keys = set(entry)
            if keys != set(ATTEMPT_KEYS):
                wrong = sorted(map(str, keys ^ set(ATTEMPT_KEYS)))
                problems.append(f"{where}: test input {k}: keys must be exactly attempt_1, attempt_2 "
                                f"(wrong: {', '.join(wrong)})")
            for key in ATTEMPT_KEYS:
                if key in entry:
                    problem = _grid_problem(entry[key])
                    if problem:
                        problems.append(f"{where}: test input {k}: {key}: {problem}")
    return problems


def check_submission(content: Any, expected_counts: Mapping[str, int] | None = None, where: str = "submission") -> None:
    """Raise SubmissionError naming the first problems (and how many) unless the content is valid."""
    problems = submission_problems(content, expected_counts)
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise SubmissionError(f"{where}: {len(problems)} problem(s): {shown}{more}")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content, or a one-line UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the {what} file ({err})") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise UserError(f"{path}: the {what} file is not valid JSON ({str(err).splitlines()[0][:120]})") from None


def challenge_counts(path: str | Path) -> dict[str, int]:
    """Task id -> number of test inputs, read from a Kaggle challenges file (what a submission must cover)."""
    content = read_json(path, "challenges")
    if not isinstance(content, dict) or not content:
        raise UserError(f"{path}: a challenges file is a non-empty object mapping task ids to tasks")
    counts = {}
    for task_id, task in content.items():
        tests = task.get("test") if isinstance(task, dict) else None
        if not isinstance(tests, list) or not tests:
            raise UserError(f"{path}: task {task_id}: no 'test' list of inputs")
        counts[task_id] = len(tests)
    return counts


def check_submission_file(path: str | Path, challenges: str | Path | None = None) -> dict[str, int]:
    """Validate a submission file (against a challenges file when given); returns task id -> entries."""
    content = read_json(path, "submission")
    expected = challenge_counts(challenges) if challenges is not None else None
    check_submission(content, expected, str(path))
    return {task_id: len(entries) for task_id, entries in content.items()}


def write_submission(path: str | Path, content: Mapping[str, Any], expected_counts: Mapping[str, int]) -> None:
    """Validate, then write atomically (a reader sees the previous file or this one, never half)."""
    check_submission(content, expected_counts, f"{path} (not written)")
    write_text_atomic(path, json.dumps(content, separators=(",", ":")) + "\n")


@dataclass
class Score:
    """pass@2 against known solutions: per task (fraction of its test outputs right) and overall."""
    per_task: dict[str, float]
    correct_outputs: int
    total_outputs: int
    solved_tasks: int

    @property
    def score(self) -> float:
        """Kaggle's ARC Prize score: right test outputs / all test outputs."""
        return self.correct_outputs / self.total_outputs if self.total_outputs else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"score": round(self.score, 6), "correct_outputs": self.correct_outputs,
                "total_outputs": self.total_outputs, "solved_tasks": self.solved_tasks,
                "tasks": len(self.per_task), "per_task": self.per_task}


def score_submission(content: Mapping[str, Sequence[Mapping[str, Any]]],
                     solutions: Mapping[str, Sequence[Any]]) -> Score:
    """Score the tasks of `solutions` (task id -> output grids in order); a task absent from the
    submission scores 0."""
    per_task, correct, total, solved = {}, 0, 0, 0
    for task_id, outputs in solutions.items():
        entries = content.get(task_id, [])
        right = 0
        for k, output in enumerate(outputs):
            expected = grid_list(output)
            entry = entries[k] if k < len(entries) else {}
            right += any(entry.get(key) == expected for key in ATTEMPT_KEYS)
        per_task[task_id] = right / len(outputs) if outputs else 0.0
        correct += right
        total += len(outputs)
        solved += bool(outputs) and right == len(outputs)
    return Score(per_task, correct, total, solved)
