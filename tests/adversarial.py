"""What every adversarial case asserts: the script ends the way `errors.run_cli` ends it, with the expected
exit code, at most ONE error line (the last), warnings each on one line, no traceback, and no raw control
character on the terminal (a name from a file cannot forge a line or clear the screen)."""
from __future__ import annotations

import errno
import os
import re
from typing import Any, Callable, Sequence

import pytest

from errors import run_cli

# Any C0/C1 control character or other non-printable one, except the newline that ends each line.
_RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def run_in_process(main: Callable[[Sequence[str]], int | None], argv: Sequence[str],
                   capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `run_cli(main(argv))`, in this process (no interpreter start-up).
    A bug in our code propagates as its exception, so the test fails with the traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run_cli(lambda: main(list(argv)))
    out, err = capsys.readouterr()
    return int(ended.value.code or 0), out, err


def assert_clean(code: int, out: str, err: str, expected: int | Sequence[int] = (0, 2)) -> None:
    """The exit code is expected; stderr holds only one-line warnings and at most one error line, last."""
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    assert code in allowed, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert all(line.startswith(("warning: ", "error: ")) for line in lines), err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == (1 if code == 2 else 0), err
    if errors:
        assert lines[-1] == errors[0]
    assert not _RAW_CONTROL.search(err), repr(err)
    assert not _RAW_CONTROL.search(out), repr(out[:200])


def assert_one_line(message: str, *fragments: str) -> None:
    """A UserError message: one line, printable, naming each fragment (a file, a field)."""
    assert "\n" not in message and not _RAW_CONTROL.search(message), repr(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def os_error(code: int) -> OSError:
    """The OSError a system call gives for `code` (errno.ENOSPC: a full disk)."""
    return OSError(code, os.strerror(code))


class HalfWriter:
    """A file whose next write lands half its bytes, then finds the disk full."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise os_error(errno.ENOSPC)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "HalfWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


# What torch.save raises on a full disk (its own text, not an OSError).
TORCH_FULL = "[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1024"
TORCH_WRITE_FAILED = "PytorchStreamWriter failed writing file data/0: file write failed"

DISK_FAULTS: dict[str, tuple[Callable[[], BaseException], str]] = {  # the error, what the line must say
    "enospc": (lambda: os_error(errno.ENOSPC), "no space left on device"),
    "edquot": (lambda: os_error(errno.EDQUOT), "quota"),
    "erofs": (lambda: os_error(errno.EROFS), "read-only file system"),
    "eacces": (lambda: os_error(errno.EACCES), "permission denied"),
    "eio": (lambda: os_error(errno.EIO), "input/output error"),
    "torch_unexpected_pos": (lambda: RuntimeError(TORCH_FULL), "the write failed"),
    "torch_write_failed": (lambda: RuntimeError(TORCH_WRITE_FAILED), "the write failed"),
    "torch_enospc_text": (lambda: RuntimeError(f"{TORCH_WRITE_FAILED}: No space left on device"),
                          "no space left on device"),
}
