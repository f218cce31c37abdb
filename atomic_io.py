"""Writes that a crash or a full disk cannot leave half done: write beside the target, then rename over it.

`os.replace` within one folder is atomic, so a reader (a resume, the trainer reading a benchmark result)
sees the old file or folder or the new one, never a mix.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

RETIRED_PREFIX = ".tmp-old-"  # a replaced folder's name while it is being removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, flushed to disk before the rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target`; an existing `target` is swapped out first, then removed."""
    if not target.exists():
        os.replace(source, target)
        return
    retired = target.with_name(f"{RETIRED_PREFIX}{target.name}-{os.getpid()}")
    os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)
