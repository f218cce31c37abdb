"""run_costs.py: fixed-length decoding really writes the requested tokens, the evaluation pass is the one
evaluation.evaluate decodes, the cost fit recovers known coefficients, the sampling keeps to its time limit,
the save timing writes real files and removes them, and the start-up clock."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

import evaluation
import model as M
import run_costs
from arc_dataset import Task
from training import FP32


def _task(task_id: str, side: int, tests: int = 1, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    grid = lambda: rng.integers(0, 10, (side, side + 1)).astype(np.uint8)  # noqa: E731
    return Task(task_id, [(grid(), grid()) for _ in range(2)], [(grid(), grid()) for _ in range(tests)])


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return M.load_model(M.ModelSettings("tiny")).eval()


def test_fixed_length_decoding_writes_exactly_the_requested_tokens(tiny):
    prompts = [evaluation.prompt(s, 4096) for s in
               evaluation.evaluation_samples([_task("a", 2), _task("b", 4, seed=1), _task("c", 3, seed=2)])]
    wanted = [5, 0, 41]
    out = M.generate_token_batch(tiny, prompts, 931, FP32, exact_new_tokens=wanted)
    assert [len(t) for t in out] == wanted
    assert all(0 <= token < 16 for row in out for token in row)
    # capped like any decode, and the default (stop at EOS or when it cannot be a grid) is unchanged
    assert [len(t) for t in M.generate_token_batch(tiny, prompts[:1], 7, FP32, exact_new_tokens=[20])] == [7]
    assert M.generate_token_batch(tiny, prompts, 50, FP32) == M.generate_token_batch(tiny, prompts, 50, FP32, None)
    # an untrained model stops at the wrong place: it is what the known lengths replace
    free = M.generate_token_batch(tiny, prompts, 931, FP32)
    answers = [run_costs.answer_tokens(s.target) for s in
               evaluation.evaluation_samples([_task("a", 2), _task("b", 4, seed=1), _task("c", 3, seed=2)])]
    assert [len(t) for t in free] != answers
    assert answers == [2 * 4 + 1, 4 * 6 + 1, 3 * 5 + 1]


def test_evaluation_pass_is_the_batches_evaluate_decodes(tiny, monkeypatch):
    tasks = [_task(f"t{i}", 1 + i % 5, tests=1 + i % 2, seed=i) for i in range(9)]
    for attempts in (1, 2):
        seen = []

        def record(model, prompts, max_new_tokens, precision):
            seen.append([p.clone() for p in prompts])
            return [None] * len(prompts)   # every attempt wrong: the second attempt runs for every input

        monkeypatch.setattr(evaluation, "generate_grids", record)
        evaluation.evaluate(tiny, tasks, max_length=4096, precision=FP32, device=torch.device("cpu"),
                            attempts=attempts, batch_size=4)
        planned = run_costs.evaluation_pass(tasks, 4096, 4, attempts)
        assert len(planned) == len(seen) == (4 if attempts == 1 else 8)
        for batch, prompts in zip(planned, seen):
            assert len(batch.prompts) == len(prompts)
            assert all(torch.equal(a, b) for a, b in zip(batch.prompts, prompts))
        assert [b.attempt for b in planned] == ([1] * 4 if attempts == 1 else [1, 2] * 4)


def test_views_are_planned_with_their_real_prompts_and_prediction_per_task(tiny, monkeypatch):
    """--eval-views K: each call holds batch_size // K inputs with all K views (the real, augmented prompts evaluate
    decodes); prediction (evaluation.py --submission) is one call per task, all its inputs' views together."""
    tasks = [_task(f"t{i}", 1 + i % 4, tests=1 + i % 2, seed=i) for i in range(6)]
    seen = []

    def record(model, prompts, max_new_tokens, precision, should_stop=None):
        seen.append([p.clone() for p in prompts])
        return [None] * len(prompts)

    monkeypatch.setattr(evaluation, "generate_grids", record)
    evaluation.evaluate(tiny, tasks, max_length=4096, precision=FP32, device=torch.device("cpu"), batch_size=8,
                        views=4)
    planned = run_costs.evaluation_pass(tasks, 4096, 8, views=4)
    assert len(planned) == len(seen) == 5 and [b.inputs for b in planned] == [2, 2, 2, 2, 1]
    for batch, prompts in zip(planned, seen):
        assert len(batch.prompts) == len(prompts) == 4 * batch.inputs
        assert all(torch.equal(a, b) for a, b in zip(batch.prompts, prompts))
    square = [_task("sq", 3, seed=1)]                          # a 3x4 answer: rotated views write 4 rows of 3
    answers = run_costs.evaluation_pass(square, 4096, 8, views=8)[0].answers
    assert set(answers) == {3 * 5 + 1, 4 * 4 + 1}
    prediction = run_costs.prediction_pass(tasks, 4096, views=2)
    assert [b.rows for b in prediction] == [2 * len(t.test) for t in tasks]
    model = run_costs.EvalCostModel(0.01, 1e-5, 1e-3, 0.0)
    assert run_costs.scoring_seconds(prediction, model) == pytest.approx(
        sum(0.01 + 1e-5 * (b.prompt_tokens + b.generated_tokens) for b in prediction))
    assert run_costs.scoring_seconds(run_costs.evaluation_pass(tasks, 4096, 8), model) == 0.0   # one view: none


