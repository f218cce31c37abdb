"""Augmented inference on a real (tiny, briefly trained) model and the submission command end to end:
one view is today's greedy decoding token for token, candidate scoring equals a direct computation,
voting beats a wrong greedy answer, and `python evaluation.py` writes a valid Kaggle file from a saved model
or a checkpoint, with and without solutions, within a time budget, and fails in one line on bad input."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

import evaluation
import model as model_module
from arc_dataset import (SYMBOLS, DataSettings, Task, TrainingData, encode_prompt, evaluation_samples,
                         training_samples)
from checkpointing import capture_rng_state, save_checkpoint
from errors import UserError, run_cli
from evaluation import evaluate, predict_samples, rerank
from model import ModelSettings, load_model, save_model, sequence_log_probs
from submission import check_submission_file
from training import FP32, TrainStep, build_optimizer, build_scheduler

MAPPING = np.array([0, 2, 3, 4, 5, 6, 7, 8, 9, 1], dtype=np.uint8)   # the tasks' fixed recolouring
MAX_LENGTH = 2048
CPU = torch.device("cpu")


def _tasks(n: int, train_pairs: int, seed: int, tests: int = 1) -> list[Task]:
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n):
        grids = rng.integers(0, 10, size=(train_pairs + tests, 3, 3)).astype(np.uint8)
        pairs = [(g, MAPPING[g]) for g in grids]
        tasks.append(Task(f"s{seed}t{t:04d}", pairs[:train_pairs], pairs[train_pairs:]))
    return tasks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model after 250 steps on one-demonstration samples (~4 s): it writes well-formed 3x3 grids,
    not yet the right ones, so decodes differ between views and candidates compete."""
    torch.manual_seed(0)
    model = load_model(ModelSettings("tiny"))
    data = TrainingData(training_samples(_tasks(300, 2, seed=1)),
                        DataSettings(max_length=256, batch_size=8, augment=True, seed=0))
    optimizer = build_optimizer(model, 3e-3)
    step = TrainStep(model, optimizer, build_scheduler(optimizer, 250, 20, min_lr_ratio=1.0), FP32, CPU)
    batches = itertools.chain.from_iterable(data.batches(epoch) for epoch in itertools.count())
    for _, batch in zip(range(250), batches):
        step(batch)
    model.eval()
    folder = save_model(model, tmp_path_factory.mktemp("run") / "model", {"test": "test_predict"})
    # Every field the trainer's checkpoint has (checkpointing validates them on load).
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": step.scheduler.state_dict(),
             "train_step": step.state_dict(), "rng": capture_rng_state(),
             "loop": {"epoch": 0, "batch": 250, "step": 250}, "grads": None}
    meta = {"step": 250, "epoch": 0, "batch": 250, "args": {"model_name": "tiny"},
            "model_config": model.config.to_dict(), "vocabulary": list(SYMBOLS)}
    return model, folder, (state, meta)


def _checkpoint(directory, trained, state_changes=None, meta_changes=None):
    state, meta = trained[2]
    return save_checkpoint(directory, 250, {**state, **(state_changes or {})}, {**meta, **(meta_changes or {})},
                           keep=1)


def test_one_view_is_todays_greedy_decoding_token_for_token(trained, monkeypatch):
    model, _, _ = trained
    tasks = _tasks(6, 1, seed=7)
    real, seen = model_module.generate_token_batch, []

    def spy(model, prompts, max_new_tokens, precision=None, **kwargs):
        tokens = real(model, prompts, max_new_tokens, precision, **kwargs)
        seen.append(([p.tolist() for p in prompts], tokens))
        return tokens

    monkeypatch.setattr(model_module, "generate_token_batch", spy)
    result = evaluate(model, tasks, max_length=MAX_LENGTH, precision=FP32, device=CPU, batch_size=4, views=1)
    samples = evaluation_samples(tasks)
    plain = sorted((encode_prompt(s, MAX_LENGTH).tolist() for s in samples), key=len)
    assert [len(p) for p, _ in seen] == [4, 2] and sum((p for p, _ in seen), []) == plain
    ended = 0
    for prompts, tokens in seen:
        for prompt, row in zip(prompts, tokens):
            assert row == real(model, [torch.tensor(prompt)], evaluation.MAX_TARGET_TOKENS)[0]
            ended += row[-1] == model_module.data.EOS
    assert ended >= 4   # well-formed outputs, so the comparison covers whole grids
    assert result.correct_voted == result.correct_first and result.views == 1


