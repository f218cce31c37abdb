"""Tampered checkpoints: every field of meta.json and state.pt, and pickled code, against the checks
`--resume` runs before using a checkpoint (`checkpointing.read_meta`, `load_checkpoint` with the loop
fields, optimizer and parameters, `validate_saved_args`). Each must be one UserError line naming the file
and the field; nothing pickled may run. Tiny checkpoints (tests/tiny_checkpoint.py), all in process."""
from __future__ import annotations

import argparse
import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import checkpointing
from adversarial import assert_one_line
from checkpointing import META_FILE, STATE_FILE, load_checkpoint, read_meta, save_checkpoint, validate_saved_args
from errors import UserError
from tiny_checkpoint import LOOP_TYPES, full_state, parts


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    state, meta = full_state()
    return save_checkpoint(tmp_path / "checkpoints", 3, state, meta, keep=2)


def resume_checks(path: Path) -> None:
    """What the trainer runs on --resume, with this run's optimizer and parameters."""
    model, optimizer, _ = parts()
    read_meta(path)
    load_checkpoint(path, LOOP_TYPES, optimizer, list(model.parameters()))


def tamper_meta(path: Path, change: Callable[[dict], Any]) -> None:
    meta = json.loads((path / META_FILE).read_text())
    result = change(meta)
    (path / META_FILE).write_text(json.dumps(meta if result is None else result))


def tamper_state(path: Path, change: Callable[[dict], Any]) -> None:
    state = torch.load(path / STATE_FILE, weights_only=True)
    result = change(state)
    torch.save(state if result is None else result, path / STATE_FILE)


def setter(*keys: Any, value: Any = None, delete: bool = False) -> Callable[[dict], None]:
    def change(root: dict) -> None:
        node = root
        for key in keys[:-1]:
            node = node[key]
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = copy.deepcopy(value)
    return change


def test_untampered_checkpoint_passes(checkpoint: Path) -> None:
    resume_checks(checkpoint)  # the suite's baseline: every failure below comes from its one change


# ---- meta.json -----------------------------------------------------------------------------------

META_VALUES: dict[str, tuple[tuple, Any]] = {
    "format_missing": (("format",), None), "format_string": (("format",), "1"), "format_2": (("format",), 2),
    "step_string": (("step",), "3"), "step_negative": (("step",), -1), "step_float": (("step",), 3.0),
    "step_bool": (("step",), True), "step_null": (("step",), None), "step_list": (("step",), [3]),
    "epoch_string": (("epoch",), "x"), "epoch_huge_float": (("epoch",), 1e300), "batch_null": (("batch",), None),
    "epochs_many": (("epochs",), "many"), "epochs_negative": (("epochs",), -5),
    "world_size_string": (("world_size",), "1"), "world_size_zero": (("world_size",), 0),
    "world_size_list": (("world_size",), [1]), "args_list": (("args",), [1]), "args_null": (("args",), None),
    "args_string": (("args",), "--lr 1"), "model_config_list": (("model_config",), [1]),
    "vocabulary_numbers": (("vocabulary",), [1, 2]), "vocabulary_string": (("vocabulary",), "0123"),
    "last_eval_number": (("last_eval",), 5), "reason_number": (("reason",), 5),
    "precision_list": (("precision",), []), "device_string": (("device",), "cpu"),
    "saved_at_object": (("saved_at",), {}),
}


@pytest.mark.parametrize("name", sorted(META_VALUES))
def test_meta_field_of_wrong_type(name: str, checkpoint: Path) -> None:
    keys, value = META_VALUES[name]
    tamper_meta(checkpoint, setter(*keys, value=value, delete=name == "format_missing"))
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), META_FILE, *(() if name.startswith("format") else (f"'{keys[0]}'",)))


@pytest.mark.parametrize("key", checkpointing.META_REQUIRED)
def test_meta_required_field_missing(key: str, checkpoint: Path) -> None:
    tamper_meta(checkpoint, setter(key, delete=True))
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), META_FILE, f"'{key}'", "missing")


