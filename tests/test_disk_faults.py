"""Full disks, read-only folders and refused writes: every write gives ONE line naming what, where, and the
space needed and free; the previous checkpoint (or file) stays intact and no temporary is left behind.
ENOSPC and friends are simulated by monkeypatching the write calls (this machine's disk is not full), as
the errors torch.save, safetensors and plain writes raise on a real full disk."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import atomic_io
import checkpointing
from adversarial import DISK_FAULTS, HalfWriter, assert_clean, assert_one_line, os_error, run_in_process
from atomic_io import append_line, disk_errors, give_normal_permissions, make_temp_dir, write_text_atomic
from checkpointing import list_checkpoints, load_checkpoint, save_checkpoint
from errors import UserError
from tiny_checkpoint import LOOP_TYPES, full_state

# What a full disk looks like from each writer (messages as torch 2.13 / safetensors 0.8 / the OS give them).
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })')




def saved(tmp_path: Path) -> Path:
    """A checkpoints folder holding one good checkpoint (step 3)."""
    state, meta = full_state(1.0)
    save_checkpoint(tmp_path / "checkpoints", 3, state, meta, keep=3)
    return tmp_path / "checkpoints"


def assert_previous_intact(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == ["step-00000003"], list(folder.iterdir())  # no .tmp-*
    state, meta = load_checkpoint(folder / "step-00000003", LOOP_TYPES)
    assert meta["step"] == 3 and state["model"]["weight"][0, 0].item() == 1.0


def partial_then(err: Callable[[], BaseException]) -> Callable[..., None]:
    """A torch.save that writes half a file, as a disk filling up mid-write does, then fails."""
    def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"PK\x03\x04" + b"\x00" * 512)
        raise err()
    return save


@pytest.mark.parametrize("fault", sorted(DISK_FAULTS))
def test_checkpoint_save_refused_by_torch_save(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = saved(tmp_path)
    error, says = DISK_FAULTS[fault]
    monkeypatch.setattr(checkpointing.torch, "save", partial_then(error))
    state, meta = full_state(2.0, step=6)
    with pytest.raises(UserError) as raised:
        save_checkpoint(folder, 6, state, meta, keep=3)
    assert_one_line(str(raised.value), f"could not write the checkpoint to {folder}", says)
    if fault in ("enospc", "torch_unexpected_pos", "torch_enospc_text"):
        assert "MB needed" in str(raised.value) and "MB free" in str(raised.value)
    assert_previous_intact(folder)


@pytest.mark.parametrize("fault", ["enospc", "erofs", "eio"])
@pytest.mark.parametrize("step", ["meta_json", "fsync", "rename"])
def test_checkpoint_save_refused_later(fault: str, step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = saved(tmp_path)
    error, says = DISK_FAULTS[fault]

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error()
    target = {"meta_json": "_write_json", "fsync": "_fsync_path", "rename": "replace_directory"}[step]
    monkeypatch.setattr(checkpointing, target, fail)
    state, meta = full_state(2.0, step=6)
    with pytest.raises(UserError) as raised:
        save_checkpoint(folder, 6, state, meta, keep=3)
    assert_one_line(str(raised.value), "could not write the checkpoint", says)
    assert_previous_intact(folder)


def test_a_bug_inside_a_save_still_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = saved(tmp_path)
    monkeypatch.setattr(checkpointing.torch, "save", partial_then(lambda: RuntimeError("expected a Tensor")))
    with pytest.raises(RuntimeError, match="expected a Tensor"):
        save_checkpoint(folder, 6, *full_state(2.0, step=6), keep=3)
    assert_previous_intact(folder)  # and still no temporary left


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as raised:
        save_checkpoint(blocker / "checkpoints", 1, *full_state(), keep=1)
    assert_one_line(str(raised.value), "could not write the checkpoint")
    with pytest.raises(UserError) as raised:
        write_text_atomic(blocker / "result.json", "{}", what="the benchmark result")
    assert_one_line(str(raised.value), "could not write the benchmark result")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (covered by EROFS/EACCES above)")
def test_real_read_only_folder(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError) as raised:
            save_checkpoint(folder, 6, *full_state(2.0, step=6), keep=3)
        assert_one_line(str(raised.value), "could not write the checkpoint", "permission denied")
    finally:
        folder.chmod(0o700)
    assert_previous_intact(folder)


# ---- JSON / text files and metrics lines ------------------------------------------------------------

@pytest.mark.parametrize("fault", ["enospc", "edquot", "erofs", "eio"])
def test_atomic_text_write_refused(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.json"
    target.write_text('{"old": true}\n')
    error, says = DISK_FAULTS[fault]

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error()
    monkeypatch.setattr(atomic_io.os, "fsync", fail)
    with pytest.raises(UserError) as raised:
        write_text_atomic(target, json.dumps({"new": "x" * 10_000}), what="the benchmark result")
    assert_one_line(str(raised.value), f"could not write the benchmark result to {tmp_path}", says)
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_metrics_line_refused_leaves_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    real_open = open

    monkeypatch.setattr("builtins.open", lambda *a, **k: HalfWriter(real_open(*a, **k)))
    with pytest.raises(UserError) as raised:
        append_line(path, json.dumps({"step": 2, "loss": 1.0}), what="the metrics")
    monkeypatch.undo()
    assert_one_line(str(raised.value), "could not write the metrics", "no space left on device")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}]


@pytest.mark.parametrize("error", ["safetensors", "enospc", "erofs"])
def test_model_save_wrapper(error: str, tmp_path: Path) -> None:
    """What the final model's save gets: `with disk_errors("the final model", folder): save_pretrained(...)`."""
    from safetensors import SafetensorError
    raised_by = {"safetensors": SafetensorError(SAFETENSORS_FULL), "enospc": os_error(errno.ENOSPC),
                 "erofs": os_error(errno.EROFS)}[error]
    with pytest.raises(UserError) as raised:
        with disk_errors("the final model", tmp_path, needed_bytes=2_000_000_000):
            raise raised_by
    says = "read-only" if error == "erofs" else "no space left on device; 2,000 MB needed"
    assert_one_line(str(raised.value), f"could not write the final model to {tmp_path}", says)


