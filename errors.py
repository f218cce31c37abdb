"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Raise `UserError` (or a subclass) for anything a user can cause and fix: a bad path, malformed data,
no CUDA, out of memory. Bugs in our own code still raise normally so they can be fixed.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; its message is the single line shown to them."""


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main`, turning user errors into one line and an exit code."""
    try:
        code = main()
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    raise SystemExit(code or 0)