META_FILES: dict[str, bytes] = {
    "a_list": b"[1, 2]", "null": b"null", "a_string": b'"meta"', "a_number": b"3", "empty": b"",
    "binary": bytes(range(256)), "truncated": b'{"format": 1, "step": ', "nan": b'{"format": 1, "step": NaN}',
    "infinity": b'{"format": 1, "epoch": Infinity}', "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge_integer": b'{"format": 1, "step": ' + b"9" * 5000 + b"}", "utf16": '{"format": 1}'.encode("utf-16"),
    "gzip": b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
}


@pytest.mark.parametrize("name", sorted(META_FILES))
def test_meta_file_that_is_not_a_meta(name: str, checkpoint: Path) -> None:
    (checkpoint / META_FILE).write_bytes(META_FILES[name])
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), META_FILE)


# ---- state.pt ------------------------------------------------------------------------------------

STATE_CHANGES: dict[str, tuple[Callable[[dict], Any], str]] = {  # change, the field the message names
    "not_a_dict": (lambda s: [1, 2], "dict of saved states"),
    "a_tensor": (lambda s: torch.zeros(3), "dict of saved states"),
    "model_missing": (setter("model", delete=True), "'model'"),
    "optimizer_missing": (setter("optimizer", delete=True), "'optimizer'"),
    "scheduler_missing": (setter("scheduler", delete=True), "'scheduler'"),
    "train_step_missing": (setter("train_step", delete=True), "'train_step'"),
    "rng_missing": (setter("rng", delete=True), "'rng'"),
    "loop_missing": (setter("loop", delete=True), "'loop'"),
    "model_list": (setter("model", value=[1]), "'model'"),
    "model_values_not_tensors": (setter("model", "weight", value=[1.0]), "'model'"),
    "optimizer_list": (setter("optimizer", value=[]), "'optimizer'"),
    "optimizer_no_groups": (setter("optimizer", "param_groups", delete=True), "'optimizer.param_groups'"),
    "optimizer_groups_empty": (setter("optimizer", "param_groups", value=[]), "'optimizer.param_groups'"),
    "optimizer_groups_numbers": (setter("optimizer", "param_groups", value=[1, 2]), "'optimizer.param_groups'"),
    "optimizer_group_params_string": (setter("optimizer", "param_groups", 0, "params", value="0,1"),
                                      "params'"),
    "optimizer_group_params_bools": (setter("optimizer", "param_groups", 0, "params", value=[True, False]),
                                     "params'"),
    "optimizer_two_groups": (lambda s: s["optimizer"]["param_groups"].append(
        dict(s["optimizer"]["param_groups"][0], params=[7])), "groups"),
    "optimizer_group_too_few_params": (setter("optimizer", "param_groups", 0, "params", value=[0]), "'optimizer."),
    "optimizer_param_listed_twice": (setter("optimizer", "param_groups", 0, "params", value=[0, 0]), "twice"),
    "optimizer_lr_string": (setter("optimizer", "param_groups", 0, "lr", value="fast"), "lr'"),
    "optimizer_state_list": (setter("optimizer", "state", value=[]), "'optimizer.state'"),
    "optimizer_state_unknown_param": (setter("optimizer", "state", 9, value={}), "optimizer.state[9]"),
    "optimizer_moment_wrong_shape": (setter("optimizer", "state", 0, "exp_avg", value=torch.zeros(7)),
                                     "exp_avg"),
    "scheduler_list": (setter("scheduler", value=[1]), "'scheduler'"),
    "scheduler_last_epoch_string": (setter("scheduler", "last_epoch", value="3"), "scheduler.last_epoch"),
    "scheduler_base_lrs_long": (setter("scheduler", "base_lrs", value=[1e-3, 1e-3]), "scheduler.base_lrs"),
    "scheduler_last_lr_strings": (setter("scheduler", "_last_lr", value=["x"]), "scheduler._last_lr"),
    "train_step_list": (setter("train_step", value=[0]), "'train_step'"),
    "train_step_micro_missing": (setter("train_step", "micro_steps", delete=True), "train_step.micro_steps"),
    "train_step_micro_string": (setter("train_step", "micro_steps", value="3"), "train_step.micro_steps"),
    "train_step_negative": (setter("train_step", "optimizer_steps", value=-1), "train_step.optimizer_steps"),
    "train_step_skipped_float": (setter("train_step", "skipped_steps", value=0.5), "train_step.skipped_steps"),
    "train_step_scaler_list": (setter("train_step", "scaler", value=[1]), "train_step.scaler"),
    "train_step_scaler_nan": (setter("train_step", "scaler", value={"scale": float("nan")}), "train_step.scaler"),
    "rng_list": (setter("rng", value=[]), "'rng'"),
    "rng_python_missing": (setter("rng", "python", delete=True), "rng.python"),
    "rng_numpy_missing": (setter("rng", "numpy", delete=True), "rng.numpy"),
    "rng_torch_missing": (setter("rng", "torch", delete=True), "rng.torch"),
    "rng_python_short": (setter("rng", "python", 1, value=[1, 2, 3]), "rng.python"),
    "rng_python_version_string": (setter("rng", "python", 0, value="3"), "rng.python"),
    "rng_python_word_too_big": (lambda s: s["rng"]["python"][1].__setitem__(0, 2**40), "rng.python"),
    "rng_python_index_too_big": (lambda s: s["rng"]["python"][1].__setitem__(-1, 10**6), "rng.python"),
    "rng_python_gauss_string": (setter("rng", "python", 2, value="x"), "rng.python"),
    "rng_python_not_a_list": (setter("rng", "python", value=5), "rng.python"),
    "rng_numpy_key_short": (setter("rng", "numpy", 1, value=torch.zeros(10, dtype=torch.int64)), "rng.numpy"),
    "rng_numpy_key_float": (setter("rng", "numpy", 1, value=torch.zeros(624)), "rng.numpy"),
    "rng_numpy_key_negative": (setter("rng", "numpy", 1, value=-torch.ones(624, dtype=torch.int64)), "rng.numpy"),
    "rng_numpy_name_number": (setter("rng", "numpy", 0, value=5), "rng.numpy"),
    "rng_numpy_name_unknown": (setter("rng", "numpy", 0, value="PCG64"), "rng.numpy"),
    "rng_numpy_pos_string": (setter("rng", "numpy", 2, value="0"), "rng.numpy"),
    "rng_numpy_too_few": (setter("rng", "numpy", value=["MT19937"]), "rng.numpy"),
    "rng_torch_float": (setter("rng", "torch", value=torch.zeros(5056)), "rng.torch"),
    "rng_torch_short": (setter("rng", "torch", value=torch.zeros(10, dtype=torch.uint8)), "rng.torch"),
    "rng_torch_2d": (setter("rng", "torch", value=torch.zeros(2, 5056, dtype=torch.uint8)), "rng.torch"),
    "rng_torch_list": (setter("rng", "torch", value=[0] * 5056), "rng.torch"),
    "rng_cuda_string": (setter("rng", "cuda", value="x"), "rng.cuda"),
    "loop_list": (setter("loop", value=[0]), "'loop'"),
    "loop_field_missing": (setter("loop", "epoch", delete=True), "loop.epoch"),
    "loop_extra_field": (setter("loop", "injected", value=1), "'loop.injected'"),
    "loop_epoch_string": (setter("loop", "epoch", value="1"), "loop.epoch"),
    "loop_epoch_negative": (setter("loop", "epoch", value=-1), "loop.epoch"),
    "loop_batch_float": (setter("loop", "batch", value=2.5), "loop.batch"),
    "loop_seconds_string": (setter("loop", "epoch_seconds", value="1.5"), "loop.epoch_seconds"),
    "loop_best_eval_string": (setter("loop", "best_eval", value="high"), "loop.best_eval"),
    "loop_last_eval_list": (setter("loop", "last_eval", value=[1]), "loop.last_eval"),
    "loop_samples_numbers": (setter("loop", "epoch_samples", value=[1, 2]), "loop.epoch_samples"),
    "loop_step_differs_from_meta": (setter("loop", "step", value=99), "loop.step"),
    "grads_string": (setter("grads", value="x"), "'grads'"),
    "grads_numbers": (setter("grads", value=[1, 2]), "'grads'"),
    "grads_wrong_count": (setter("grads", value=[torch.zeros(2, 4)]), "'grads'"),
    "grads_wrong_shape": (setter("grads", value=[torch.zeros(3), torch.zeros(2)]), "grads[0]"),
}


