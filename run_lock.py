"""One run per output folder: an OS lock held for the run's lifetime, and a run identity in the folder.

Two trainers on one `--output-dir` would interleave their metrics.jsonl lines and overwrite each other's
checkpoints. `lock_output_dir` takes an exclusive `fcntl.flock` on `<dir>/.lock` (the file also records
the holder's PID, host and start time for the message the second run gets). The kernel releases a flock
when its process ends, however it ends (kill -9, a crash), so a stale lock never blocks a later run; the
file left behind is harmless.

A resumed run must write into its own folder only (`--resume A --output-dir B`, B holding another run,
once cut B's metrics.jsonl from 202 lines to 12 and replaced its model). Each run gets an id at its start
(`new_run_id`), written to `<dir>/run.json` and carried in every checkpoint's meta.json (`run_id`);
`check_same_run` refuses a folder whose run.json names another run.

How the trainer uses it: `trainloop_gpu_finetuned.prepare_output`, rank 0 only, right after mkdir and
BEFORE `remove_stale_temporaries` (which would otherwise delete a running trainer's half-written checkpoint),
takes `lock_output_dir` and keeps it until `train()` ends; decides the run's id (`new_run_id()` for a new
run, the checkpoint's meta.json `run_id` on a resume); calls `check_same_run` before metrics.jsonl is
emptied or restored; then `write_run_identity`. Every checkpoint's meta.json carries the `run_id`.

On a file system without flock support the lock is skipped (`OutputLock.note` says so, for the banner)
rather than refusing the run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomic_io import disk_errors, file_mode, write_text_atomic
from errors import UserError, printable

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
MODEL_DIR, CHECKPOINT_GLOB = "model", "checkpoints/step-*"


@dataclass
class OutputLock:
    """An exclusive lock on an output folder, held until `release` or the process ends."""
    path: Path
    fd: int | None
    note: str | None = None  # set when the file system could not lock: the run goes on unprotected

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_output_dir(folder: str | os.PathLike) -> OutputLock:
    """Take the folder's lock or raise UserError naming the run that holds it (its PID and host)."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    with disk_errors("the run's lock file", folder, hint="choose a writable --output-dir"):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise UserError(f"--output-dir {printable(folder)} is in use by another run ({holder}); wait for it to "
                        f"end or choose another --output-dir") from None
    except OSError as err:  # a file system without flock (some network mounts): go on, and say so
        os.close(fd)
        return OutputLock(path, None, f"{printable(folder)} cannot be locked ({err.strerror}): nothing stops a "
                                      f"second run from writing there")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
    except OSError:
        pass  # the lock holds without the record; a second run's message just says less
    return OutputLock(path, fd)


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "PID unknown"
    text = f"PID {printable(info['pid'])}"
    if info.get("host") and info["host"] != socket.gethostname():
        text += f" on {printable(info['host'])}"
    if info.get("started"):
        text += f", started {printable(info['started'])}"
    return text


def new_run_id() -> str:
    """A fresh id for a run, written at its start and carried in its checkpoints."""
    return uuid.uuid4().hex


def read_run_id(folder: str | os.PathLike) -> str | None:
    """The run id recorded in `folder`, or None where there is none (or it is unreadable)."""
    try:
        info = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    run_id = info.get("run_id") if isinstance(info, dict) else None
    return run_id if isinstance(run_id, str) else None


def holds_a_run(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a run worth protecting: a checkpoint or a final model. A run killed before its
    first checkpoint leaves only metrics lines that no resume can continue; a new run may take that over."""
    folder = Path(folder)
    return (folder / MODEL_DIR).exists() or next(iter(folder.glob(CHECKPOINT_GLOB)), None) is not None


def is_same_run(folder: str | os.PathLike, run_id: str | None) -> bool:
    """True when writing run `run_id` into `folder` cannot destroy another run: the folder holds no run
    (`holds_a_run`), or its run.json names `run_id`. A folder with a run but no run.json (written before run ids) is the
    same run only when `run_id` is None too (a checkpoint from before run ids, resumed in place)."""
    folder = Path(folder)
    if not holds_a_run(folder):
        return True
    recorded = read_run_id(folder)
    if recorded is None:
        return run_id is None
    return recorded == run_id


def check_same_run(folder: str | os.PathLike, run_id: str | None, resuming: bool) -> None:
    """Raise UserError unless run `run_id` may write into `folder` (see `is_same_run`)."""
    if is_same_run(folder, run_id):
        return
    folder = Path(folder)
    if resuming:
        raise UserError(f"--output-dir {printable(folder)} holds another run than the checkpoint being resumed; "
                        f"resuming there would overwrite its metrics and model: resume into the checkpoint's own "
                        f"run folder (leave out --output-dir) or into an empty folder")
    raise UserError(f"--output-dir {printable(folder)} already holds a run; a new run there would overwrite its "
                    f"metrics, checkpoints and model: choose an empty folder, or --resume it")


def write_run_identity(folder: str | os.PathLike, run_id: str) -> None:
    """Record `run_id` as the run that owns `folder` (atomically, with normal permissions)."""
    write_text_atomic(Path(folder) / RUN_FILE, json.dumps({"run_id": run_id}) + "\n", what="the run identity")