def test_sequence_log_probs_batched_equals_each_alone(trained):
    model, _, _ = trained
    samples = evaluation_samples(_tasks(3, 1, seed=3))
    prompts = [torch.from_numpy(encode_prompt(s, MAX_LENGTH)) for s in samples]
    targets = [torch.tensor([1, 2, 3, 10, 14]), torch.tensor([5, 10, 14]), torch.tensor([0, 0, 10, 0, 0, 10, 14])]
    batched = sequence_log_probs(model, prompts, targets, FP32, max_tokens=120)   # forces several chunks
    alone = [sequence_log_probs(model, [p], [t], FP32)[0] for p, t in zip(prompts, targets)]
    assert batched == pytest.approx(alone, abs=1e-4) and all(v < 0 for v in batched)


def _direct_log_prob(model, prompt: torch.Tensor, target: torch.Tensor) -> float:
    ids = torch.cat([prompt, target])[None]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    start = len(prompt)
    return float(sum(log_probs[start - 1 + k, int(t)] for k, t in enumerate(target)))


def test_product_scoring_ranks_by_log_probs_summed_over_the_views(trained):
    model, _, _ = trained
    sample = evaluation_samples(_tasks(1, 1, seed=11))[0]
    prediction = predict_samples(model, [sample], views=4, max_length=MAX_LENGTH, precision=FP32)[0]
    right, query = sample.target, sample.query
    other = right.copy()
    other[0, 0] = (other[0, 0] + 1) % 10
    prediction.grids = [query, right, other, right]          # three candidates: scoring decides the attempts
    rerank(model, [prediction], FP32, "product")
    assert prediction.scored and len(prediction.ranked) == 3
    direct = {}
    for candidate in prediction.ranked:
        total = 0.0
        for view, view_prompt in zip(prediction.views, prediction.prompts):
            tokens = np.append(model_module.data.grid_tokens(view.apply(candidate.grid)), model_module.data.EOS)
            total += _direct_log_prob(model, view_prompt, torch.from_numpy(tokens.astype(np.int64)))
        direct[candidate.key()] = total
        assert candidate.log_prob == pytest.approx(total, abs=1e-3)
    assert [c.key() for c in prediction.ranked] == sorted(direct, key=direct.get, reverse=True)
    rerank(model, [prediction], FP32, "votes")                # 2 votes for `right`, then a 1-1 tie: scored
    assert np.array_equal(prediction.attempts[0], right) and prediction.scored


def _query_of(prompt: torch.Tensor) -> np.ndarray:
    tokens = prompt.tolist()
    body = tokens[len(tokens) - tokens[::-1].index(model_module.data.INPUT):-1]
    rows, row = [], []
    for t in body:
        if t == model_module.data.ROW_END:
            rows.append(row)
            row = []
        else:
            row.append(t)
    return np.array(rows, dtype=np.uint8)


def test_voting_over_views_outvotes_a_wrong_greedy_answer(monkeypatch):
    """A fake decoder that copies the query (right for copy tasks in every view, once mapped back) except
    in view 0, the greedy answer, which it gets wrong."""
    batches = []

    def fake(model, prompts, max_new_tokens, precision, **kwargs):
        batches.append(len(prompts))
        return [(_query_of(p) + (k % 8 == 0)) % 10 for k, p in enumerate(prompts)]

    monkeypatch.setattr(evaluation, "generate_grids", fake)
    rng = np.random.default_rng(0)
    tasks = [Task(f"c{k}", [(g, g.copy()) for g in rng.integers(0, 10, (3, 2, 3)).astype(np.uint8)],
                  [(g, g.copy()) for g in rng.integers(0, 10, (1, 3, 4)).astype(np.uint8)]) for k in range(3)]
    result = evaluate(torch.nn.Linear(1, 1), tasks, max_length=512, precision=FP32, device=CPU, views=8)
    assert batches == [8, 8, 8]           # the 8 views of one test input decode together
    metrics = result.metrics()
    assert metrics["eval_greedy_accuracy"] == 0.0 and metrics["eval_accuracy"] == 0.0
    assert metrics["eval_pass2_voted"] == 1.0 and metrics["eval_task_pass2_voted"] == 1.0
    assert metrics["eval_views"] == 8 and metrics["eval_scoring"] == "votes"
    merged = evaluation.merge_results([result, result])
    assert merged.correct_voted == 6 and merged.solved_voted_tasks == 6
    # --eval-attempts 2 keeps its meaning: view 1 (decoded anyway) is the second greedy attempt
    again = evaluate(torch.nn.Linear(1, 1), tasks, max_length=512, precision=FP32, device=CPU, views=8, attempts=2)
    assert again.accuracy == 1.0 and again.first_attempt_accuracy == 0.0 and len(batches) == 6


