"""run_lock: one run per output folder (an flock a crash releases) and a run identity that keeps a resumed
run from writing over another run's folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run_lock
from adversarial import assert_clean, assert_one_line, run_in_process
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_second_lock_on_a_folder_names_the_first_pid(tmp_path: Path) -> None:
    with run_lock.lock_output_dir(tmp_path / "run"):
        with pytest.raises(UserError) as raised:
            run_lock.lock_output_dir(tmp_path / "run")
        assert_one_line(str(raised.value), "in use by another run", f"PID {os.getpid()}")
    with run_lock.lock_output_dir(tmp_path / "run"):  # released: the next run gets it
        pass


def test_lock_is_released_by_a_crash(tmp_path: Path) -> None:
    """A holder killed with SIGKILL leaves the lock file but not the lock."""
    script = (f"import sys, os, signal\nsys.path.insert(0, {str(ROOT)!r})\nimport run_lock\n"
              f"lock = run_lock.lock_output_dir({str(tmp_path)!r})\nprint('locked', flush=True)\n"
              "sys.stdin.readline()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match=f"PID {holder.pid}"):
        run_lock.lock_output_dir(tmp_path)
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=30) == -signal.SIGKILL
    run_lock.lock_output_dir(tmp_path).release()
    assert (tmp_path / run_lock.LOCK_FILE).exists()


@pytest.mark.parametrize("content", [b"", b"garbage\x1b[2J", b'{"pid": "1\\nerror: forged"}', b"[1]"])
def test_hostile_lock_file_contents(content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = run_lock.lock_output_dir(tmp_path)
    os.pwrite(held.fd, content.ljust(200, b" "), 0)
    try:
        code, out, err = run_in_process(lambda argv: run_lock.lock_output_dir(tmp_path) and 0, [], capsys)
    finally:
        held.release()
    assert_clean(code, out, err, 2)
    assert "in use by another run" in err


def test_lock_in_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as raised:
        run_lock.lock_output_dir(tmp_path / "file" / "run")
    assert_one_line(str(raised.value), "could not write the run's lock file")


def make_run(folder: Path, run_id: str | None, files: tuple[str, ...] = ("metrics.jsonl",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
        else:
            path.write_text("{}\n")
    if run_id is not None:
        run_lock.write_run_identity(folder, run_id)
    return folder


CHECKPOINT = "checkpoints/step-00000010/"
SAME_RUN = {  # what the folder holds (its run id, files), the writer's run id, resuming -> allowed
    "empty_folder_new_run": (None, (), "new", False, True),
    "missing_folder_new_run": ("missing", (), "new", False, True),
    "same_id_resumes": ("A", ("metrics.jsonl", CHECKPOINT), "A", True, True),
    "other_id_refused_on_resume": ("B", ("metrics.jsonl", "model/"), "A", True, False),
    "other_id_checkpoint_refused_for_new_run": ("B", ("metrics.jsonl", CHECKPOINT), "new", False, False),
    "old_run_without_id_refused": (None, ("metrics.jsonl", CHECKPOINT), "A", True, False),
    "old_checkpoint_into_its_old_folder": (None, ("metrics.jsonl", CHECKPOINT), None, True, True),
    "only_a_model_refused": (None, ("model/",), "A", False, False),
    "garbage_run_json_refused": ("garbage", ("model/",), "A", True, False),
    "killed_before_first_checkpoint_taken_over": ("B", ("metrics.jsonl", "checkpoints/"), "new", False, True),
    "temporary_checkpoint_only_taken_over": ("B", ("checkpoints/.tmp-step-00000004-9/",), "new", False, True),
    "user_files_only": (None, ("notes.txt",), "A", False, True),
}


@pytest.mark.parametrize("name", sorted(SAME_RUN))
def test_same_run_or_not(name: str, tmp_path: Path) -> None:
    holder, files, writer, resuming, allowed = SAME_RUN[name]
    folder = tmp_path / "B"
    if holder != "missing":
        make_run(folder, holder if holder not in (None, "garbage") else None, files)
    if holder == "garbage":
        (folder / run_lock.RUN_FILE).write_text("[not json")
    writer_id = "new-id" if writer == "new" else writer
    assert run_lock.is_same_run(folder, writer_id) == allowed
    if allowed:
        run_lock.check_same_run(folder, writer_id, resuming)
    else:
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        with pytest.raises(UserError) as raised:
            run_lock.check_same_run(folder, writer_id, resuming)
        assert_one_line(str(raised.value), str(folder), "another run" if resuming else "already holds a run")
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing lost


def test_run_identity_round_trip(tmp_path: Path) -> None:
    run_id = run_lock.new_run_id()
    assert run_id != run_lock.new_run_id()
    run_lock.write_run_identity(tmp_path, run_id)
    assert run_lock.read_run_id(tmp_path) == run_id
    assert json.loads((tmp_path / run_lock.RUN_FILE).read_text()) == {"run_id": run_id}


def test_file_system_without_flock_goes_on_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    lock = run_lock.lock_output_dir(tmp_path)
    assert lock.fd is None and "cannot be locked" in lock.note
