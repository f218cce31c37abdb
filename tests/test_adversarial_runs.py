"""Issue 11 through the real entry points: the trainer's `main` (in-process, under `errors.run_cli`), the
benchmark's and the submission CLI's argument checks, and Ctrl-C during each script's imports.

Categories (the test names start with them): disk (full disks, read-only and wrong output folders, during a
mid-run checkpoint, a metrics line, the plot, the final model), concurrency (two trainers on one folder, a
resume into another run's folder), checkpoint (tampered files through `--resume`), benchmark_json (hostile
`--throughput-json` files), model (damaged saved models as --model-name), data (hostile --data files), signal
(SIGINT in the first second). Each case
asserts the exit code, exactly one error line, no traceback, and that nothing was lost: the previous
checkpoint loads, metrics.jsonl holds whole lines, no `.tmp-*` is left, a refused folder is unchanged.
The unit-level cases are in test_adversarial_*.py, test_disk_faults.py, test_run_lock.py, test_errors.py.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import atomic_io
import checkpointing
import evaluation
import measure_throughput
import run_lock
import trainloop_gpu_finetuned as trainloop
from adversarial import DISK_FAULTS, HalfWriter, assert_clean, os_error, run_in_process
from result_examples import example_result
from test_trainloop import tiny_args, write_tasks

ROOT = Path(__file__).resolve().parents[1]
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })')
RUN_ARGS = ("--epochs", "1", "--max-batches", "4", "--save-every", "2", "--keep-checkpoints", "5")
LOOP_TYPES = typing.get_type_hints(trainloop.LoopState)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default runs/ folder never lands in the repository


def _train(tmp: Path, name: str) -> Path:
    code = trainloop.main(tiny_args(tmp, name, *RUN_ARGS, data=write_tasks(tmp / f"{name}.json", 4, 3, seed=0)))
    assert code == 0
    return tmp / name


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished runs of 4 steps (checkpoints step 2 and 4, final model), each with its own run id."""
    tmp = tmp_path_factory.mktemp("runs")
    return _train(tmp, "a"), _train(tmp, "b")


@pytest.fixture
def run_a(finished_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_runs[0], tmp_path / "a"))