# ---------------------------------------------------------------------------------------------- the CLI

def _kaggle_files(tmp_path, name: str, tasks: list[Task], solutions: bool, bad_task: bool = False):
    challenges = {t.task_id: {"train": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train],
                              "test": [{"input": i.tolist()} for i, _ in t.test]} for t in tasks}
    if bad_task:
        challenges["broken"] = {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}
    path = tmp_path / f"{name}_challenges.json"
    path.write_text(json.dumps(challenges))
    if solutions:
        (tmp_path / f"{name}_solutions.json").write_text(json.dumps(
            {t.task_id: [o.tolist() for _, o in t.test] for t in tasks}))
    return path


def _cli(tmp_path, *argv):
    return evaluation.main(["--device", "cpu", "--max-length", str(MAX_LENGTH), *map(str, argv)])


def test_cli_writes_a_valid_submission_and_scores_it(trained, tmp_path, capsys):
    _, folder, _ = trained
    tasks = _tasks(4, 1, seed=21, tests=2) + _tasks(2, 1, seed=22)
    challenges = _kaggle_files(tmp_path, "eval", tasks, solutions=True, bad_task=True)
    submission, report = tmp_path / "out" / "submission.json", tmp_path / "report.json"
    assert _cli(tmp_path, "--model", folder, "--data", challenges, "--submission", submission, "--views", 3,
                "--json", report) == 0
    counts = check_submission_file(submission, challenges)
    assert counts == {**{t.task_id: len(t.test) for t in tasks}, "broken": 1}
    result = json.loads(report.read_text())
    assert result["views"] == 3 and result["tasks"] == 7 and result["test_inputs"] == 11
    assert result["fallback_inputs"] >= 1 and result["invalid_tasks"] == 1    # the broken task's fallback
    assert result["scores"]["total_outputs"] == 10 and set(result["scores"]["per_task"]) == {t.task_id for t in tasks}
    assert all(v["views"] == 3 for v in result["per_task"].values())
    err = capsys.readouterr()
    assert "score (pass@2" in err.out and "fallback answers" in err.err
    assert _cli(tmp_path, "--check", submission, "--data", challenges) == 0
    assert "valid against" in capsys.readouterr().out


def test_cli_from_a_checkpoint_without_solutions_matches_the_saved_model(trained, tmp_path):
    _, folder, _ = trained
    tasks = _tasks(3, 1, seed=31)
    challenges = _kaggle_files(tmp_path, "test", tasks, solutions=False)
    checkpoint = _checkpoint(tmp_path / "run" / "checkpoints", trained)
    outputs = []
    for source in (folder, checkpoint, tmp_path / "run"):
        submission, report = tmp_path / "s.json", tmp_path / "r.json"
        assert _cli(tmp_path, "--model", source, "--data", challenges, "--submission", submission, "--views", 3,
                    "--score", "product", "--json", report) == 0
        assert "scores" not in json.loads(report.read_text())
        outputs.append(submission.read_text())
    assert outputs[0] == outputs[1] == outputs[2]


