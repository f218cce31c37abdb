"""The banner's schedule words (training.describe_schedule) say what build_scheduler's lr really does."""
from __future__ import annotations

import pytest
import torch

import training as T


def lrs(total: int, warmup: int, lr: float = 1e-3) -> list[float]:
    """The lr of each of `total` optimizer steps."""
    optimizer = T.build_optimizer(torch.nn.Linear(2, 2), lr=lr)
    scheduler = T.build_scheduler(optimizer, total_steps=total, warmup_steps=warmup)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_a_run_no_longer_than_its_warm_up_is_said_to_end_near_the_peak():
    """The 100-batch smoke run with the default 100 warm-up steps: the lr climbs all the way, no cosine."""
    words = T.describe_schedule(1e-3, total_steps=100, warmup_steps=100)
    seen = lrs(100, 100)
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert f"to {seen[-1]:.3g}" in words and "no decay" in words and "cosine to 0" not in words


def test_warm_up_then_cosine_is_said_when_the_run_is_longer():
    words = T.describe_schedule(1e-3, total_steps=300, warmup_steps=100)
    assert words == "lr 0.001, 100 warm-up steps then cosine to 0 at step 300"
    seen = lrs(300, 100)
    assert max(seen) == pytest.approx(1e-3) and seen[-1] < 1e-6
    assert T.describe_schedule(1e-3, 50, 0) == "lr 0.001, cosine to 0 over 50 steps"