@pytest.fixture
def run_b(finished_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_runs[1], tmp_path / "b"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its hash (to prove a refused run changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != run_lock.LOCK_FILE}


def assert_one_error(code: int, out: str, err: str, *fragments: str, expected: int = 2) -> str:
    """Exit `expected`, no traceback, exactly one error line and it is the last of stderr (a run that got as
    far as training also has tqdm bars there); returns the error line."""
    assert code == expected, (code, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def assert_nothing_lost(run: Path, newest_step: int | None = None) -> None:
    """The newest checkpoint loads with the trainer's checks, no temporary is left, metrics.jsonl holds
    whole JSON lines only."""
    checkpoints = run / checkpointing.CHECKPOINT_DIR
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp")], list(checkpoints.iterdir())
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name], list(run.iterdir())
    latest = checkpointing.latest_checkpoint(checkpoints)
    assert latest is not None
    _, meta = checkpointing.load_checkpoint(latest, LOOP_TYPES)
    if newest_step is not None:
        assert meta["step"] == newest_step
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def train_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_in_process(trainloop.main, argv, capsys)


# ------------------------------------------------------------------------------------- disk: full disks

CHECKPOINT_FAULTS = {name: DISK_FAULTS[name] for name in ("edquot", "eio", "torch_unexpected_pos",
                                                              "torch_write_failed", "torch_enospc_text")}
# a full disk's line goes on with the MB needed and free
CHECKPOINT_FAULTS["enospc"] = (DISK_FAULTS["enospc"][0], "no space left on device; ")


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_disk_full_during_a_mid_run_checkpoint(fault: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The third checkpoint (step 3 of --save-every 1) finds the disk full half-way through state.pt."""
    make_error, says = CHECKPOINT_FAULTS[fault]
    real_save, calls = torch.save, []

    def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"PK\x03\x04 half a zip")
            raise make_error()
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save)
    code, out, err = train_main(tiny_args(tmp_path, "run", "--epochs", "1", "--max-batches", "4",
                                          "--save-every", "1", "--keep-checkpoints", "5"), capsys)
    line = assert_one_error(code, out, err, f"could not write the checkpoint to {tmp_path / 'run' / 'checkpoints'}",
                            says)
    if fault in ("enospc", "edquot", "torch_enospc_text"):
        assert " MB needed, " in line and " MB free" in line
    assert_nothing_lost(tmp_path / "run", newest_step=2)


@pytest.mark.parametrize("failing_line", [1, 3])
def test_disk_full_during_a_metrics_line_then_resume_loses_nothing(failing_line: int, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    appended = []

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(path, mode, *args, **kwargs)
        if "a" in mode and Path(path).name == "metrics.jsonl":
            appended.append(path)
            if len(appended) == failing_line:
                return HalfWriter(handle)
        return handle

    monkeypatch.setattr(atomic_io, "open", fake_open, raising=False)
    argv = tiny_args(tmp_path, "run", *RUN_ARGS)
    code, out, err = train_main(argv, capsys)
    assert_one_error(code, out, err, f"could not write the metrics to {tmp_path / 'run'}: no space left on device")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, failing_line))  # whole lines only
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    if failing_line == 1:  # nothing to resume: the run starts again
        shutil.rmtree(tmp_path / "run")
        assert train_main(argv, capsys)[0] == 0
    else:
        assert_nothing_lost(tmp_path / "run", newest_step=2)
        assert train_main(["--resume", str(tmp_path / "run"), "--model-name", "tiny"], capsys)[0] == 0
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize("error", ["safetensors", "enospc", "erofs"])
def test_disk_full_during_the_final_model_save(error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The final model's weights are refused half-written; the run's last checkpoint stays, no temporary
    folder is left, and `--resume` of the finished run writes the model once there is room."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel
    raised_by = {"safetensors": lambda: SafetensorError(SAFETENSORS_FULL), "enospc": lambda: os_error(errno.ENOSPC),
                 "erofs": lambda: os_error(errno.EROFS)}[error]

    def refused(self: Any, folder: Any, *args: Any, **kwargs: Any) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"\x08\x00\x00\x00partial")
        raise raised_by()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", refused)
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    says = "read-only file system" if error == "erofs" else "no space left on device; "
    line = assert_one_error(code, out, err, f"could not write the final model to {tmp_path / 'run'}", says)
    if error != "erofs":
        assert " MB needed, " in line
    run = tmp_path / "run"
    assert not (run / "model").exists()
    assert_nothing_lost(run, newest_step=4)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert train_main(["--resume", str(run), "--model-name", "tiny"], capsys)[0] == 0
    assert (run / "model" / "config.json").is_file()
    assert oct((run / "model").stat().st_mode & 0o777) == oct(atomic_io.folder_mode())


def test_disk_full_during_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = atomic_io.tempfile.mkstemp

    def mkstemp(*args: Any, prefix: str = "", **kwargs: Any) -> Any:
        if prefix.startswith(".training_curves"):
            raise os_error(errno.ENOSPC)
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", mkstemp)
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    assert_one_error(code, out, err, f"could not write the plot to {tmp_path / 'run'}: no space left on device")
    assert_nothing_lost(tmp_path / "run", newest_step=4)
    assert not (tmp_path / "run" / "training_curves.png").exists()


# ------------------------------------------------------------------------ disk: wrong and read-only folders

@pytest.mark.parametrize("code_name", ["EROFS", "EACCES", "ENOSPC"])
def test_disk_output_folder_refuses_writes(code_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only (or immutable, or full) output folder: the first write there, the lock file, is refused
    (simulated: root writes into read-only folders)."""
    (tmp_path / "run").mkdir()
    real_open = os.open

    def refusing(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(tmp_path / "run")):
            raise os_error(getattr(errno, code_name))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", refusing)
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    says = {"EROFS": "read-only file system", "EACCES": "permission denied", "ENOSPC": "no space left"}[code_name]
    assert_one_error(code, out, err, f"could not write the run's lock file to {tmp_path / 'run'}: {says}")
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (simulated above)")
def test_disk_real_read_only_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(0o500)
    try:
        code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    finally:
        (tmp_path / "run").chmod(0o700)
    assert_one_error(code, out, err, "permission denied")


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_disk_output_folder_that_is_a_file(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "blocker").write_text("not a folder")
    out_dir = "blocker" if where == "is_a_file" else "blocker/run"
    code, out, err = train_main(tiny_args(tmp_path, out_dir, *RUN_ARGS), capsys)
    assert_clean(code, out, err, 2)
    assert f"--output-dir {tmp_path / out_dir}: cannot create it" in err
    assert (tmp_path / "blocker").read_text() == "not a folder"


def _result_path_cases(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    return {"folder": tmp_path / "folder", "under_a_file": tmp_path / "file" / "r.json"}


@pytest.mark.parametrize("kind", ["folder", "under_a_file", "read_only", "full"])
@pytest.mark.parametrize("script", ["measure_throughput --json", "evaluation --submission", "evaluation --json"])
def test_disk_result_path_refused_before_the_work(script: str, kind: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A result path that cannot be written is refused in argument checking, before minutes of timing or
    decoding (nothing is loaded: the model and data named here do not exist)."""
    cases = _result_path_cases(tmp_path)
    path = cases.get(kind, tmp_path / "r.json")
    if kind in ("read_only", "full"):
        error = os_error(errno.EROFS if kind == "read_only" else errno.ENOSPC)
        monkeypatch.setattr(atomic_io.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(error))
    name, flag = script.split()
    if name == "measure_throughput":
        main, argv = measure_throughput.main, ["--model-name", "no-such/model", "--json", str(path)]
    else:
        submission = path if flag == "--submission" else tmp_path / "submission.json"
        report = path if flag == "--json" else tmp_path / "report.json"
        argv = ["--model", "no-such-model", "--data", "no-such.json", "--submission", str(submission),
                "--json", str(report)]
        main = evaluation.main
    code, out, err = run_in_process(main, argv, capsys)
    assert_clean(code, out, err, 2)
    assert f"{flag} {path}" in err or "could not write" in err, err
    if name == "measure_throughput":
        assert "could not load model" not in err


# ------------------------------------------------------------------------------------------ concurrency

def test_concurrency_second_trainer_is_refused_naming_the_first_pid(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The first trainer (this process holds its lock) is mid-save: its half-written checkpoint and its
    metrics must survive the second trainer's start."""
    run = tmp_path / "run"
    half = run / "checkpoints" / ".tmp-step-00000007-4242"
    half.mkdir(parents=True)
    (half / "state.pt").write_bytes(b"half")
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 2.0}\n')
    before = snapshot(run)
    with run_lock.lock_output_dir(run):
        code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    assert_clean(code, out, err, 2)
    assert f"--output-dir {run} is in use by another run (PID {os.getpid()}" in err
    assert snapshot(run) == before


def test_concurrency_resume_while_the_run_is_going_is_refused(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_a)
    with run_lock.lock_output_dir(run_a):
        code, out, err = train_main(["--resume", str(run_a), "--model-name", "tiny", "--epochs", "2"], capsys)
    assert_clean(code, out, err, 2)
    assert f"PID {os.getpid()}" in err
    assert snapshot(run_a) == before


def test_concurrency_lock_of_another_process_and_its_release_by_kill(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, run_lock\n"
                               "lock = run_lock.lock_output_dir(sys.argv[1]); print('locked', flush=True)\n"
                               "time.sleep(120)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
        assert_clean(code, out, err, 2)
        assert f"in use by another run (PID {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)[0] == 0  # a killed holder's lock is gone


@pytest.mark.parametrize("variant", ["with_run_ids", "folder_without_run_json", "checkpoint_without_run_id"])
def test_concurrency_resume_into_another_runs_folder_is_refused(variant: str, run_a: Path, run_b: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume A --output-dir B`, B holding another finished run: refused; B's metrics.jsonl, checkpoints
    and model are untouched (it once cut B's metrics from 202 lines to 12 and replaced its model)."""
    checkpoint = run_a / "checkpoints" / "step-00000002"
    if variant == "folder_without_run_json":
        (run_b / run_lock.RUN_FILE).unlink()
    if variant == "checkpoint_without_run_id":
        meta = json.loads((checkpoint / "meta.json").read_text())
        del meta["run_id"]
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    before = snapshot(run_b)
    code, out, err = train_main(["--resume", str(checkpoint), "--model-name", "tiny", "--output-dir", str(run_b)],
                                capsys)
    assert_clean(code, out, err, 2)
    assert f"--output-dir {run_b} holds another run than the checkpoint being resumed" in err
    assert snapshot(run_b) == before


def test_concurrency_resume_into_an_empty_folder(run_a: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Allowed: the run continued in a new folder, under the same run id."""
    checkpoint = run_a / "checkpoints" / "step-00000002"
    assert train_main(["--resume", str(checkpoint), "--model-name", "tiny", "--output-dir",
                       str(tmp_path / "copy")], capsys)[0] == 0
    assert run_lock.read_run_id(tmp_path / "copy") == run_lock.read_run_id(run_a)
    assert checkpointing.read_meta(checkpointing.latest_checkpoint(tmp_path / "copy" / "checkpoints"))["run_id"] \
        == run_lock.read_run_id(run_a)


@pytest.mark.parametrize("variant", ["as_written", "folder_without_run_json", "checkpoint_without_run_id",
                                     "neither_has_an_id"])
def test_concurrency_resume_in_its_own_folder(variant: str, run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Allowed: a checkpoint resumed where it lies, also from before run ids or copied without run.json."""
    checkpoint = run_a / "checkpoints" / "step-00000002"
    recorded = run_lock.read_run_id(run_a)
    if variant in ("folder_without_run_json", "neither_has_an_id"):
        (run_a / run_lock.RUN_FILE).unlink()
    if variant in ("checkpoint_without_run_id", "neither_has_an_id"):
        _meta(lambda m: m.pop("run_id"))(checkpoint)
    code, out, err = train_main(["--resume", str(checkpoint), "--model-name", "tiny"], capsys)
    assert code == 0, err
    if variant != "neither_has_an_id":
        assert run_lock.read_run_id(run_a) == recorded
    assert run_lock.read_run_id(run_a) is not None


def test_concurrency_new_run_into_a_folder_with_a_model_is_refused(run_b: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(run_b / "checkpoints")  # only the model is left: still a run worth protecting
    before = snapshot(run_b)
    code, out, err = train_main(tiny_args(tmp_path, "b", *RUN_ARGS), capsys)
    assert_clean(code, out, err, 2)
    assert "already holds a run" in err
    assert snapshot(run_b) == before


def test_concurrency_file_system_without_locks_goes_on_with_a_warning(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Some network mounts refuse flock: the run goes on unprotected, and says so in one warning line."""
    monkeypatch.setattr(run_lock.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(os_error(errno.ENOLCK)))
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "cannot be locked" in warnings[0] and "nothing stops a second run" in warnings[0]


# ----------------------------------------------------------------------------- checkpoint: tampered files

def _meta(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(checkpoint: Path) -> None:
        meta = json.loads((checkpoint / "meta.json").read_text())
        change(meta)
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    return apply


def _meta_text(text: bytes) -> Callable[[Path], None]:
    return lambda checkpoint: (checkpoint / "meta.json").write_bytes(text)


def _state(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(checkpoint: Path) -> None:
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        change(state)
        torch.save(state, checkpoint / "state.pt")
    return apply


def _state_bytes(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda checkpoint: (checkpoint / "state.pt").write_bytes(make((checkpoint / "state.pt").read_bytes()))


class Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > pwned.txt",))


def _pickled(checkpoint: Path) -> None:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["loop"]["epoch_samples"] = Payload()
    torch.save(state, checkpoint / "state.pt")


def _args(**changes: Any) -> Callable[[Path], None]:
    return _meta(lambda m: m["args"].update(changes))


def _rng(key: str, value: Callable[[Any], Any]) -> Callable[[Path], None]:
    return _state(lambda s: s["rng"].__setitem__(key, value(s["rng"][key])))


# name: (tamper, file the line names, field the line names)
TAMPERED: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "loop_extra_key": (_state(lambda s: s["loop"].update(extra=1)), "state.pt", "'loop.extra'"),
    "loop_missing_key": (_state(lambda s: s["loop"].pop("epoch_tokens")), "state.pt", "'loop.epoch_tokens'"),
    "loop_step_a_string": (_state(lambda s: s["loop"].update(step="2")), "state.pt", "'loop.step'"),
    "loop_negative_batch": (_state(lambda s: s["loop"].update(batch=-1)), "state.pt", "'loop.batch'"),
    "loop_step_differs_from_meta": (_state(lambda s: s["loop"].update(step=3)), "state.pt", "'loop.step'"),
    "loop_a_list": (_state(lambda s: s.update(loop=[1, 2])), "state.pt", "'loop'"),
    "meta_epochs_many": (_meta(lambda m: m.update(epochs="many")), "meta.json", "'epochs'"),
    "meta_plan_epochs_many": (_meta(lambda m: m["plan"].update(epochs="many")), "meta.json", "'plan.epochs'"),
    "meta_plan_epochs_zero": (_meta(lambda m: m["plan"].update(epochs=0)), "meta.json", "'plan.epochs'"),
    "meta_plan_max_batches_float": (_meta(lambda m: m["plan"].update(max_batches=2.5)), "meta.json",
                                    "'plan.max_batches'"),
    "meta_plan_a_list": (_meta(lambda m: m.update(plan=[3])), "meta.json", "'plan'"),
    "meta_world_size_string": (_meta(lambda m: m.update(world_size="1")), "meta.json", "'world_size'"),
    "meta_world_size_zero": (_meta(lambda m: m.update(world_size=0)), "meta.json", "'world_size'"),
    "meta_step_negative": (_meta(lambda m: m.update(step=-2)), "meta.json", "'step'"),
    "meta_batch_missing": (_meta(lambda m: m.pop("batch")), "meta.json", "'batch'"),
    "meta_args_missing": (_meta(lambda m: m.pop("args")), "meta.json", "'args'"),
    "meta_args_a_list": (_meta(lambda m: m.update(args=["--lr", "1"])), "meta.json", "'args'"),
    "meta_run_id_a_number": (_meta(lambda m: m.update(run_id=7)), "meta.json", "'run_id'"),
    "meta_format_2": (_meta(lambda m: m.update(format=2)), "meta.json", "format 2"),
    "meta_a_list": (_meta_text(b"[1, 2, 3]"), "meta.json", "expected a JSON object"),
    "meta_empty": (_meta_text(b""), "meta.json", "cannot be read"),
    "meta_not_json": (_meta_text(b"{\"step\": 2,"), "meta.json", "cannot be read"),
    "meta_utf16": (_meta_text('{"step": 2}'.encode("utf-16")), "meta.json", "cannot be read"),
    "meta_deeply_nested": (_meta_text(b"[" * 100000 + b"]" * 100000), "meta.json", "cannot be read"),
    "arg_lr_a_word": (_args(lr="fast"), "meta.json", "'args.lr'"),
    "arg_lr_negative": (_args(lr=-1.0), "meta.json", "'args.lr'"),
    "arg_batch_size_zero": (_args(batch_size=0), "meta.json", "'args.batch_size'"),
    "arg_batch_size_float": (_args(batch_size=2.5), "meta.json", "'args.batch_size'"),
    "arg_augment_a_string": (_args(augment="yes"), "meta.json", "'args.augment'"),
    "arg_precision_unknown": (_args(precision="fp8"), "meta.json", "'args.precision'"),
    "arg_max_length_null": (_args(max_length=None), "meta.json", "'args.max_length'"),
    "arg_time_budget_words": (_args(time_budget="2 weeks"), "meta.json", "'args.time_budget'"),
    "arg_time_budget_inf": (_args(time_budget=float("inf")), "meta.json", "'args.time_budget'"),
    "arg_seed_a_list": (_args(seed=[1]), "meta.json", "'args.seed'"),
    "arg_epochs_many": (_args(epochs="many"), "meta.json", "'args.epochs'"),
    "rng_torch_truncated": (_rng("torch", lambda t: t[:100]), "state.pt", "'rng.torch'"),
    "rng_torch_float": (_rng("torch", lambda t: t.float()), "state.pt", "'rng.torch'"),
    "rng_python_short": (_rng("python", lambda p: [p[0], p[1][:10], p[2]]), "state.pt", "'rng.python'"),
    "rng_numpy_wrong_length": (_rng("numpy", lambda n: [n[0], n[1][:5], n[2], n[3], n[4]]), "state.pt",
                               "'rng.numpy'"),
    "rng_missing": (_state(lambda s: s.pop("rng")), "state.pt", "'rng'"),
    "optimizer_missing": (_state(lambda s: s.pop("optimizer")), "state.pt", "'optimizer'"),
    "optimizer_extra_group": (_state(lambda s: s["optimizer"]["param_groups"].append(
        dict(s["optimizer"]["param_groups"][0], params=[10_000]))), "state.pt", "'optimizer.param_groups'"),
    "optimizer_moment_shape": (_state(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
                               "state.pt", "'optimizer.state[0].exp_avg'"),
    "optimizer_lr_a_string": (_state(lambda s: s["optimizer"]["param_groups"][0].update(lr="x")), "state.pt",
                              "'optimizer.param_groups[0].lr'"),
    "scheduler_last_epoch_string": (_state(lambda s: s["scheduler"].update(last_epoch="2")), "state.pt",
                                    "'scheduler.last_epoch'"),
    "train_step_counter_missing": (_state(lambda s: s["train_step"].pop("micro_steps")), "state.pt",
                                   "'train_step.micro_steps'"),
    "grads_wrong_count": (_state(lambda s: s.update(grads=[torch.zeros(1)])), "state.pt", "'grads'"),
    "model_not_tensors": (_state(lambda s: s.update(model={"w": 1})), "state.pt", "'model'"),
    "state_a_list": (lambda c: torch.save([1, 2], c / "state.pt"), "state.pt", "expected a dict"),
    "state_truncated": (_state_bytes(lambda b: b[: len(b) // 2]), "state.pt", "cannot be read"),
    "state_empty": (_state_bytes(lambda b: b""), "state.pt", "cannot be read"),
    "state_not_a_zip": (_state_bytes(lambda b: b"hello" * 100), "state.pt", "cannot be read"),
    "state_pickled_code": (_pickled, "state.pt", "pickled objects"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_checkpoint_tampered_through_resume(name: str, run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume` of a checkpoint with one field tampered: one line naming the file and the field; the run
    folder (metrics.jsonl, the other checkpoints, the model) is unchanged and no code ran."""
    tamper, file_name, field = TAMPERED[name]
    checkpoint = run_a / "checkpoints" / "step-00000002"
    tamper(checkpoint)
    before = snapshot(run_a)
    code, out, err = train_main(["--resume", str(checkpoint), "--model-name", "tiny"], capsys)
    assert_clean(code, out, err, 2)
    assert str(checkpoint / file_name) in err and field in err, err
    assert snapshot(run_a) == before
    assert not Path("pwned.txt").exists()


def test_checkpoint_untampered_resumes(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the cases above: the same resume of the checkpoint as written succeeds."""
    code, out, err = train_main(["--resume", str(run_a / "checkpoints" / "step-00000002"), "--model-name", "tiny"],
                                capsys)
    assert code == 0, err


@pytest.mark.parametrize("change, expected", [
    ({"trust_remote_code": True}, None),
    ({"model_name": "attacker/model"}, "--model-name 'attacker/model' and this command loads 'tiny'"),
    ({"random_init": True}, "trained with --random-init"),
])
def test_checkpoint_cannot_choose_the_model_or_its_code(change: dict, expected: str | None, run_a: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's source comes from the command line only: a checkpoint turning on remote code is ignored
    (the run loads without it), one naming another model is refused."""
    checkpoint = run_a / "checkpoints" / "step-00000002"
    _args(**change)(checkpoint)
    import run_setup
    loaded = []
    real = run_setup.build_training_step
    monkeypatch.setattr(trainloop, "build_training_step",
                        lambda args, *rest: loaded.append(args.trust_remote_code) or real(args, *rest))
    code, out, err = train_main(["--resume", str(checkpoint), "--model-name", "tiny"], capsys)
    if expected is None:
        assert code == 0 and loaded == [False], err
    else:
        assert_clean(code, out, err, 2)
        assert expected in err and loaded == []


# ---------------------------------------------------------------------------- benchmark_json: --throughput-json

def _raw() -> dict[str, Any]:
    return json.loads(example_result().to_json())


def _json_change(change: Callable[[dict], Any]) -> bytes:
    raw = _raw()
    change(raw)
    return json.dumps(raw).encode()


BENCHMARK_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "gzip": (lambda: gzip.compress(example_result().to_json().encode()), "gzip-compressed"),
    "utf16": (lambda: example_result().to_json().encode("utf-16"), "UTF-16"),
    "latin1_bytes": (lambda: b'{"format": "\xe9"}', "not UTF-8"),
    "empty": (lambda: b"", "not a readable throughput result"),
    "truncated": (lambda: example_result().to_json().encode()[:200], "not a readable throughput result"),
    "a_list": (lambda: b"[1, 2]", "a JSON object is expected"),
    "settings_null": (lambda: _json_change(lambda r: r.update(settings=None)), "settings"),
    "settings_list": (lambda: _json_change(lambda r: r.update(settings=["cpu"])), "settings"),
    "epoch_seconds_string": (lambda: _json_change(lambda r: r.update(epoch_seconds="600")), "epoch_seconds"),
    "epoch_seconds_nan": (lambda: example_result().to_json().replace('"epoch_seconds": 600.0',
                                                                     '"epoch_seconds": NaN').encode(),
                          "epoch_seconds"),
    "epoch_seconds_inf": (lambda: example_result().to_json().replace('"epoch_seconds": 600.0',
                                                                     '"epoch_seconds": Infinity').encode(),
                          "epoch_seconds"),
    "epoch_seconds_negative": (lambda: _json_change(lambda r: r.update(epoch_seconds=-5.0)), "epoch_seconds"),
    "recommendations_null": (lambda: _json_change(lambda r: r.update(recommendations=None)), "recommendations"),
    "recommendations_junk": (lambda: _json_change(lambda r: r.update(recommendations=["junk", 3])),
                             "recommendations[0]"),
    "recommendation_epochs_string": (lambda: _json_change(lambda r: r["recommendations"][0].update(epochs="3")),
                                     "recommendations[0].epochs"),
    "coefficients_wrong_length": (lambda: _json_change(
        lambda r: r["projections"]["linear"].update(coefficients=[1.0])), "projections.linear.coefficients"),
    "coefficients_wrong_type": (lambda: _json_change(
        lambda r: r["projections"]["linear"].update(coefficients=[1.0, "2"])), "projections.linear.coefficients"),
    "coefficients_null": (lambda: _json_change(
        lambda r: r["projections"]["linear"].update(coefficients=None)), "projections.linear.coefficients"),
    "projection_kind_unknown": (lambda: _json_change(lambda r: r["epoch_projection"].update(kind="cubic")),
                                "epoch_projection.kind"),
    "format_other": (lambda: _json_change(lambda r: r.update(format="arc-throughput/0")), "format"),
    "batches_per_epoch_bool": (lambda: _json_change(lambda r: r.update(batches_per_epoch=True)),
                               "batches_per_epoch"),
    "field_missing": (lambda: _json_change(lambda r: r.pop("tier")), "tier"),
}


@pytest.mark.parametrize("epochs", ["2", "auto"])
@pytest.mark.parametrize("name", sorted(BENCHMARK_FILES))
def test_benchmark_json_hostile_file(name: str, epochs: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A hostile --throughput-json: one line naming the file and the field, exit 2, before anything is
    written (no output folder)."""
    make, expected = BENCHMARK_FILES[name]
    path = tmp_path / "results.json"
    path.write_bytes(make())
    argv = tiny_args(tmp_path, "run", "--epochs", epochs, "--time-budget", "30m", "--throughput-json", str(path))
    code, out, err = train_main(argv, capsys)
    assert_clean(code, out, err, 2)
    assert str(path) in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_benchmark_json_folder_instead_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").mkdir()
    code, out, err = train_main(tiny_args(tmp_path, "run", "--throughput-json", str(tmp_path / "results.json")),
                                capsys)
    assert_clean(code, out, err, 2)
    assert "--throughput-json" in err and "no such file" in err


# ------------------------------------------------------------------------- model: hostile saved models

def _weights(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors").write_bytes(make((folder / "model.safetensors").read_bytes()))


def _pickled_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")


SAVED_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights_empty": (_weights(lambda b: b""), "model.safetensors: not a complete safetensors file"),
    "weights_truncated": (_weights(lambda b: b[: len(b) // 2]), "model.safetensors: not a complete safetensors"),
    "weights_header_junk": (_weights(lambda b: b"\xff" * 8 + b[8:]), "model.safetensors: not a complete"),
    "weights_pickled_only": (_pickled_only, "pytorch_model.bin: pickled weights are not loaded"),
    "weights_missing": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    "vocabulary_not_json": (lambda f: (f / "arc_vocabulary.json").write_text("{oops"), "not a readable vocabulary"),
    "vocabulary_other_symbols": (lambda f: (f / "arc_vocabulary.json").write_text('{"symbols": ["a"]}'),
                                 "differs from this code's"),
    "vocabulary_a_list": (lambda f: (f / "arc_vocabulary.json").write_text("[1]"), "differs from this code's"),
}


@pytest.mark.parametrize("name", sorted(SAVED_MODELS))
def test_model_hostile_saved_model_folder(name: str, run_a: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--model-name pointing at a damaged saved model (the fine-tune-again / test-time-training path): one
    line naming the file; pickled weights are never unpickled."""
    import model as model_module
    tamper, expected = SAVED_MODELS[name]
    folder = Path(shutil.copytree(run_a / "model", tmp_path / "saved"))
    assert (folder / model_module.VOCAB_FILE).name == "arc_vocabulary.json"
    tamper(folder)
    argv = tiny_args(tmp_path, "run", *RUN_ARGS)
    argv[argv.index("--model-name") + 1] = str(folder)
    code, out, err = train_main(argv, capsys)
    assert_clean(code, out, err, 2)
    assert expected in err, err


def test_model_saved_model_as_written_trains(run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the same folder, undamaged, is a model to train from."""
    argv = tiny_args(tmp_path, "run", *RUN_ARGS)
    argv[argv.index("--model-name") + 1] = str(run_a / "model")
    assert train_main(argv, capsys)[0] == 0


# ------------------------------------------------------------------------------------ data: hostile --data

def _tasks_file(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "hostile.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


GRID = [[1, 2], [3, 4]]
PAIR = {"input": GRID, "output": GRID}
DATA_FILES: dict[str, Any] = {
    "not_json": b"{not json",
    "empty": b"",
    "gzip": gzip.compress(json.dumps({"t": {"train": [PAIR], "test": [PAIR]}}).encode()),
    "utf16": json.dumps({"t": {"train": [PAIR], "test": [PAIR]}}).encode("utf-16"),
    "a_number": 42,
    "null": None,
    "empty_object": {},
    "cell_10_to_30": {"t": {"train": [{"input": [[10**30]], "output": GRID}], "test": [PAIR]}},
    "cell_2_to_64": {"t": {"train": [{"input": [[2**64]], "output": GRID}], "test": [PAIR]}},
    "cell_negative": {"t": {"train": [{"input": [[-1]], "output": GRID}], "test": [PAIR]}},
    "ragged_grid": {"t": {"train": [{"input": [[1, 2], [3]], "output": GRID}], "test": [PAIR]}},
    "grid_31_wide": {"t": {"train": [{"input": [[1] * 31], "output": GRID}], "test": [PAIR]}},
    "id_forges_an_error_line": {"x\nerror: forged": {"train": "nope", "test": []}},
    "id_clears_the_screen": {"\x1b[2J\x1b[H": {"train": None, "test": []}},
    "id_bidi_override": {"\u202eevil": {"train": [{"input": "x"}], "test": []}},
    "no_train_pairs": {"t": {"train": [], "test": [PAIR]}},
    "nested_too_deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_data_hostile_file_through_the_trainer(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --data file with nothing trainable in it: one error line (after one-line warnings), exit 2, names
    escaped; no output folder is made."""
    data = _tasks_file(tmp_path, DATA_FILES[name])
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS, data=data), capsys)
    assert_clean(code, out, err, 2)
    assert "forged" not in err or "\\nerror: forged" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["missing", "empty_folder", "folder_of_junk"])
def test_data_hostile_path_through_the_trainer(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data"
    if name != "missing":
        path.mkdir()
    if name == "folder_of_junk":
        (path / "a.json").write_bytes(b"\x00\x01junk")
        (path / "b.json").write_text("[]")
    code, out, err = train_main(tiny_args(tmp_path, "run", *RUN_ARGS, data=path), capsys)
    assert_clean(code, out, err, 2)


# --------------------------------------------------------------------------- signal: Ctrl-C while importing

@pytest.mark.parametrize("script", ["trainloop_gpu_finetuned.py", "measure_throughput.py", "evaluation.py",
                                    "arc_dataset.py"])
def test_signal_ctrl_c_during_the_imports(script: str, tmp_path: Path) -> None:
    """SIGINT in the first second (while torch imports): "interrupted", exit 130, no traceback. `-X importtime`
    shows when the script's own imports have begun (the first module after errors, which quiet_interrupts
    came from), so the signal lands inside them however fast or slow the machine is."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / script)], cwd=tmp_path,
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen_errors, lines = False, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        module = line.rsplit("|", 1)[-1].strip()
        if module == "errors":
            seen_errors = True
        elif seen_errors and line.startswith("import time:"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=60)
    err = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert seen_errors, "".join(lines[-5:])
    assert process.returncode == 130, (process.returncode, err)
    assert err == ["interrupted"], err
