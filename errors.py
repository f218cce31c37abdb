"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Raise `UserError` (or a subclass) for anything a user can cause and fix: a bad path, malformed data,
no CUDA, out of memory. Bugs in our own code still raise normally so they can be fixed.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; its message is the single line shown to them."""


_skip_teardown = False


def skip_interpreter_teardown() -> None:
    """Make `run_cli` end this process with os._exit once its outputs are flushed, skipping the
    destructors that run when the interpreter shuts down. distributed.py asks for it after leaving a
    torchrun group: a gloo process group's destructor can deadlock (see DistributedContext.cleanup)."""
    global _skip_teardown
    _skip_teardown = True


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main`, turning user errors into one line and an exit code."""
    try:
        code = main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
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
