"""Exact-match evaluation: counting per test input and per task, pass@2 through an augmented view mapped
back, decoding in batches, stopping part-way, and the model's mode. Generation is replaced by small fakes so
each case is exact and instant; the learning test in test_trainloop.py runs the real greedy decoding end to
end, and test_model.py checks batched decoding against one prompt at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluation
from arc_dataset import INPUT, OUTPUT, ROW_END, Task, evaluation_samples
from evaluation import EvalResult, evaluate, second_attempt_view, tasks_with_answers
from training import FP32


def _grid(rows):
    return np.array(rows, dtype=np.uint8)


def _copy_task(task_id: str, tests: int = 1, seed: int = 0) -> Task:
    """A task whose output is its input (so a model that copies the query is right in any view)."""
    rng = np.random.default_rng(seed)
    pairs = [(g, g.copy()) for g in (rng.integers(0, 10, (2, 3)).astype(np.uint8) for _ in range(2 + tests))]
    return Task(task_id, pairs[:2], pairs[2:])


def _query_of(prompt: torch.Tensor) -> np.ndarray:
    """The query grid inside a prompt (after its last INPUT marker, before the final OUTPUT)."""
    tokens = prompt.tolist()
    start = len(tokens) - 1 - tokens[::-1].index(INPUT)
    body = tokens[start + 1:-1]
    assert tokens[-1] == OUTPUT
    rows, row = [], []
    for t in body:
        if t == ROW_END:
            rows.append(row)
            row = []
        else:
            row.append(t)
    return _grid(rows)


class FakeGenerator:
    """Stands in for model.generate_grid: answers by copying the query, or fails on chosen calls."""

    def __init__(self, fail_calls=(), wrong_calls=()):
        self.calls = 0
        self.fail_calls, self.wrong_calls = set(fail_calls), set(wrong_calls)

    def __call__(self, model, prompt, max_new_tokens, precision):
        self.calls += 1
        if self.calls in self.fail_calls:
            return None
        query = _query_of(prompt)
        return (query + 1) % 10 if self.calls in self.wrong_calls else query


def _batched(generator, batches=None):
    """model.generate_grids from a one-prompt fake; `batches` collects how many prompts each call had."""
    def generate_grids(model, prompts, max_new_tokens, precision):
        if batches is not None:
            batches.append(len(prompts))
        return [generator(model, prompt, max_new_tokens, precision) for prompt in prompts]
    return generate_grids


def _run(monkeypatch, tasks, generator, batches=None, **kwargs):
    monkeypatch.setattr(evaluation, "generate_grids", _batched(generator, batches))
    model = torch.nn.Linear(1, 1)
    return evaluate(model, tasks, max_length=512, precision=FP32, device=torch.device("cpu"), **kwargs)


def test_counts_per_input_and_per_task(monkeypatch):
    tasks = [_copy_task("a", tests=2, seed=1), _copy_task("b", tests=1, seed=2), _copy_task("c", tests=1, seed=3)]
    # calls: a/0 right, a/1 wrong, b/0 malformed, c/0 right
    result = _run(monkeypatch, tasks, FakeGenerator(fail_calls={3}, wrong_calls={2}))
    assert (result.num_inputs, result.correct_inputs, result.num_tasks, result.solved_tasks) == (4, 2, 3, 1)
    assert result.solved == {"a": False, "b": False, "c": True}
    assert result.malformed == 1
    assert result.accuracy == 0.5 and result.task_accuracy == pytest.approx(1 / 3)
    metrics = result.metrics()
    assert metrics["eval_accuracy"] == 0.5 and metrics["eval_inputs"] == 4 and "eval_pass1_accuracy" not in metrics


def test_second_attempt_is_an_augmented_view_mapped_back(monkeypatch):
    tasks = [_copy_task(f"t{k}", seed=k) for k in range(4)]
    # Every first attempt fails (the batch's four first attempts come first); the second sees a rotated,
    # recoloured task, copies its query, and that prediction is right only if evaluation maps it back to
    # the original orientation and colours.
    generator, batches = FakeGenerator(fail_calls={1, 2, 3, 4}), []
    result = _run(monkeypatch, tasks, generator, batches, attempts=2)
    assert generator.calls == 8 and batches == [4, 4]
    assert result.correct_inputs == 4 and result.correct_first == 0 and result.solved_tasks == 4
    assert result.metrics()["eval_pass1_accuracy"] == 0.0
    assert "first attempt 0.0%" in result.describe()


def test_second_attempt_skipped_when_first_is_right(monkeypatch):
    generator = FakeGenerator()
    result = _run(monkeypatch, [_copy_task("a"), _copy_task("b", seed=5)], generator, attempts=2)
    assert generator.calls == 2 and result.correct_first == 2 and result.accuracy == 1.0


def test_wrong_shape_is_wrong(monkeypatch):
    def transposed(model, prompt, max_new_tokens, precision):
        return _query_of(prompt).T.copy()
    result = _run(monkeypatch, [_copy_task("a")], transposed)
    assert result.correct_inputs == 0 and result.malformed == 0


def test_stop_request_abandons_the_evaluation(monkeypatch):
    calls = []
    result = _run(monkeypatch, [_copy_task("a"), _copy_task("b")], FakeGenerator(), batch_size=1,
                  should_stop=lambda: len(calls) >= 1, progress=lambda done, total: calls.append(done))
    assert result is None and calls == [1]


def test_inputs_decode_in_batches_shortest_prompts_first(monkeypatch):
    rng = np.random.default_rng(0)
    sizes = [5, 2, 4, 3, 6]   # query (and demo) sides: prompt lengths grow with them
    tasks = [Task(f"s{n}", [(g, g.copy()) for g in [rng.integers(0, 10, (n, n)).astype(np.uint8)] * 2],
                  [(rng.integers(0, 10, (n, n)).astype(np.uint8),) * 2]) for n in sizes]
    seen, batches, progress = [], [], []

    def generator(model, prompt, max_new_tokens, precision):
        seen.append(len(prompt))
        return _query_of(prompt)

    result = _run(monkeypatch, tasks, generator, batches, batch_size=2,
                  progress=lambda done, total: progress.append((done, total)))
    assert batches == [2, 2, 1] and seen == sorted(seen)
    assert progress == [(k, 5) for k in range(1, 6)]
    assert result.correct_inputs == 5 and result.solved_tasks == 5


def test_model_mode_is_restored(monkeypatch):
    seen = []

    def generator(model, prompt, max_new_tokens, precision):
        seen.append(model.training)
        return _query_of(prompt)

    monkeypatch.setattr(evaluation, "generate_grids", _batched(generator))
    model = torch.nn.Linear(1, 1)
    model.train()
    evaluate(model, [_copy_task("a")], max_length=512, precision=FP32, device=torch.device("cpu"))
    assert seen == [False] and model.training


def test_tasks_with_answers_filters_and_limits():
    known = [_copy_task(f"k{i}", seed=i) for i in range(3)]
    unknown = Task("u", known[0].train, [(known[0].test[0][0], None)])
    assert [t.task_id for t in tasks_with_answers([unknown, *known])] == ["k0", "k1", "k2"]
    assert [t.task_id for t in tasks_with_answers([unknown, *known], limit=2)] == ["k0", "k1"]


def test_second_attempt_view_is_fixed_and_not_the_identity():
    samples = evaluation_samples([_copy_task(f"t{k}", seed=k) for k in range(20)])
    views = [second_attempt_view(s, seed=0) for s in samples]
    assert views == [second_attempt_view(s, seed=0) for s in samples]
    assert all(v.transform != 0 and v.colours[0] == 0 for v in views)
    grid = samples[0].query
    assert np.array_equal(views[0].invert(views[0].apply(grid)), grid)


def test_empty_result_has_zero_accuracy():
    assert EvalResult(attempts=1).accuracy == 0.0 and EvalResult(attempts=1).task_accuracy == 0.0


def test_results_of_task_shares_merge_into_the_whole():
    from evaluation import merge_results
    first = EvalResult(attempts=2, num_inputs=3, correct_inputs=2, correct_first=1, num_tasks=2, solved_tasks=1,
                       malformed=1, seconds=4.0, solved={"a": True, "c": False})
    second = EvalResult(attempts=2, num_inputs=1, correct_inputs=1, correct_first=1, num_tasks=1, solved_tasks=1,
                        seconds=6.0, solved={"b": True})
    merged = merge_results([first, second])
    assert (merged.num_inputs, merged.correct_inputs, merged.correct_first) == (4, 3, 2)
    assert (merged.num_tasks, merged.solved_tasks, merged.malformed) == (3, 2, 1)
    assert merged.solved == {"a": True, "b": True, "c": False}
    assert merged.seconds == 6.0 and merged.accuracy == 0.75   # the slowest share's time; counts add up