@pytest.mark.parametrize("name", sorted(STATE_CHANGES))
def test_state_field_tampered(name: str, checkpoint: Path) -> None:
    change, field = STATE_CHANGES[name]
    tamper_state(checkpoint, change)
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), STATE_FILE, field)


STATE_FILES: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "random_bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "json_instead": lambda p: p.write_text('{"model": {}}'),
    "zip_without_data": lambda p: zipfile.ZipFile(p, "w").writestr("archive/data.pkl", b"garbage"),
    "a_folder": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("name", sorted(STATE_FILES))
def test_state_file_that_is_not_a_state(name: str, checkpoint: Path) -> None:
    STATE_FILES[name](checkpoint / STATE_FILE)
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), str(checkpoint))


# ---- pickled code: weights_only must refuse it ------------------------------------------------------

MARKER = Path("/tmp") / f"hardening-pickle-ran-{os.getpid()}"


class RunsShell:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class RunsEval:
    def __reduce__(self):
        return (eval, (f"open({str(MARKER)!r}, 'w').close()",))


class CustomObject:
    """An instance of a class of ours: unpickling it would import and construct arbitrary classes."""
    def __init__(self) -> None:
        self.path = str(MARKER)


PAYLOADS = {"os_system": RunsShell, "builtins_eval": RunsEval, "custom_class": CustomObject}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
@pytest.mark.parametrize("where", ["top", "inside_loop"])
def test_pickled_code_is_refused(name: str, where: str, checkpoint: Path) -> None:
    MARKER.unlink(missing_ok=True)
    state, _ = full_state()
    if where == "top":
        state = {"evil": PAYLOADS[name]()}
    else:
        state["loop"]["epoch_samples"] = [PAYLOADS[name]()]
    torch.save(state, checkpoint / STATE_FILE)
    with pytest.raises(UserError) as raised:
        resume_checks(checkpoint)
    assert_one_line(str(raised.value), STATE_FILE, "cannot be read")
    assert not MARKER.exists(), "pickled code ran"


