"""Hostile data files against the data loader and its CLI (`arc_dataset.py --stats / --show`), in process.

Each case writes a file (or folder) a hostile user or a broken download could produce and runs the real
command line through `errors.run_cli`: it must end with exit 0 (valid data, perhaps with warnings) or 2 (one
error line), never a traceback, and never print a raw control character from a name or id."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

import arc_dataset as ad
from adversarial import assert_clean, run_in_process
from errors import UserError

GOOD_PAIR = {"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}


def task(**override: Any) -> dict:
    value = {"train": [GOOD_PAIR, {"input": [[0, 5]], "output": [[5, 0]]}], "test": [{"input": [[7]], "output": [[7]]}]}
    value.update(override)
    return value


def grid_case(grid: Any) -> str:
    """A tasks file whose first train input is `grid` (as JSON text, so NaN and huge numbers pass through)."""
    return '{"t1": {"train": [{"input": ' + grid + ', "output": [[1]]}], "test": []}, "t2": ' + json.dumps(task()) + "}"


# name -> file bytes (or text); the expected exit code.
FILES: dict[str, tuple[bytes | str, int]] = {
    "empty": (b"", 2),
    "whitespace": (b" \n\t\n", 2),
    "null": ("null", 2),
    "true": ("true", 2),
    "number": ("42", 2),
    "string": ('"tasks"', 2),
    "list": ("[]", 2),
    "list_of_tasks": (json.dumps([task()]), 2),
    "empty_object": ("{}", 2),
    "truncated": ('{"a": {"train": [{"input": [[1', 2),
    "bad_json": ("{a: 1}", 2),
    "trailing_garbage": (json.dumps({"a": task()}) + "}}", 2),
    "binary": (bytes(range(256)) * 8, 2),
    "nul_bytes": (b"\x00" * 1000, 2),
    "gzip": (gzip.compress(json.dumps({"a": task()}).encode()), 2),
    "utf16_le_bom": (b"\xff\xfe" + json.dumps({"a": task()}).encode("utf-16-le"), 2),
    "utf16_be": (json.dumps({"a": task()}).encode("utf-16-be"), 2),
    "utf32": (json.dumps({"a": task()}).encode("utf-32"), 2),
    "utf8_bom": (b"\xef\xbb\xbf" + json.dumps({"a": task()}).encode(), 0),
    "latin1_id": (('{"caf\xe9": ' + json.dumps(task()) + "}").encode("latin-1"), 2),
    "deep_lists": ("[" * 200_000 + "]" * 200_000, 2),
    "deep_objects": ('{"a":' * 100_000 + "1" + "}" * 100_000, 2),
    "huge_integer": ("1" * 20_000, 2),
    "nan_top": ("NaN", 2),
    "lone_surrogate_id": ('{"\\ud800": ' + json.dumps(task()) + "}", 0),
    "task_null": ('{"a": null}', 2),
    "task_list": ('{"a": []}', 2),
    "task_string": ('{"a": "x"}', 2),
    "task_number": ('{"a": 1e309}', 2),
    "train_null": (json.dumps({"a": task(train=None)}), 2),
    "train_missing": (json.dumps({"a": {"test": []}}), 2),
    "train_string": (json.dumps({"a": task(train="pairs")}), 2),
    "train_object": (json.dumps({"a": task(train={"input": [[1]]})}), 2),
    "train_empty": (json.dumps({"a": task(train=[])}), 2),
    "train_pair_null": (json.dumps({"a": task(train=[None])}), 2),
    "train_pair_number": (json.dumps({"a": task(train=[1])}), 2),
    "train_pair_empty": (json.dumps({"a": task(train=[{}])}), 2),
    "train_pair_no_output": (json.dumps({"a": task(train=[{"input": [[1]]}])}), 2),
    "test_null": (json.dumps({"a": task(test=None)}), 2),
    "test_string": (json.dumps({"a": task(test="x")}), 2),
    "test_pair_null": (json.dumps({"a": task(test=[None])}), 2),
    "test_pair_no_input": (json.dumps({"a": task(test=[{"output": [[1]]}])}), 2),
    "test_output_bad": (json.dumps({"a": task(test=[{"input": [[1]], "output": [[11]]}])}), 2),
    "grid_null": (grid_case("null"), 0),
    "grid_empty": (grid_case("[]"), 0),
    "grid_empty_row": (grid_case("[[]]"), 0),
    "grid_ragged": (grid_case("[[1, 2], [3]]"), 0),
    "grid_row_number": (grid_case("[1, 2]"), 0),
    "grid_3d": (grid_case("[[[1]]]"), 0),
    "grid_string_cell": (grid_case('[["1"]]'), 0),
    "grid_float_cell": (grid_case("[[1.5]]"), 0),
    "grid_bool_cell": (grid_case("[[true]]"), 0),
    "grid_null_cell": (grid_case("[[null]]"), 0),
    "grid_object_cell": (grid_case("[[{}]]"), 0),
    "grid_negative": (grid_case("[[-1]]"), 0),
    "grid_ten": (grid_case("[[10]]"), 0),
    "grid_10e30": (grid_case("[[" + str(10**30) + "]]"), 0),
    "grid_2e64": (grid_case("[[" + str(2**64) + "]]"), 0),
    "grid_minus_2e64": (grid_case("[[-" + str(2**64) + "]]"), 0),
    "grid_1000_digits": (grid_case("[[" + "9" * 1000 + "]]"), 0),
    "grid_nan": (grid_case("[[NaN]]"), 0),
    "grid_infinity": (grid_case("[[Infinity, -Infinity]]"), 0),
    "grid_1e400": (grid_case("[[1e400]]"), 0),
    "grid_31x31": (grid_case(json.dumps([[0] * 31] * 31)), 0),
    "grid_1x31": (grid_case(json.dumps([[0] * 31])), 0),
    "grid_10000_rows": (grid_case(json.dumps([[0]] * 10_000)), 0),
    "grid_string": (grid_case('"[[1]]"'), 0),
    "id_train": (json.dumps({"train": task(), "b": task()}), 0),
    "id_train_only": (json.dumps({"train": task()}), 0),
    "id_test_and_train": (json.dumps({"train": task(), "test": task()}), 0),
    "id_newline_forges_error": (json.dumps({"x\nerror: forged line": task(train=None), "ok": task()}), 0),
    "id_escape_clears_screen": (json.dumps({"\x1b[2J\x1b[H": task(train=None), "ok": task()}), 0),
    "id_carriage_return": (json.dumps({"a\rwarning: nothing wrong": task(train=[]), "ok": task()}), 0),
    "id_bidi_override": (json.dumps({"\u202eevil": task(train=[]), "ok": task()}), 0),
    "id_bell_and_nul": (json.dumps({"\x07\x00": task(train=[]), "ok": task()}), 0),
    "id_very_long": (json.dumps({"x" * 100_000: task(train=[]), "ok": task()}), 0),
    "id_empty": (json.dumps({"": task()}), 0),
    "all_tasks_bad_forged": (json.dumps({"a\nerror: forged": task(train=None)}), 2),
    "duplicate_ids": ('{"a": ' + json.dumps(task()) + ', "a": ' + json.dumps(task()) + ', "b": '
                      + json.dumps(task()) + "}", 0),
    "many_bad_tasks": (json.dumps({f"t{k}": task(train=None) for k in range(50)} | {"ok": task()}), 0),
    "extra_keys": (json.dumps({"a": task(name="x", extra=[1, 2])}), 0),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_hostile_tasks_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = FILES[name]
    path = tmp_path / "tasks.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    code, out, err = run_in_process(ad.main, ["--data", str(path), "--stats"], capsys)
    assert_clean(code, out, err, expected)
    if name == "duplicate_ids":
        assert "1 duplicate task id" in err
    if name.startswith("grid_") and name.endswith(("e30", "e64", "digits")):
        assert "found None" not in err and ("00000" in err or "digit" in err or "551616" in err), err
    if name.startswith("id_train"):
        assert "tasks: 2" in out or "tasks: 1 " in out


@pytest.mark.parametrize("name", ["grid_null", "grid_2e64", "id_newline_forges_error", "duplicate_ids",
                                  "train_null", "id_train"])
def test_hostile_tasks_file_under_strict(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(FILES[name][0])
    code, out, err = run_in_process(ad.main, ["--data", str(path), "--stats", "--strict"], capsys)
    assert_clean(code, out, err, 0 if name == "id_train" else 2)


def _symlink(target: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        link = tmp / "tasks.json"
        link.symlink_to(target)
        return link
    return make


def _named(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_text(json.dumps(task(train=None)))
        return path
    return make


def _folder(files: dict[str, Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = tmp / "tasks"
        folder.mkdir()
        for name, value in files.items():
            if value is None:
                (folder / name).mkdir()
            else:
                (folder / name).write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        return folder
    return make


def _fifo(tmp: Path) -> Path:
    path = tmp / "tasks.json"
    os.mkfifo(path)
    return path


def _loop(tmp: Path) -> Path:
    (tmp / "a.json").symlink_to(tmp / "b.json")
    (tmp / "b.json").symlink_to(tmp / "a.json")
    return tmp / "a.json"


# name -> (make the --data path in tmp, expected exit code)
PATHS: dict[str, tuple[Callable[[Path], Path], int]] = {
    "symlink_dev_zero": (_symlink("/dev/zero"), 2),
    "symlink_dev_null": (_symlink("/dev/null"), 2),
    "symlink_dev_urandom": (_symlink("/dev/urandom"), 2),
    "symlink_to_folder": (_symlink("/proc/self"), 2),
    "dangling_symlink": (_symlink("/nonexistent/x.json"), 2),
    "symlink_loop": (_loop, 2),
    "fifo": (_fifo, 2),
    "missing": (lambda tmp: tmp / "nothing.json", 2),
    "name_with_newline": (_named("bad\nerror: forged.json"), 2),
    "name_with_escape": (_named("\x1b[2Jx.json"), 2),
    "name_with_cr": (_named("x\r.json"), 2),
    "folder_empty": (_folder({}), 2),
    "folder_only_bad": (_folder({"a.json": task(train=None), "b.json": b"\x00\x01"}), 2),
    "folder_forged_names": (_folder({"x\nerror: forged.json": task(train=None), "\x1b[2J.json": b"{",
                                     "ok.json": task()}), 0),
    "folder_subfolder_named_json": (_folder({"a.json": None, "ok.json": task()}), 0),
    "folder_kaggle_files": (_folder({"x_challenges.json": {"a": task()}, "x_solutions.json": {"a": [[[7]]]}}), 2),
    "folder_tasks_file": (_folder({"all.json": {"a": task(), "b": task()}}), 0),
    "folder_duplicates_across_files": (_folder({"a.json": task(), "more.json": {"a": task(), "c": task()}}), 0),
    "folder_gzip_file": (_folder({"a.json": gzip.compress(b"{}"), "ok.json": task()}), 0),
    "folder_symlink_dev_zero": (lambda tmp: (_folder({"ok.json": task()})(tmp) / "z.json").symlink_to("/dev/zero")
                                or tmp / "tasks", 0),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_hostile_path(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = PATHS[name]
    path = make(tmp_path)
    code, out, err = run_in_process(ad.main, ["--data", str(path), "--stats"], capsys)
    assert_clean(code, out, err, expected)
    if name == "folder_kaggle_files":
        assert "got null" not in err and "Kaggle" in err
    if name == "folder_duplicates_across_files":
        assert "appear in more than one file" in err


def kaggle(tmp: Path, solutions: Any, raw: bool = False) -> Path:
    challenges = tmp / "x_challenges.json"
    challenges.write_text(json.dumps({"a": task(test=[{"input": [[7]]}]), "b": task(test=[{"input": [[7]]}])}))
    (tmp / "x_solutions.json").write_bytes(solutions if raw else json.dumps(solutions).encode())
    return challenges


SOLUTIONS: dict[str, tuple[Any, int, str]] = {  # solutions content, exit code, what stderr must say
    "complete": ({"a": [[[7]]], "b": [[[7]]]}, 0, ""),
    "missing_id": ({"a": [[[7]]]}, 0, "1 tasks have no solutions"),
    "extra_id": ({"a": [[[7]]], "b": [[[7]]], "zzz": [[[1]]]}, 0, "1 solutions are for task ids not in"),
    "null_value": ({"a": None, "b": [[[7]]]}, 0, "1 solutions are null"),
    "wrong_count": ({"a": [[[7]], [[7]]], "b": [[[7]]]}, 0, "2 solutions for 1 test inputs"),
    "bad_grid": ({"a": [[[70]]], "b": [[[7]]]}, 0, "solution"),
    "not_a_list": ({"a": "x", "b": [[[7]]]}, 0, "solutions for"),
    "a_list": ([1, 2], 2, "expected a JSON object"),
    "null": (None, 2, "expected a JSON object"),
    "duplicate_ids": (b'{"a": [[[7]]], "a": [[[7]]], "b": [[[7]]]}', 0, "1 duplicate task id"),
    "binary": (b"\x89PNG\r\n\x1a\n", 2, "not a JSON text file"),
}


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_hostile_kaggle_solutions(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    solutions, expected, says = SOLUTIONS[name]
    challenges = kaggle(tmp_path, solutions, raw=isinstance(solutions, bytes))
    code, out, err = run_in_process(ad.main, ["--data", str(challenges), "--stats"], capsys)
    assert_clean(code, out, err, expected)
    assert says in err


@pytest.mark.parametrize("solutions", ["folder", "missing", "dev_zero"])
def test_hostile_solutions_path(solutions: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    challenges = kaggle(tmp_path, {"a": [[[7]]], "b": [[[7]]]})
    path = {"folder": str(tmp_path), "missing": str(tmp_path / "none.json"), "dev_zero": "/dev/zero"}[solutions]
    code, out, err = run_in_process(ad.main, ["--data", str(challenges), "--solutions", path, "--stats"], capsys)
    assert_clean(code, out, err, 2)


SHOW_IDS = ["x\nerror: forged", "\x1b[2J", "\u202eabc", "a\rb", "ok"]


@pytest.mark.parametrize("task_id", SHOW_IDS)
def test_show_escapes_ids(task_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({task_id: task(test=[{"input": [[7]]}])}))
    code, out, err = run_in_process(ad.main, ["--data", str(path), "--show", task_id, "--color", "never"], capsys)
    assert_clean(code, out, err, 0)
    assert out.splitlines()[0].endswith("2 train pairs, 1 test pair")


@pytest.mark.parametrize("task_id", SHOW_IDS[:3])
def test_show_unknown_id_is_escaped(task_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    examples = str(Path(__file__).resolve().parents[1] / "data" / "examples" / "tasks.json")
    code, out, err = run_in_process(ad.main, ["--data", examples, "--show", task_id], capsys)
    assert_clean(code, out, err, 2)


def test_file_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ad, "MAX_FILE_BYTES", 100)
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"a": task()}))
    code, out, err = run_in_process(ad.main, ["--data", str(path), "--stats"], capsys)
    assert_clean(code, out, err, 2)


@pytest.mark.parametrize("name", ["binary", "gzip", "utf16_le_bom", "deep_lists", "train_null", "grid_2e64"])
def test_load_tasks_strict_raises_one_line(name: str, tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    content = FILES[name][0]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as raised:
        ad.load_tasks(str(path), strict=True)
    assert "\n" not in str(raised.value) or "\\n" in str(raised.value)