def _fake_batch(rows: int, prompt: int, answer: int) -> run_costs.EvalBatch:
    return run_costs.EvalBatch(1, tuple(torch.zeros(prompt, dtype=torch.long) for _ in range(rows)),
                               tuple([answer] * rows))


def test_the_cost_fit_recovers_known_coefficients():
    truth = run_costs.EvalCostModel(per_batch=0.02, per_prompt_token=3e-6, per_generated_token=4e-4,
                                    per_attended_position=5e-8)
    rng = np.random.default_rng(0)
    batches = [_fake_batch(int(rng.integers(1, 9)), int(rng.integers(50, 6000)), int(rng.integers(5, 900)))
               for _ in range(40)]
    seconds = [truth.predict(b) * (1 + rng.normal(0, 0.002)) for b in batches]
    fitted = run_costs.EvalCostModel.fit(batches, seconds)
    for got, want in zip(fitted.coefficients, truth.coefficients):
        assert got == pytest.approx(want, rel=0.05)
    # exact data: exact coefficients; a term the data do not need stays at zero rather than going negative
    no_prompt = run_costs.EvalCostModel(0.01, 0.0, 2e-4, 1e-8)
    fitted = run_costs.EvalCostModel.fit(batches, [no_prompt.predict(b) for b in batches])
    assert fitted.per_prompt_token == pytest.approx(0.0, abs=1e-12)
    assert fitted.per_batch == pytest.approx(0.01) and fitted.per_generated_token == pytest.approx(2e-4)
    assert all(c >= 0 for c in run_costs.EvalCostModel.fit(batches, list(rng.uniform(0, 1, 40))).coefficients)
    # one timed batch: seconds per generated token
    one = run_costs.EvalCostModel.fit(batches[:1], [2.0])
    assert one.predict(batches[0]) == pytest.approx(2.0) and one.per_generated_token > 0


def test_nonnegative_least_squares_matches_a_brute_force_search():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (30, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 0.01, 30)
    c = run_costs.nonnegative_least_squares(x, y)
    assert np.all(c >= 0) and c[1] == 0
    best = min((np.sum((x @ np.array(g) - y) ** 2), g) for g in
               ((a, 0.0, b) for a in np.linspace(0, 2, 81) for b in np.linspace(0, 2, 81)))
    assert np.sum((x @ c - y) ** 2) <= best[0] + 1e-9


def test_measurement_keeps_to_its_limit_and_projects_timed_plus_predicted():
    batches = [_fake_batch(8, 100 * (k + 1), 10 * (k + 1)) for k in range(20)]
    truth = run_costs.EvalCostModel(0.01, 1e-5, 1e-3, 1e-7)
    clock_calls = []

    def clock(batch):
        clock_calls.append(batch)
        return truth.predict(batch)

    full = run_costs.measure_evaluation(None, batches, clock=clock, progress=False)
    assert len(full.timed) == 20 and full.pass_seconds == pytest.approx(sum(truth.predict(b) for b in batches))
    # a limit of ~2 s of (fake) decoding: the cheapest is timed, then only batches predicted to fit
    clock_calls.clear()
    started = time.perf_counter()
    fake_now = [0.0]

    def slow_clock(batch):
        seconds = truth.predict(batch)
        fake_now[0] += seconds
        return seconds

    real_counter = time.perf_counter
    try:
        time.perf_counter = lambda: started + fake_now[0]  # the measurement's clock sees the fake decode time
        part = run_costs.measure_evaluation(None, batches, clock=slow_clock, progress=False, time_limit=2.0)
    finally:
        time.perf_counter = real_counter
    assert 1 <= len(part.timed) < 20
    assert min(part.timed) == 0                                 # the cheapest batch
    assert math.fsum(part.timed.values()) <= 2.0 + truth.predict(batches[0]) + 0.1
    assert part.pass_seconds == pytest.approx(full.pass_seconds, rel=0.05)
    assert part.as_json()["timed_batches"] == len(part.timed)
    assert full.expected_error == 0.0                           # every batch timed
    predicted_share = 1 - math.fsum(part.timed.values()) / part.pass_seconds
    assert 0 < part.expected_error <= predicted_share + 1e-12


