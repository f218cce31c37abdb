"""The Kaggle submission file: fallbacks, the validator (accepts what the builder writes, rejects malformed
files), atomic writing, and the pass@2 score."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from submission import (FALLBACK_GRID, SubmissionBuilder, SubmissionError, check_submission, check_submission_file,
                        score_submission, submission_problems, write_submission)

EXPECTED = {"a": [[[1, 2], [3, 4]]], "b": [[[5]], [[6, 7]]]}
COUNTS = {"a": 1, "b": 2}


def _built() -> dict:
    builder = SubmissionBuilder(EXPECTED)
    builder.add("a", 0, [np.array([[4, 3], [2, 1]]), np.array([[1]])])
    builder.add("b", 0, [np.array([[9, 9]])])
    return builder.submission()


def test_builder_fills_fallbacks_and_counts_them():
    builder = SubmissionBuilder(EXPECTED)
    assert builder.missing() == 3
    builder.add("a", 0, [])                                   # nothing decoded
    builder.add("b", 0, [np.array([[5]])])                   # one candidate, equal to the input
    builder.add("b", 1, [np.array([[1, 1]])])                # one candidate
    content = builder.submission()
    assert content["a"] == [{"attempt_1": [[1, 2], [3, 4]], "attempt_2": FALLBACK_GRID}]
    assert content["b"][0] == {"attempt_1": [[5]], "attempt_2": FALLBACK_GRID}
    assert content["b"][1] == {"attempt_1": [[1, 1]], "attempt_2": [[6, 7]]}
    assert (builder.no_candidate, builder.one_candidate, builder.missing()) == (1, 2, 0)
    assert all(isinstance(c, int) for e in content["b"] for row in e["attempt_1"] for c in row)


def test_validator_accepts_what_the_builder_writes(tmp_path):
    content = _built()
    assert submission_problems(content, COUNTS) == []
    path = tmp_path / "sub" / "submission.json"
    write_submission(path, content, COUNTS)
    assert json.loads(path.read_text()) == content
    assert [p.name for p in path.parent.iterdir()] == ["submission.json"]   # no temporary left behind
    challenges = tmp_path / "c_challenges.json"
    challenges.write_text(json.dumps({t: {"train": [], "test": [{"input": g} for g in inputs]}
                                      for t, inputs in EXPECTED.items()}))
    assert check_submission_file(path, challenges) == COUNTS
    assert check_submission_file(path) == COUNTS


def _broken(change):
    content = copy.deepcopy(_built())
    change(content)
    return content


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("b"), "missing"),
    (lambda c: c.update(z=[{"attempt_1": [[0]], "attempt_2": [[0]]}]), "not in the challenges"),
    (lambda c: c["b"].pop(), "2 test inputs"),
    (lambda c: c["a"].append(c["a"][0]), "2 entries for 1"),
    (lambda c: c["a"][0].pop("attempt_2"), "exactly attempt_1, attempt_2"),
    (lambda c: c["a"][0].update(attempt_3=[[1]]), "attempt_3"),
    (lambda c: c["a"][0].update(attempt_1=[[1, 2], [3]]), "row 1 has 1 cells"),
    (lambda c: c["a"][0].update(attempt_1=[[1.0]]), "not an integer"),
    (lambda c: c["a"][0].update(attempt_1=[["1"]]), "not an integer"),
    (lambda c: c["a"][0].update(attempt_1=[[True]]), "not an integer"),
    (lambda c: c["a"][0].update(attempt_1=[[10]]), "not an integer 0-9"),
    (lambda c: c["a"][0].update(attempt_1=[[-1]]), "not an integer 0-9"),
    (lambda c: c["a"][0].update(attempt_1=[[0] * 31] * 31), "31 rows"),
    (lambda c: c["a"][0].update(attempt_1=[[0] * 31]), "31 columns"),
    (lambda c: c["a"][0].update(attempt_1=[]), "non-empty list of rows"),
    (lambda c: c["a"][0].update(attempt_1=[[]]), "row 0 is not a non-empty list"),
    (lambda c: c["a"][0].update(attempt_1=[1, 2]), "row 0 is not"),
    (lambda c: c.update(a={"attempt_1": [[1]], "attempt_2": [[1]]}), "expected a non-empty list"),
    (lambda c: c["a"].__setitem__(0, [[1]]), "expected an object"),
])
def test_validator_rejects_malformed_submissions(change, words):
    problems = submission_problems(_broken(change), COUNTS)
    assert problems and any(words in p for p in problems), problems
    with pytest.raises(SubmissionError):
        check_submission(_broken(change), COUNTS)


def test_validator_rejects_a_list_and_a_file_that_is_not_json(tmp_path):
    assert submission_problems([1, 2]) and submission_problems({"a": []})
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        check_submission_file(bad)


def test_writer_refuses_an_invalid_submission_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "submission.json"
    write_submission(path, _built(), COUNTS)
    before = path.read_text()
    with pytest.raises(SubmissionError, match="not written"):
        write_submission(path, _broken(lambda c: c.pop("a")), COUNTS)
    assert path.read_text() == before


def test_score_counts_test_outputs_either_attempt_and_solved_tasks():
    content = _built()   # a: attempt_1 [[4,3],[2,1]]; b/0: [[9,9]] then [[5]] (fallback: the input); b/1 fallback
    solutions = {"a": [[[1]]], "b": [[[5]], [[1, 1]]]}
    result = score_submission(content, solutions)
    assert result.per_task == {"a": 1.0, "b": 0.5}
    assert (result.correct_outputs, result.total_outputs, result.solved_tasks) == (2, 3, 1)
    assert result.score == pytest.approx(2 / 3) and result.to_json()["tasks"] == 2
    assert score_submission({}, solutions).score == 0.0