def test_time_budget_gives_later_tasks_fewer_views_and_still_writes_every_answer(trained, tmp_path, monkeypatch):
    _, folder, _ = trained
    real = evaluation.predict_samples

    def slow(*args, **kwargs):
        time.sleep(0.5)   # every task costs at least 0.5 s, over its share of a 3 s budget for 6 tasks
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_samples", slow)
    monkeypatch.setattr(evaluation, "SAFETY_SECONDS", 0.0)
    tasks = _tasks(6, 1, seed=41)
    challenges = _kaggle_files(tmp_path, "t", tasks, solutions=False)
    submission, report = tmp_path / "s.json", tmp_path / "r.json"
    assert _cli(tmp_path, "--model", folder, "--data", challenges, "--submission", submission, "--views", 8,
                "--time-budget", "3s", "--json", report) == 0
    result = json.loads(report.read_text())
    used = [result["per_task"][t.task_id]["views"] for t in tasks]
    assert used[0] == 8 and 1 <= used[1] < 8, used
    assert result["tasks_with_fewer_views"] >= 1
    assert result["tasks_skipped_for_time"] == sum(v == 0 for v in used)
    assert check_submission_file(submission, challenges) == {t.task_id: 1 for t in tasks}


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: evaluation.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_the_pacer_shares_the_time_left_and_gives_fewer_views_when_rows_run_slow(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(evaluation.time, "monotonic", lambda: now[0])
    assert evaluation.TaskPacer(8, None, 10).next_task(0, 2) == (8, None)   # no budget: every view, no deadline
    pacer = evaluation.TaskPacer(8, deadline=1100.0, tasks=10)
    assert pacer.next_task(0, 1) == (8, 1030.0)         # 100 s left over 10 tasks: a 10 s share, capped at 3x it
    pacer.record(seconds=8.0, rows=8 * 1)                # 1 s per row (view x test input)
    now[0] = 1010.0
    assert pacer.next_task(1, 2) == (5, 1040.0)           # a 10 s share of 2 inputs at 1 s a row: 5 views
    pacer.record(seconds=30.0, rows=5 * 2)               # 3 s a row: the running mean moves 30% of the way
    assert pacer.seconds_per_row == pytest.approx(0.7 * 1.0 + 0.3 * 3.0)
    assert evaluation.TaskPacer(8, 1100.0, 10, task_cap=4.0).next_task(0, 1) == (8, 1014.0)   # --task-cap
    now[0] = 1100.0
    assert pacer.next_task(2, 1) is None                  # no time left: the fallback answers


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    _, folder, _ = trained
    challenges = _kaggle_files(tmp_path, "x", _tasks(1, 1, seed=1), solutions=False)
    sub = tmp_path / "s.json"
    assert "no such folder" in _one_line_error(capsys, ["--model", str(tmp_path / "nope"), "--data", str(challenges),
                                                         "--submission", str(sub)])
    bad_json = tmp_path / "bad_challenges.json"
    bad_json.write_text("{oops")
    assert "not valid JSON" in _one_line_error(capsys, ["--model", str(folder), "--data", str(bad_json),
                                                         "--submission", str(sub)])
    tampered = tmp_path / "ck"
    save_checkpoint(tampered, 1, {"model": {}}, {"model_config": {}}, keep=1)
    step = next(tampered.iterdir())
    (step / "state.pt").write_bytes(b"not a torch file")
    assert "cannot be read" in _one_line_error(capsys, ["--model", str(step), "--device", "cpu", "--data",
                                                         str(challenges), "--submission", str(sub)])
    broken = tmp_path / "bad.json"
    broken.write_text(json.dumps({"a": [{"attempt_1": [[1]]}]}))
    assert "attempt_1, attempt_2" in _one_line_error(capsys, ["--check", str(broken)])


def test_a_checkpoint_of_another_architecture_or_weights_is_refused(trained, tmp_path):
    model, _, _ = trained
    config = model.config.to_dict()
    cases = [({}, {"model_config": {**config, "model_type": "llama"}}, "not a Qwen architecture"),
             ({}, {"model_config": {**config, "hidden_size": 32}}, "do not fit"),
             ({"model": {**model.state_dict(), "lm_head.lora_A.weight": torch.zeros(1)}}, {}, "LoRA")]
    for i, (state, meta, words) in enumerate(cases):
        step = _checkpoint(tmp_path / f"c{i}", trained, state, meta)
        with pytest.raises(UserError, match=words):
            evaluation.load_for_inference(step)


def test_time_budget_needs_a_unit(tmp_path):
    """The submission CLI reads durations as the other scripts do: a bare number is refused, in one line."""
    base = ["--model", str(tmp_path), "--data", str(tmp_path / "c.json"), "--submission", str(tmp_path / "s.json")]
    for flag in ("--time-budget", "--task-cap"):
        with pytest.raises(UserError, match="needs a unit"):
            evaluation.parse_args([*base, "--time-budget", "1h", flag, "2"] if flag == "--task-cap"
                                  else [*base, flag, "2"])
    args = evaluation.parse_args([*base, "--time-budget", "90m", "--task-cap", "45s"])
    assert (args.time_budget, args.task_cap) == (5400, 45)
    with pytest.raises(UserError, match="unrecognized arguments: --view"):
        evaluation.parse_args([*base, "--view", "8"])  # no abbreviations
