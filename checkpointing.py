"""Training checkpoints: atomic writes, rotation, and everything an exact resume needs.

A checkpoint is a folder `<run>/checkpoints/step-<N>/` holding
  * `state.pt`   - tensors and plain values only (model, optimizer, scheduler, TrainStep/scaler state, RNG
                   states, loop position), read back with `torch.load(weights_only=True)` so loading a
                   checkpoint never runs pickled code;
  * `meta.json`  - what a person (or `--resume`) needs without torch: step, epoch, position in the epoch,
                   why it was written, the run's arguments, model config and vocabulary.
Both files are written into a temporary sibling folder that is renamed into place with `os.replace`, so a
crash, a full disk or a Ctrl-C mid-write never leaves half a checkpoint under a `step-*` name; a write the
disk refuses is one line (atomic_io.disk_errors) and leaves the previous checkpoints as they were.

A checkpoint is untrusted input (it may come from anyone, or be cut short). Before anything uses it,
`read_meta` checks meta.json (an object of the known format, each known field of its type) and
`load_checkpoint` checks state.pt's layout (`validate_checkpoint`: required parts, optimizer groups against
this run's optimizer, scheduler, TrainStep counters, the loop fields the trainer passes, RNG states tried on
throwaway generators); `validate_saved_args` checks the saved run arguments against the trainer's parser.
Each problem is one UserError line naming the file and the field.
"""
from __future__ import annotations

import argparse
import collections.abc
import json
import math
import os
import random
import re
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from atomic_io import disk_errors, replace_directory
from errors import UserError, printable

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
# atomic_io.RETIRED_PREFIX (".tmp-old-") starts with it, so a half-removed old checkpoint is swept too.

# meta.json fields and their JSON types (int means an integer, not a boolean); `read_meta` checks those
# present and requires META_REQUIRED.
META_TYPES: dict[str, Any] = {
    "format": int, "step": int, "epoch": int, "batch": int, "epochs": int, "world_size": int,
    "reason": str, "saved_at": str, "precision": str, "args": dict, "model_config": dict, "device": dict,
    "vocabulary": list[str], "last_eval": dict | None, "run_id": str | None, "plan": dict,
}
META_REQUIRED = ("step", "epoch", "batch", "args")
_AT_LEAST = {"step": 0, "epoch": 0, "batch": 0, "epochs": 0, "world_size": 1}
STATE_REQUIRED = ("model", "optimizer", "scheduler", "train_step", "rng", "loop")