def test_disk_errors_lets_bugs_through(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with disk_errors("x", tmp_path):
            raise ValueError("a bug")
    with pytest.raises(RuntimeError, match="size mismatch"):
        with disk_errors("x", tmp_path):
            raise RuntimeError("size mismatch for weight")


def test_a_refused_write_through_the_cli_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str]) -> int:
        write_text_atomic(tmp_path / "x\nerror: forged.json", "{}", what="the result")
        return 0
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: (_ for _ in ()).throw(os_error(errno.ENOSPC)))
    code, out, err = run_in_process(main, [], capsys)
    assert_clean(code, out, err, 2)


# ---- permissions: what a normal write gives, not mkstemp's 0600 / mkdtemp's 0700 ---------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_get_normal_modes(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "result.json", "{}\n")
        append_line(tmp_path / "metrics.jsonl", "{}")
        checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, *full_state(), keep=1)
        model = make_temp_dir(".model.tmp-", tmp_path)
        (model / "model.safetensors").write_bytes(b"x")
        os.chmod(model / "model.safetensors", 0o600)  # as safetensors leaves it
        give_normal_permissions(model)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for path in (tmp_path / "result.json", tmp_path / "metrics.jsonl", checkpoint / "state.pt",
                 checkpoint / "meta.json", model / "model.safetensors"):
        assert mode(path) == 0o666 & ~umask, path
    for path in (checkpoint, model):
        assert mode(path) == 0o777 & ~umask, path


# ---- a result path checked before the minutes of work -------------------------------------------------

def _result_path(tmp: Path, kind: str) -> Path:
    if kind == "folder":
        return tmp
    if kind == "under_a_file":
        (tmp / "file").write_text("x")
        return tmp / "file" / "result.json"
    if kind == "new_subfolder":
        return tmp / "new" / "result.json"
    return tmp / "result.json"


@pytest.mark.parametrize("kind, ok", [("folder", False), ("under_a_file", False), ("new_subfolder", True),
                                      ("plain", True)])
def test_result_path_checked_before_work(kind: str, ok: bool, tmp_path: Path) -> None:
    path = _result_path(tmp_path, kind)
    if ok:
        atomic_io.check_writable(path, "the benchmark result", "--json")
        assert not path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".probe")]
    else:
        with pytest.raises(UserError) as raised:
            atomic_io.check_writable(path, "the benchmark result", "--json")
        assert_one_line(str(raised.value), "the benchmark result")


def test_result_path_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_io.os, "write", lambda fd, data: (_ for _ in ()).throw(os_error(errno.ENOSPC)))
    with pytest.raises(UserError) as raised:
        atomic_io.check_writable(tmp_path / "r.json", "the benchmark result", "--json")
    monkeypatch.undo()
    assert_one_line(str(raised.value), "could not write the benchmark result", "no space left on device")
    assert list(tmp_path.iterdir()) == []
