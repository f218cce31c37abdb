"""errors.run_cli: how a script ends — one line and an exit code for user errors, and, after leaving a
torchrun group, os._exit with the same code and every printed line flushed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(body: str) -> subprocess.CompletedProcess:
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom errors import *\n{body}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("skip", [False, True])
def test_user_error_is_one_line_and_exit_code_2(skip: bool) -> None:
    result = run_script(("skip_interpreter_teardown()\n" if skip else "") +
                        "def main():\n    raise UserError('bad path x.json: use --data')\nrun_cli(main)\n")
    assert result.returncode == 2
    assert result.stderr == "error: bad path x.json: use --data\n"


def test_skipping_teardown_keeps_the_exit_code_and_unflushed_output() -> None:
    # print() to a pipe is block-buffered: os._exit without a flush would lose this line.
    result = run_script("skip_interpreter_teardown()\n"
                        "import atexit\natexit.register(lambda: print('teardown ran'))\n"
                        "def main():\n    print('summary line')\n    return 3\nrun_cli(main)\n")
    assert result.returncode == 3
    assert result.stdout == "summary line\n"  # and the interpreter's exit handlers did not run


def test_a_bug_after_leaving_a_group_still_shows_its_traceback() -> None:
    result = run_script("skip_interpreter_teardown()\n"
                        "def main():\n    return 1 / 0\nrun_cli(main)\n")
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr


def test_without_a_group_the_interpreter_ends_normally() -> None:
    result = run_script("import atexit\natexit.register(lambda: print('teardown ran'))\n"
                        "def main():\n    return 0\nrun_cli(main)\n")
    assert (result.returncode, result.stdout) == (0, "teardown ran\n")
