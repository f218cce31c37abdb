"""The Kaggle workflow's last two steps on CPU: test-time training from a saved model/ folder on a challenges
file that has no solutions (leave-one-out over the test tasks' train pairs, evaluation off), then
`evaluation.py --submission` on the model it saves writes a file the validator accepts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluation
import trainloop_gpu_finetuned as trainloop
from arc_dataset import SYMBOLS
from submission import check_submission_file
from test_trainloop import MAPPING, records, tiny_args, write_tasks


def write_challenges(path, n_tasks: int, seed: int):
    """A Kaggle *_challenges.json: train pairs, test inputs only, and no *_solutions.json beside it."""
    rng = np.random.default_rng(seed)
    challenges = {}
    for t in range(n_tasks):
        grids = rng.integers(0, 10, size=(4, 3, 3))
        challenges[f"{t:08x}"] = {"train": [{"input": g.tolist(), "output": MAPPING[g].tolist()} for g in grids[:3]],
                                  "test": [{"input": grids[3].tolist()}]}
    path.write_text(json.dumps(challenges))
    return path


@pytest.mark.slow
def test_test_time_training_from_a_saved_model_on_challenges_without_solutions(tmp_path):
    base = tmp_path / "base"
    assert trainloop.main(tiny_args(tmp_path, "base", "--epochs", "1",
                                    data=write_tasks(tmp_path / "training.json", 4, 3, seed=0))) == 0
    challenges = write_challenges(tmp_path / "arc-agi_test_challenges.json", 3, seed=5)
    assert not list(tmp_path.glob("*solutions*"))

    # 2. test-time training: the saved model keeps its 16-symbol vocabulary (no re-slicing), and trains on the
    # challenges' own train pairs, leave-one-out: 3 tasks x 3 pairs = 9 samples
    ttt = tmp_path / "ttt"
    assert trainloop.main(["--model-name", str(base / "model"), "--data", str(challenges), "--eval-tasks", "0",
                           "--device", "cpu", "--epochs", "1", "--output-dir", str(ttt), "--log-every", "1",
                           "--lr", "3e-3", "--warmup-steps", "0"]) == 0
    epoch = records(ttt, "epoch")
    assert len(epoch) == 1 and epoch[0]["samples"] == 9 and "eval_accuracy" not in epoch[0]
    config = json.loads((ttt / "model" / "config.json").read_text())
    assert config["vocab_size"] == len(SYMBOLS)
    before, after = load_file(base / "model" / "model.safetensors"), load_file(ttt / "model" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    settings = json.loads((ttt / "model" / "run_settings.json").read_text())
    assert settings["args"]["model_name"] == str(base / "model")

    # 3. predict: every task answered, two attempts each, and the validator accepts it (also as --check)
    submission = tmp_path / "submission.json"
    assert evaluation.main(["--model", str(ttt / "model"), "--data", str(challenges), "--submission",
                            str(submission), "--views", "2", "--time-budget", "2m", "--device", "cpu"]) == 0
    tasks = json.loads(challenges.read_text())
    assert check_submission_file(submission, challenges) == {task_id: 1 for task_id in tasks}
    content = json.loads(submission.read_text())
    assert all(set(entry) == {"attempt_1", "attempt_2"} for entries in content.values() for entry in entries)
    assert evaluation.main(["--check", str(submission), "--data", str(challenges)]) == 0