def test_a_lone_timed_batch_is_a_full_one_and_the_warm_up_has_its_shape():
    """The tiny CPU model's held-out pass (12 batches of 8 rows, a last one of 4): decoding is mostly per step
    (4 rows 7.7 ms, 8 rows 9.0 ms). Scaling the short last batch per generated token planned the pass ~1.7x
    too long; the lone timed batch must be a full one."""
    batches = [_fake_batch(8, 41, 13) for _ in range(12)] + [_fake_batch(4, 41, 13)]
    step_bound = lambda b: b.decode_steps * 6.4e-4 + b.generated_tokens * 2.5e-5  # noqa: E731
    calls = []

    def clock(batch):
        calls.append(batch)
        return step_bound(batch)

    lone = run_costs.measure_evaluation(None, batches, clock=clock, progress=False, max_batches=1)
    assert [batches[i].rows for i in lone.timed] == [8]
    truth = sum(step_bound(b) for b in batches)
    assert lone.pass_seconds == pytest.approx(truth, rel=0.05)
    warm_up = calls[0]
    assert warm_up.rows == 8 and set(warm_up.answers) == {2}  # every row of the first batch, two tokens
    assert run_costs.sampling_order([3.0, 1.0, 2.0, 0.5], rows=[8, 8, 8, 4])[:3] == [1, 0, 3]


def test_real_decoding_is_measured_and_projected(tiny):
    tasks = [_task(f"r{i}", 2 + i % 3, seed=i) for i in range(6)]
    batches = run_costs.evaluation_pass(tasks, 4096, 2, 1)
    measured = run_costs.measure_evaluation(tiny, batches, precision=FP32, progress=False)
    assert len(measured.timed) == len(batches) == 3 and measured.inputs == 6
    assert measured.pass_seconds == pytest.approx(math.fsum(measured.timed.values()))
    assert measured.pass_seconds > 0


def test_save_timing_writes_a_real_checkpoint_and_model_and_cleans_up(tiny, tmp_path):
    model = M.load_model(M.ModelSettings("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="no state yet"):
        run_costs.measure_saves(tmp_path / "runs" / "new", model, optimizer)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    output = tmp_path / "runs" / "20260101-000000"        # does not exist yet: its nearest parent is used
    times = run_costs.measure_saves(output, model, optimizer)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert times.checkpoint_bytes > 2.5 * weights           # weights and AdamW's two moments
    assert times.final_save_bytes > 0.9 * weights
    assert times.checkpoint_seconds > 0 and times.final_save_seconds > 0
    assert os.path.dirname(times.folder) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []                   # removed, nothing left beside the run folder


def test_startup_clock_and_measurement_allowance():
    started = run_costs.process_start_time()
    now = time.monotonic()
    assert started <= now
    assert now - started < 3600                             # this test process started recently
    assert run_costs.startup_seconds(now, started) == pytest.approx(now - started)
    assert run_costs.startup_seconds(10.0, 4.0, first_steps_seconds=3.0, first_steps_steady_seconds=1.0) == 8.0
    assert run_costs.startup_seconds(10.0, 4.0, first_steps_seconds=1.0, first_steps_steady_seconds=3.0) == 6.0
    # added <= 9% of (benchmark + added): 100 s of benchmark allows 9.9 s, less what the saves took
    assert run_costs.measurement_allowance(100.0) == pytest.approx(900 / 91)
    assert run_costs.measurement_allowance(100.0, spent_seconds=4.0) == pytest.approx(900 / 91 - 4)
    assert run_costs.measurement_allowance(100.0, share=0.10) == pytest.approx(100 / 9)
    assert run_costs.measurement_allowance(10.0, spent_seconds=5.0) == 0.0