def checkpoint_name(step: int) -> str:
    """Folder name for a checkpoint taken after `step` optimizer steps (zero-padded so names sort)."""
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first. Temporary folders are never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete half-written checkpoint folders left by a run that was killed mid-save; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [child for child in directory.iterdir() if child.name.startswith(_TEMP_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                    keep: int, needed_bytes: int | None = None) -> Path:
    """Write `state` and `meta` as checkpoint `step` in `directory` atomically; keep the newest `keep`.

    A write the disk refuses (full, read-only; torch.save's RuntimeError included) is one UserError line
    naming the folder and the space needed (`needed_bytes`, e.g. the previous checkpoint's size) and free,
    raised after removing the partial temporary folder, so the previous checkpoints stay the latest ones.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    temporary = directory / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    if needed_bytes is None:
        previous = latest_checkpoint(directory)
        needed_bytes = _folder_bytes(previous) if previous is not None else None
    with disk_errors("the checkpoint", directory, needed_bytes,
                     "free disk space, lower --keep-checkpoints or choose another --output-dir"):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            temporary.mkdir()
            torch.save(state, temporary / STATE_FILE)
            _write_json(temporary / META_FILE, {"format": FORMAT_VERSION, **meta})
            _fsync_path(temporary / STATE_FILE)
            _fsync_path(temporary)
            replace_directory(temporary, final)
            _fsync_path(directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a (nested) state: about what torch.save writes, for the space a save
    needs (a full disk's message says it)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _folder_bytes(path: Path) -> int:
    return sum(child.stat().st_size for child in Path(path).iterdir() if child.is_file())


def load_checkpoint(path: Path, loop_types: Mapping[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    parameters: Sequence[torch.nn.Parameter] | None = None,
                    model_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: (state for torch objects, meta). Tensors come back on the CPU.
    `model_only`: only the weights will be used (prediction), so only they are required and checked.

    The files are untrusted: state.pt is read with `weights_only=True` (no pickled code runs), and meta.json
    and the state's layout are checked before anything uses them (`validate_checkpoint`, with the loop
    fields, optimizer and parameters when given), so a tampered or truncated file is one UserError line
    naming the file and the field.
    """
    path = Path(path)
    state_file, meta_file = path / STATE_FILE, path / META_FILE
    if not state_file.is_file() or not meta_file.is_file():
        raise UserError(f"{path} is not a checkpoint (expected {STATE_FILE} and {META_FILE} in it)")
    meta = read_meta(path, required=())
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code; a truncated file fails in many ways
        if "Weights only load failed" in str(err):
            reason = ("it holds pickled objects other than tensors and plain values, which are never loaded "
                      "(weights_only)")
        else:
            reason = _first_line(err)
        raise UserError(f"checkpoint {state_file} cannot be read ({reason}); resume from an older one in "
                        f"{path.parent}") from None
    validate_checkpoint(path, state, meta, loop_types, optimizer, parameters, model_only)
    return state, meta


def read_meta(path: Path, required: Sequence[str] = META_REQUIRED) -> dict[str, Any]:
    """A checkpoint's meta.json alone (cheap: no tensors), e.g. to restore the run's arguments first.
    Checked: an object, format FORMAT_VERSION, the `required` fields present, every known field of its type."""
    meta_file = Path(path) / META_FILE
    try:
        raw = meta_file.read_bytes()
        meta = json.loads(raw.decode("utf-8"))  # NaN is allowed (a loss may be); typed fields are checked below
    except (OSError, ValueError, RecursionError) as err:
        reason = getattr(err, "strerror", None) or _first_line(err)
        raise UserError(f"checkpoint {meta_file} cannot be read ({reason}); resume from an older one "
                        f"in {Path(path).parent}") from None
    where = f"checkpoint {meta_file}"
    if not isinstance(meta, dict):
        raise UserError(f"{where}: expected a JSON object, got {_kind(meta)}")
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{where}: format {_show(meta.get('format'))}; this trainer reads format {FORMAT_VERSION}")
    for key in required:
        if key not in meta:
            raise UserError(f"{where}: field {key!r} is missing")
    for key, expected in META_TYPES.items():
        if key in meta:
            _check(meta[key], expected, where, key)
            if key in _AT_LEAST and meta[key] < _AT_LEAST[key]:
                raise UserError(f"{where}: field {key!r} is {meta[key]}, must be at least {_AT_LEAST[key]}")
    return meta


def validate_saved_args(path: Path, saved: Any, parser: argparse.ArgumentParser,
                        saved_forms: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run arguments of a checkpoint's meta.json, checked against the parser that made them: each value
    one the flag could have produced (its type function accepts it and gives it back unchanged, a listed
    choice, a boolean for a switch, null only where the default is null). Unknown keys are dropped.
    `saved_forms` gives, for a flag whose parsed value is not also its text (a duration: '2h' is saved as
    7200.0), the function that reads the saved value's text back instead of the flag's type."""
    where = f"checkpoint {Path(path) / META_FILE}"
    if not isinstance(saved, dict):
        raise UserError(f"{where}: field 'args' must be an object, got {_kind(saved)}")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    checked = {}
    for key, value in saved.items():
        action = actions.get(key)
        if action is None:
            continue
        field = f"args.{key}"
        if value is None:
            if action.default is not None:
                raise UserError(f"{where}: field {field!r} is null; expected {_show(action.default)}-like value")
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            _check(value, bool, where, field)
        elif isinstance(value, (list, dict)) or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"{where}: field {field!r} is {_show(value)}, not a value --{key.replace('_', '-')} takes")
        else:
            convert = (saved_forms or {}).get(key) or action.type or str
            try:
                back = convert(str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                back = _INVALID
            same = back == value and (type(back) is type(value) or
                                      (type(back) is float and type(value) is int))
            if not same or (action.choices is not None and value not in action.choices):
                raise UserError(f"{where}: field {field!r} is {_show(value)}, not a value "
                                f"--{key.replace('_', '-')} takes")
        checked[key] = value
    return checked


def validate_checkpoint(path: Path, state: Any, meta: dict[str, Any], loop_types: Mapping[str, Any] | None = None,
                        optimizer: torch.optim.Optimizer | None = None,
                        parameters: Sequence[torch.nn.Parameter] | None = None, model_only: bool = False) -> None:
    """Check a loaded state.pt before anything uses it; the first problem is a UserError naming the field.

    `loop_types`: the trainer's loop-state field names and types, e.g. `typing.get_type_hints(LoopState)`;
    the saved loop must have exactly those fields. `optimizer`: its groups (count and sizes) and parameter
    shapes must match the saved optimizer state. `parameters`: the TrainStep's parameters, for the saved
    mid-accumulation gradients. RNG states are tried on throwaway generators, so a bad vector is reported
    here rather than raising inside random.setstate / np.random.set_state / torch.set_rng_state.
    """
    where = f"checkpoint {Path(path) / STATE_FILE}"
    if not isinstance(state, dict):
        raise UserError(f"{where}: expected a dict of saved states, got {_kind(state)}")
    for key in ("model",) if model_only else STATE_REQUIRED:
        if key not in state:
            raise UserError(f"{where}: field {key!r} is missing")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise UserError(f"{where}: field 'model' must map parameter names to tensors")
    if model_only:
        return
    _check_optimizer(state["optimizer"], where, optimizer)
    groups = len(state["optimizer"]["param_groups"])
    _check_scheduler(state["scheduler"], where, groups)
    _check_train_step(state["train_step"], where)
    check_rng_state(state["rng"], where)
    if loop_types is not None:
        _check_loop(state["loop"], where, loop_types)
        loop = state["loop"]
        for key in ("step", "epoch", "batch"):
            if key in meta and key in loop and meta[key] != loop[key]:
                raise UserError(f"{where}: field 'loop.{key}' is {loop[key]} but {META_FILE} says {meta[key]}; "
                                f"the two files are of different checkpoints")
    elif not isinstance(state["loop"], dict):
        raise UserError(f"{where}: field 'loop' must be a dict, got {_kind(state['loop'])}")
    grads = state.get("grads")
    if grads is not None:
        if not isinstance(grads, list) or not all(g is None or isinstance(g, torch.Tensor) for g in grads):
            raise UserError(f"{where}: field 'grads' must be null or a list of tensors")
        if parameters is not None:
            parameters = list(parameters)
            if len(grads) != len(parameters):
                raise UserError(f"{where}: field 'grads' holds {len(grads)} gradients for {len(parameters)} "
                                f"parameters")
            for k, (g, p) in enumerate(zip(grads, parameters)):
                if g is not None and g.shape != p.shape:
                    raise UserError(f"{where}: field 'grads[{k}]' has shape {tuple(g.shape)}, the parameter "
                                    f"{tuple(p.shape)}")


def _check_optimizer(saved: Any, where: str, optimizer: torch.optim.Optimizer | None) -> None:
    if not isinstance(saved, dict):
        raise UserError(f"{where}: field 'optimizer' must be a dict, got {_kind(saved)}")
    groups, per_param = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise UserError(f"{where}: field 'optimizer.param_groups' must be a non-empty list of dicts")
    if not isinstance(per_param, dict):
        raise UserError(f"{where}: field 'optimizer.state' must be a dict, got {_kind(per_param)}")
    ids = []
    for k, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(type(i) is int for i in params):
            raise UserError(f"{where}: field 'optimizer.param_groups[{k}].params' must be a list of integers")
        for key in ("lr", "weight_decay"):
            if key in group and not _is_number(group[key]):
                raise UserError(f"{where}: field 'optimizer.param_groups[{k}].{key}' must be a number, got "
                                f"{_show(group[key])}")
        ids += params
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: field 'optimizer.param_groups' lists a parameter twice")
    for key, entry in per_param.items():
        if key not in ids or not isinstance(entry, dict):
            raise UserError(f"{where}: field 'optimizer.state[{_show(key)}]' is not a state of a listed parameter")
    if optimizer is None:
        return
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise UserError(f"{where}: field 'optimizer.param_groups' has {len(groups)} groups, this run's optimizer "
                        f"{len(mine)}; resume with the settings the run was trained with")
    shapes = {}
    for k, (group, own) in enumerate(zip(groups, mine)):
        if len(group["params"]) != len(own["params"]):
            raise UserError(f"{where}: field 'optimizer.param_groups[{k}].params' has {len(group['params'])} "
                            f"parameters, this run's optimizer {len(own['params'])}")
        shapes.update(zip(group["params"], (p.shape for p in own["params"])))
    for key, entry in per_param.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != shapes[key]:
                raise UserError(f"{where}: field 'optimizer.state[{key}].{name}' has shape {tuple(value.shape)}, "
                                f"its parameter {tuple(shapes[key])}")


def _check_scheduler(saved: Any, where: str, groups: int) -> None:
    if not isinstance(saved, dict):
        raise UserError(f"{where}: field 'scheduler' must be a dict, got {_kind(saved)}")
    if "last_epoch" in saved:
        _check(saved["last_epoch"], int, where, "scheduler.last_epoch")
    for key in ("base_lrs", "_last_lr"):
        if key in saved:
            value = saved[key]
            if not isinstance(value, list) or len(value) != groups or not all(_is_number(v) for v in value):
                raise UserError(f"{where}: field 'scheduler.{key}' must be a list of {groups} numbers")
    if "lr_lambdas" in saved and not isinstance(saved["lr_lambdas"], list):
        raise UserError(f"{where}: field 'scheduler.lr_lambdas' must be a list, got {_kind(saved['lr_lambdas'])}")


def _check_train_step(saved: Any, where: str) -> None:
    if not isinstance(saved, dict):
        raise UserError(f"{where}: field 'train_step' must be a dict, got {_kind(saved)}")
    for key in ("micro_steps", "optimizer_steps", "skipped_steps"):
        if key not in saved:
            raise UserError(f"{where}: field 'train_step.{key}' is missing")
        _check(saved[key], int, where, f"train_step.{key}")
        if saved[key] < 0:
            raise UserError(f"{where}: field 'train_step.{key}' is {saved[key]}, must be at least 0")
    scaler = saved.get("scaler")
    if scaler is not None:
        if not isinstance(scaler, dict):
            raise UserError(f"{where}: field 'train_step.scaler' must be a dict, got {_kind(scaler)}")
        for key, value in scaler.items():
            if not _is_number(value) or not math.isfinite(value):
                raise UserError(f"{where}: field 'train_step.scaler.{key}' must be a finite number, got "
                                f"{_show(value)}")


def check_rng_state(saved: Any, where: str) -> None:
    """Check a `capture_rng_state` dict by loading it into throwaway generators (one line on a bad one)."""
    if not isinstance(saved, dict):
        raise UserError(f"{where}: field 'rng' must be a dict, got {_kind(saved)}")
    for key in ("python", "numpy", "torch"):
        if key not in saved:
            raise UserError(f"{where}: field 'rng.{key}' is missing")
    python, numpy_state, torch_state = saved["python"], saved["numpy"], saved["torch"]
    try:
        version, internal, gauss = python
        if not (type(version) is int and isinstance(internal, (list, tuple)) and len(internal) == 625
                and all(type(v) is int and 0 <= v < 2**32 for v in internal) and internal[-1] <= 624
                and (gauss is None or type(gauss) is float)):
            raise TypeError
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: field 'rng.python' is not a Python random state "
                        f"(version, 625 integers, gauss)") from None
    try:
        name, key, pos, has_gauss, cached = numpy_state
        if not (isinstance(name, str) and isinstance(key, torch.Tensor) and key.dtype == torch.int64
                and key.shape == (624,) and type(pos) is int and type(has_gauss) is int
                and type(cached) is float and bool(((key >= 0) & (key < 2**32)).all())):
            raise TypeError
        np.random.RandomState().set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: field 'rng.numpy' is not a NumPy random state "
                        f"(name, 624 integers, position, has_gauss, cached)") from None
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8 and torch_state.ndim == 1):
        raise UserError(f"{where}: field 'rng.torch' is not a torch random state (a uint8 vector)")
    try:
        torch.Generator().set_state(torch_state)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{where}: field 'rng.torch' is not a torch random state (a uint8 vector of "
                        f"{torch.get_rng_state().numel()} bytes)") from None
    cuda = saved.get("cuda")
    if cuda is not None and (not isinstance(cuda, list) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in cuda)):
        raise UserError(f"{where}: field 'rng.cuda' must be a list of uint8 vectors")


def _check_loop(loop: Any, where: str, loop_types: Mapping[str, Any]) -> None:
    if not isinstance(loop, dict):
        raise UserError(f"{where}: field 'loop' must be a dict, got {_kind(loop)}")
    missing = [k for k in loop_types if k not in loop]
    extra = [k for k in loop if k not in loop_types]
    if missing:
        raise UserError(f"{where}: field 'loop.{missing[0]}' is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise UserError(f"{where}: field 'loop.{printable(extra[0])[:60]}' is not a loop field this trainer knows")
    for key, expected in loop_types.items():
        _check(loop[key], expected, where, f"loop.{key}")
        if expected is int and loop[key] < 0:
            raise UserError(f"{where}: field 'loop.{key}' is {loop[key]}, must be at least 0")


def _matches(value: Any, expected: Any) -> bool:
    """Whether a JSON/pickle-free value fits a type hint: int (not bool), float (int too), str, bool, None,
    unions, list[X], dict[K, V], Any."""
    if expected is Any:
        return True
    if expected is None or expected is type(None):
        return value is None
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(expected)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin in (dict, collections.abc.Mapping):
        args = typing.get_args(expected)
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1])
                                                            for k, v in value.items()))
    if expected is int:
        return type(value) is int
    if expected is float:
        return type(value) in (int, float)
    if expected is bool:
        return type(value) is bool
    return isinstance(value, expected)


def _check(value: Any, expected: Any, where: str, field: str) -> None:
    if not _matches(value, expected):
        raise UserError(f"{where}: field {field!r} must be {_type_name(expected)}, got {_show(value)}")


def _type_name(expected: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             list: "a list", type(None): "null", None: "null"}
    if expected in names:
        return names[expected]
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(expected))
    if origin is not None:
        return _type_name(origin) + " of " + ", ".join(_type_name(a) for a in typing.get_args(expected))
    return getattr(expected, "__name__", str(expected))


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string", bool: "a boolean",
             type(None): "null", int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short, one-line, escaped rendering of an untrusted value for a message."""
    if isinstance(value, (dict, list, tuple)):
        return _kind(value)
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = printable(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return printable(text.splitlines()[0][:200]) if text else type(err).__name__


_INVALID = object()


def resolve_resume_path(spec: str | None, output_dir: Path | None, runs_root: Path) -> Path:
    """Find the checkpoint that `--resume [PATH]` means.

    PATH may be a checkpoint folder or a run folder (its newest checkpoint is taken). Without PATH the newest
    checkpoint of `--output-dir` is used, or, with no `--output-dir` either, of the newest run in `runs_root`.
    """
    if spec:
        path = Path(spec)
        if (path / STATE_FILE).is_file():
            return path
        for candidate in (path / CHECKPOINT_DIR, path):
            latest = latest_checkpoint(candidate)
            if latest is not None:
                return latest
        raise UserError(f"--resume {spec}: no checkpoint there (expected a run folder with "
                        f"{CHECKPOINT_DIR}/step-*/ or a step-* folder)")
    if output_dir is not None:
        latest = latest_checkpoint(Path(output_dir) / CHECKPOINT_DIR)
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}")
        return latest
    candidates = [latest_checkpoint(run / CHECKPOINT_DIR) for run in Path(runs_root).glob("*")
                  if run.is_dir()]
    candidates = [path for path in candidates if path is not None]
    if not candidates:
        raise UserError(f"--resume: no run with a checkpoint under {runs_root}/; give --resume PATH")
    return max(candidates, key=lambda path: (path / META_FILE).stat().st_mtime)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                   train_step: Any = None, loop: dict[str, Any] | None = None,
                   grads: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
    """What state.pt holds: weights (model_state), optimizer, schedule, TrainStep counters and scaler, RNG
    states, the loop position, and the gradients of an unfinished accumulation. The trainer writes it; the
    benchmark times writing it."""
    return {"model": model_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "train_step": train_step.state_dict() if train_step is not None else {},
            "rng": capture_rng_state(), "loop": dict(loop or {}), "grads": grads}


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a resume needs: everything for full fine-tuning, only the trainable tensors for LoRA
    (the frozen base weights are reloaded from the model itself, which saves gigabytes per checkpoint)."""
    parameters = dict(model.named_parameters())
    trainable = {name for name, parameter in parameters.items() if parameter.requires_grad}
    state = model.state_dict()
    if len(trainable) == len(parameters):
        return state
    return {name: tensor for name, tensor in state.items() if name in trainable}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `model_state` saved; a mismatch (another model or LoRA rank) is a UserError."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(trainable - set(state))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit this model ({str(err).splitlines()[0]}); resume with "
                        f"the --model-name and --lora-rank the checkpoint was trained with") from err
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise UserError(f"checkpoint weights do not fit this model (e.g. {name!r} "
                        f"{'missing' if missing else 'unexpected'}); resume with the --model-name and "
                        f"--lora-rank the checkpoint was trained with")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], where: str = "checkpoint") -> None:
    """Inverse of `capture_rng_state` (CUDA states only when this run has the same devices). A state that
    is not one `capture_rng_state` could have made is a UserError before any generator is touched."""
    check_rng_state(state, where)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk so the rename that follows cannot outrun the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
