"""Writes that a crash or a full disk cannot leave half done: write beside the target, then rename over it.

`os.replace` within one folder is atomic, so a reader (a resume, the trainer reading a benchmark result)
sees the old file or folder or the new one, never a mix.

Files and folders made here get the permissions a plain `open(path, "w")` / `mkdir` would give
(0666 / 0777 less the umask), not `tempfile`'s private 0600 / 0700. A write the disk refuses (full, read-only,
no permission) ends in one UserError line through `disk_errors`, naming what was written, where, and the
space needed and free.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from errors import UserError

RETIRED_PREFIX = ".tmp-old-"  # a replaced folder's name while it is being removed

# Messages of write failures that do not come as OSError: torch.save's RuntimeError ("PytorchStreamWriter
# failed writing file data/0: file write failed", "[enforce fail at inline_container.cc] ... unexpected pos")
# and safetensors' SafetensorError ("Error while serializing: IoError(Os { code: 28, kind: StorageFull ...").
_WRITE_FAILURE = re.compile(r"write failed|failed writing|PytorchStreamWriter|inline_container|unexpected pos|"
                            r"IoError|No space left|StorageFull|Read-only file system|ReadOnlyFilesystem|"
                            r"Permission denied|PermissionDenied|Disk quota|QuotaExceeded|errno|os error",
                            re.IGNORECASE)
_REASONS = ((re.compile(r"No space left|StorageFull|code: 28\b|os error 28", re.I), errno.ENOSPC),
            (re.compile(r"Disk quota|QuotaExceeded|code: 122\b", re.I), errno.EDQUOT),
            (re.compile(r"Read-only file system|ReadOnlyFilesystem|code: 30\b", re.I), errno.EROFS),
            (re.compile(r"Permission denied|PermissionDenied|code: 13\b", re.I), errno.EACCES))


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore (not thread-safe, done rarely)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_dir(prefix: str, parent: str | os.PathLike) -> Path:
    """`tempfile.mkdtemp` in `parent`, but with a normal folder's permissions (mkdtemp makes it 0700, and
    the folder keeps its mode when it is renamed into place, e.g. a saved model/)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, folder_mode())
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent), None if unknown."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _reason(err: BaseException) -> tuple[str, int | None] | None:
    """(what went wrong in words, errno) for a failed write, or None when `err` is not a write failure."""
    if isinstance(err, OSError):
        code = err.errno
        return (os.strerror(code) if code else str(err) or type(err).__name__), code
    text = str(err)
    if not _WRITE_FAILURE.search(text):
        return None
    for pattern, code in _REASONS:
        if pattern.search(text):
            return os.strerror(code), code
    return "the write failed (" + (text.strip().splitlines() or [type(err).__name__])[0][:120] + ")", None


def disk_error_message(what: str, folder: str | os.PathLike, err: BaseException,
                       needed_bytes: int | None = None, hint: str | None = None) -> str | None:
    """The one line for a refused write, or None when `err` is not a write failure (a bug: let it raise)."""
    found = _reason(err)
    if found is None:
        return None
    reason, code = found
    line = f"could not write {what} to {folder}: {reason[:1].lower()}{reason[1:]}"
    if code in (errno.ENOSPC, errno.EDQUOT, None):
        free = free_bytes(folder)
        sizes = []
        if needed_bytes is not None:
            sizes.append(f"{_mb(needed_bytes)} MB needed")
        if free is not None:
            sizes.append(f"{_mb(free)} MB free")
        if sizes:
            line += "; " + ", ".join(sizes)
        hint = hint or "free disk space or choose another folder"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = hint or "the folder is read-only or not yours: choose another folder"
    return f"{line}; {hint}" if hint else line


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f}" if size >= 1e6 else f"{size / 1e6:.2f}"


@contextlib.contextmanager
def disk_errors(what: str, folder: str | os.PathLike, needed_bytes: int | None = None,
                hint: str | None = None) -> Iterator[None]:
    """Turn a write the disk refuses inside the block into one UserError line, e.g.
    "could not write the final model to runs/x: no space left on device; 1,976 MB needed, 12 MB free; ...".

    Catches OSError, and the RuntimeError of torch.save / SafetensorError of safetensors whose message says
    a write failed (other exceptions are bugs and pass through). The block cleans its own temporaries.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # OSError, torch's RuntimeError, SafetensorError (an Exception subclass)
        message = disk_error_message(what, folder, err, needed_bytes, hint)
        if message is None:
            raise
        raise UserError(message) from err


def write_text_atomic(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    """Write `text` to `path` through a temporary file beside it, flushed to disk before the rename.

    The file gets a normal file's mode (0666 less the umask). A refused write is a UserError naming `what`
    (default: the file's name) and leaves the old file and no temporary behind.
    """
    write_bytes_atomic(path, text.encode(), what)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str | None = None) -> None:
    """`write_text_atomic` for bytes (a PNG): temporary file beside `path`, fsync, rename, normal mode."""
    target = Path(path)
    with disk_errors(what or target.name, target.parent, len(data)):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_line(path: str | os.PathLike, line: str, what: str | None = None) -> None:
    """Append one line (a metrics.jsonl record) and flush it; a refused write is one UserError line. A
    partial line a full disk leaves is cut off again, so the file stays one JSON object per line."""
    target = Path(path)
    data = (line if line.endswith("\n") else line + "\n").encode()
    with disk_errors(what or target.name, target.parent, len(data)):
        with open(target, "ab") as handle:
            start = handle.tell()
            try:
                handle.write(data)
                handle.flush()
            except BaseException:
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target`; an existing `target` is swapped out first, then removed."""
    if not target.exists():
        os.replace(source, target)
        return
    retired = target.with_name(f"{RETIRED_PREFIX}{target.name}-{os.getpid()}")
    os.replace(target, retired)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(retired, target)  # put the old one back: the target never goes missing
        raise
    shutil.rmtree(retired, ignore_errors=True)


def give_normal_permissions(folder: str | os.PathLike) -> None:
    """Set a finished temporary folder and the files in it to normal modes (0777 / 0666 less the umask)
    before it is renamed into place: mkdtemp makes folders 0700, and some writers (safetensors) make 0600
    files. Call it on the temporary folder just before `replace_directory`."""
    folder = Path(folder)
    os.chmod(folder, folder_mode())
    for child in folder.rglob("*"):
        if child.is_symlink():
            continue
        os.chmod(child, folder_mode() if child.is_dir() else file_mode())


def check_writable(path: str | os.PathLike, what: str, flag: str | None = None) -> None:
    """Refuse, before any long work, a result path that cannot be written: a folder, a path under a file,
    a read-only or full folder. Tries a real temporary file beside the target (removed at once), so it
    holds even for root, for whom mode bits do not stop writes. `flag` (e.g. "--json") starts the line."""
    target = Path(path)
    name = f"{flag} {target}" if flag else str(target)
    if target.is_dir():
        raise UserError(f"{name}: is a folder; give a file path for {what}")
    with disk_errors(what, target.parent, hint=f"give {flag or 'a path'} in a writable folder"):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
