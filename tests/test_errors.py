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


# ---- untrusted text and Ctrl-C -------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("plain name.json", "plain name.json"),
    ("x\nerror: forged", "x\\nerror: forged"),
    ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
    ("a\rb\tc", "a\\rb\\tc"),
    ("\u202eevil", "\\u202eevil"),
    ("\x00\x07\x7f\x85", "\\x00\\x07\\x7f\\x85"),
    ("\u2028\u2029", "\\u2028\\u2029"),
    ("\ud800", "\\ud800"),
    ("caf\xe9 \u4e2d\u6587", "caf\xe9 \u4e2d\u6587"),
])
def test_printable_escapes_control_characters(text: str, shown: str) -> None:
    from errors import printable
    assert printable(text) == shown
    assert printable(shown) == shown  # escaping is idempotent on what it produces


@pytest.mark.parametrize("message", ["bad\nerror: forged", "\x1b[2Jcleared", "a\r\rb", "x\u2028y"])
def test_error_line_cannot_forge_lines(message: str) -> None:
    result = run_script(f"def main():\n    raise UserError({message!r})\nrun_cli(main)\n")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "\x1b" not in result.stderr and "\r" not in result.stderr


def test_run_cli_hands_ctrl_c_back_to_keyboard_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    import signal
    import errors
    errors.quiet_interrupts()
    assert signal.getsignal(signal.SIGINT) is errors._interrupted_while_starting
    try:
        def main() -> int:
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            raise KeyboardInterrupt
        with pytest.raises(SystemExit) as ended:
            errors.run_cli(main)
        assert ended.value.code == errors.EXIT_INTERRUPTED
        assert capsys.readouterr().err == "interrupted\n"
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_ctrl_c_during_slow_imports_is_one_line(tmp_path: Path) -> None:
    """SIGINT while a script is still importing (torch takes 1-2 s): "interrupted", exit 130, no traceback."""
    import signal
    import time
    (tmp_path / "slow_module.py").write_text("import time\nprint('importing', flush=True)\ntime.sleep(30)\n")
    script = (f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]\n"
              "import errors\nerrors.quiet_interrupts()\nimport slow_module\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "importing\n"
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err == "interrupted\n"