# ---- the run arguments in meta.json -------------------------------------------------------------

def arg_parser() -> argparse.ArgumentParser:
    """A parser shaped like the trainer's: ints, floats, choices, switches, 'auto'-or-int, optional paths."""
    def epochs(text: str) -> int | str:
        if text == "auto":
            return text
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("at least 1")
        return value
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=epochs, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--data", default=None)
    return parser


GOOD_ARGS = {"epochs": 2, "batch_size": 4, "lr": 3e-4, "precision": "bf16", "augment": False, "data": None,
             "unknown_flag": "dropped"}
BAD_ARGS = {"epochs_many": ("epochs", "many"), "epochs_zero": ("epochs", 0), "epochs_null": ("epochs", None),
            "batch_size_string": ("batch_size", "1"), "batch_size_float": ("batch_size", 1.5),
            "batch_size_bool": ("batch_size", True), "lr_string": ("lr", "fast"), "lr_nan": ("lr", float("nan")),
            "lr_list": ("lr", [1e-3]), "precision_unknown": ("precision", "fp8"), "augment_string": ("augment", "yes"),
            "data_object": ("data", {"path": "x"})}


def test_saved_args_that_the_parser_could_make_pass(tmp_path: Path) -> None:
    checked = validate_saved_args(tmp_path, {**GOOD_ARGS, "epochs": "auto"}, arg_parser())
    assert checked["epochs"] == "auto" and "unknown_flag" not in checked
    assert validate_saved_args(tmp_path, GOOD_ARGS, arg_parser())["lr"] == 3e-4


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_saved_arg_of_wrong_type(name: str, tmp_path: Path) -> None:
    key, value = BAD_ARGS[name]
    with pytest.raises(UserError) as raised:
        validate_saved_args(tmp_path, {**GOOD_ARGS, key: value}, arg_parser())
    assert_one_line(str(raised.value), META_FILE, f"'args.{key}'")


@pytest.mark.parametrize("saved", [[1], None, "x"])
def test_saved_args_not_an_object(saved: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError) as raised:
        validate_saved_args(tmp_path, saved, arg_parser())
    assert_one_line(str(raised.value), META_FILE, "'args'")
