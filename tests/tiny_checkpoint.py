"""A small but complete checkpoint, laid out as the trainer writes one (checkpointing.training_state), for
tests that tamper with its fields: a Linear model, AdamW after one step, its LambdaLR, TrainStep counters, RNG, loop."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch

from checkpointing import training_state


@dataclasses.dataclass
class Loop:
    """Stands in for the trainer's LoopState (the same kinds of field: ints, floats, optional, list)."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_seconds: float = 0.0
    best_eval: float | None = None
    last_eval: dict[str, Any] | None = None
    epoch_samples: list[str] = dataclasses.field(default_factory=list)


LOOP_TYPES = typing.get_type_hints(Loop)


def parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def full_state(value: float = 1.0, step: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a valid checkpoint after `step` steps; `value` fills the model weights."""
    model, optimizer, scheduler = parts()
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.weight.fill_(value)
    # The trainer's layout (checkpointing.training_state); a Linear has no TrainStep, so its counters are given.
    state = training_state(model, optimizer, scheduler,
                           loop=dataclasses.asdict(Loop(epoch=0, batch=step, step=step, epoch_seconds=1.5,
                                                        epoch_samples=["a/0"])))
    state["train_step"] = {"scaler": {}, "micro_steps": step, "optimizer_steps": step, "skipped_steps": 0}
    meta = {"step": step, "epoch": 0, "batch": step, "reason": "step", "saved_at": "2026-12-01T00:00:00",
            "epochs": 1, "args": {"lr": 1e-3, "epochs": 1}, "model_config": {"hidden_size": 4},
            "vocabulary": list("0123456789"), "device": {"name": "cpu"}, "precision": "fp32",
            "last_eval": None, "world_size": 1}
    return state, meta
