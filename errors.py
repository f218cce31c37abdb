"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Raise `UserError` (or a subclass) for anything a user can cause and fix: a bad path, malformed data,
no CUDA, out of memory. Bugs in our own code still raise normally so they can be fixed.

Names and ids read from files (a file name, a task id) are untrusted: `printable` escapes their control
characters, and `run_cli` applies it to every error line, so a message is always exactly one line and
cannot forge another line or clear the terminal.

A script calls `quiet_interrupts()` first thing, before its heavy imports (torch takes ~1-2 s): a Ctrl-C
during the imports then prints "interrupted" and exits 130 instead of a KeyboardInterrupt traceback, and
`run_cli` takes over from there.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UserError(Exception):
    """A problem the user can fix; its message is the single line shown to them."""


def printable(text: Any) -> str:
    """`text` with every non-printable character escaped (newline as `\\n`, ESC as `\\x1b`, a bidi
    override as `\\u202e`, ...): safe to print from untrusted names, and always a single line."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
    return "".join(out)


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def quiet_interrupts() -> None:
    """Until `run_cli` starts, Ctrl-C ends the process with "interrupted" and exit code 130 (no traceback
    from inside an import). Call it at the very top of a script, before `import torch`."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)


_skip_teardown = False


def skip_interpreter_teardown() -> None:
    """Make `run_cli` end this process with os._exit once its outputs are flushed, skipping the
    destructors that run when the interpreter shuts down. distributed.py asks for it after leaving a
    torchrun group: a gloo process group's destructor can deadlock (see DistributedContext.cleanup)."""
    global _skip_teardown
    _skip_teardown = True


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main`, turning user errors into one line and an exit code."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is a KeyboardInterrupt
    try:
        code = main() or 0
    except UserError as err:
        print(f"error: {printable(err)}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except Exception:  # a bug: keep its traceback, but still end the process the safe way
        if not _skip_teardown:
            raise
        traceback.print_exc()
        code = 1
    if _skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
