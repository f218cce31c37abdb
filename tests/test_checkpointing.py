"""Checkpoints: atomic folders, rotation, resume-path resolution, weights-only round trips, RNG."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import checkpointing
from checkpointing import (CHECKPOINT_DIR, META_FILE, STATE_FILE, capture_rng_state, latest_checkpoint,
                           list_checkpoints, load_checkpoint, load_model_state, model_state,
                           remove_stale_temporaries, resolve_resume_path, restore_rng_state,
                           save_checkpoint)
from errors import UserError
from tiny_checkpoint import full_state


def _state(value: float) -> dict:
    return full_state(value)[0]


def test_save_load_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {**_state(0.0), "model": model_state(model), "optimizer": optimizer.state_dict(),
             "rng": capture_rng_state(), "loop": {"epoch": 0, "batch": 3, "step": 3, "losses": [1.5, float("nan")]}}
    path = save_checkpoint(tmp_path, 3, state, {"step": 3, "args": {"lr": 1e-3}}, keep=2)

    assert path.name == "step-00000003"
    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 3 and meta["args"] == {"lr": 1e-3} and meta["format"] == 1
    fresh = torch.nn.Linear(4, 2)
    load_model_state(fresh, loaded["model"])
    assert torch.equal(fresh.weight, model.weight)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh_optimizer.state[fresh.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert loaded["loop"]["batch"] == 3


def test_rotation_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, _state(step), {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015", "step-00000020"]
    assert latest_checkpoint(tmp_path).name == "step-00000020"


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 4, _state(1.0), {"reason": "step"}, keep=3)
    save_checkpoint(tmp_path, 4, _state(2.0), {"reason": "epoch"}, keep=3)
    state, meta = load_checkpoint(tmp_path / "step-00000004")
    assert meta["reason"] == "epoch" and state["model"]["weight"][0, 0].item() == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]


def test_failed_write_leaves_previous_checkpoint_and_no_partial_folder(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1.0), {}, keep=3)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left on device.*--keep-checkpoints"):
        save_checkpoint(tmp_path, 2, _state(2.0), {}, keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_half_written_folders_are_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1.0), {}, keep=3)
    (tmp_path / ".tmp-step-00000002-999").mkdir()
    (tmp_path / ".tmp-step-00000002-999" / STATE_FILE).write_bytes(b"partial")
    (tmp_path / "step-00000003").mkdir()  # a folder without its files is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".tmp-step-00000002-999"]
    assert not (tmp_path / ".tmp-step-00000002-999").exists()


def test_corrupt_or_foreign_checkpoints_give_one_line_errors(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1.0), {}, keep=3)
    (path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_checkpoint(tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "format": 99}))
    torch.save(_state(1.0), path / STATE_FILE)
    with pytest.raises(UserError, match="format 99"):
        load_checkpoint(path)


def test_weights_only_load_refuses_pickled_code(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1.0), {}, keep=3)
    torch.save({"evil": _Pickled()}, path / STATE_FILE)
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(path)


class _Pickled:
    pass


def test_resolve_resume_path(tmp_path):
    runs = tmp_path / "runs"
    old, new = runs / "20240101-000000", runs / "20240102-000000"
    save_checkpoint(old / CHECKPOINT_DIR, 10, _state(1.0), {}, keep=3)
    save_checkpoint(new / CHECKPOINT_DIR, 2, _state(1.0), {}, keep=3)
    save_checkpoint(new / CHECKPOINT_DIR, 4, _state(1.0), {}, keep=3)

    assert resolve_resume_path(None, None, runs) == new / CHECKPOINT_DIR / "step-00000004"
    assert resolve_resume_path(None, old, runs) == old / CHECKPOINT_DIR / "step-00000010"
    assert resolve_resume_path(str(old), None, runs) == old / CHECKPOINT_DIR / "step-00000010"
    step2 = new / CHECKPOINT_DIR / "step-00000002"
    assert resolve_resume_path(str(step2), None, runs) == step2
    assert resolve_resume_path(str(new / CHECKPOINT_DIR), None, runs).name == "step-00000004"
    with pytest.raises(UserError, match="no checkpoint there"):
        resolve_resume_path(str(tmp_path / "nothing"), None, runs)
    with pytest.raises(UserError, match="no run with a checkpoint"):
        resolve_resume_path(None, None, tmp_path / "empty")


def test_lora_style_models_save_only_trainable_weights(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    state = model_state(model)
    assert set(state) == {"1.weight", "1.bias"}
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    other[0].requires_grad_(False)
    load_model_state(other, state)
    assert torch.equal(other[1].weight, model[1].weight)
    with pytest.raises(UserError, match="do not fit this model"):
        load_model_state(torch.nn.Linear(3, 1), state)
    with pytest.raises(UserError, match="do not fit this model"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)), model_state(model))


def test_rng_round_trip_reproduces_draws():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_rng_state_survives_weights_only_load(tmp_path):
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 1, {**_state(1.0), "rng": capture_rng_state()}, {}, keep=1)
    expected = torch.rand(3)
    torch.manual_seed(6)
    state, _ = load_checkpoint(path)
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)
