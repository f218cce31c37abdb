"""When a training run stops: signals, the time budget, early stopping and non-finite losses.

Each rule is a small object that the loop asks at its checkpoints; none of them reads the model or the data,
so each is unit-tested with a fake clock and a fake distributed context (anything with `is_distributed`,
`is_main`, `all_reduce_sum` and `any_true`, as distributed.DistributedContext has).
"""
from __future__ import annotations

import signal
import sys
import time
from collections import deque
from typing import Any, Callable

import torch

# Under torchrun, how often the processes agree whether to stop (a signal, the time budget). Each check is one
# host-side all-reduce of a few numbers over gloo (0.35 ms between two CPU processes here) that also makes
# the processes wait for each other, so it runs every ~2 s of training rather than every step: torchrun
# SIGKILLs its workers --shutdown-timeout (30) s after forwarding Ctrl-C, which leaves time to save.
STOP_CHECK_SECONDS = 2.0
RECENT_STEPS = 50           # step times kept for the reserve and the agreed-check interval
DISK_BYTES_PER_SECOND = 150e6  # before the first save is timed: what a checkpoint is assumed to cost


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current batch; a second Ctrl-C
    stops at once (KeyboardInterrupt: exit 130 without saving). `announce`: print the notice (rank 0 only, so
    torchrun's N processes do not all say it)."""

    def __init__(self, announce: bool = True, when: str = "after the current batch") -> None:
        self.signal_name: str | None = None
        self.announce = announce
        self.when = when
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal_name}: stopping {self.when} to save a checkpoint "
                  f"(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)


class StopRules:
    """The time budget and the agreed stop: whether the run must stop now, and what to keep in hand.

    `deadline` is a time on `clock` (None: no budget). The reserve is the next step (twice the slowest recent
    one), a checkpoint and the final model, timed from the last save once there was one. Alone, every call
    decides; under torchrun the processes agree with one host-side all-reduce at `force`d points (epoch ends)
    and every `check_every` optimizer steps, which rank 0 sets to about STOP_CHECK_SECONDS of training."""

    def __init__(self, ctx: Any, deadline: float | None, grad_accum: int, checkpoint_bytes: int, model_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.deadline = deadline
        self.grad_accum = grad_accum
        self.checkpoint_bytes = checkpoint_bytes
        self.model_bytes = model_bytes
        self.clock = clock
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self.save_seconds: float | None = None
        self.eval_seconds: float | None = None
        self.check_every = 1       # optimizer steps between agreed checks (torchrun)
        self.next_check = 0

    def add_step(self, seconds: float) -> None:
        self.recent_steps.append(seconds)

    def reserve_seconds(self) -> float:
        """Time to keep in hand: the next step (twice the slowest recent one), a checkpoint, the final model."""
        recent = max(self.recent_steps, default=0.0)
        if self.save_seconds is not None:
            save = self.save_seconds
            final = self.save_seconds * self.model_bytes / max(1, self.checkpoint_bytes)
        else:
            save = 1 + self.checkpoint_bytes / DISK_BYTES_PER_SECOND
            final = 1 + self.model_bytes / DISK_BYTES_PER_SECOND
        # Under torchrun the stop is only agreed every `check_every` optimizer steps: keep those in hand too.
        batches = self.check_every * self.grad_accum if self.ctx.is_distributed else 1
        return (1 + batches) * recent + 1.5 * save + 1.5 * final + 5

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.deadline - self.clock() < self.reserve_seconds()

    def seconds_to_spare(self) -> float | None:
        """Budget left after the reserve (None without a budget)."""
        return None if self.deadline is None else self.deadline - self.clock() - self.reserve_seconds()

    def evaluation_fits(self) -> tuple[bool, float]:
        """(whether an evaluation as long as the last one fits the budget, seconds to spare); agreed under
        torchrun (all skip if one must)."""
        left = self.seconds_to_spare()
        if left is None or self.eval_seconds is None:
            return True, float("inf")
        return not self.ctx.any_true(left < 1.2 * self.eval_seconds), left

    def agreed_stop(self, stop: StopRequest, step: int, force: bool) -> str | None:
        """'interrupted' (Ctrl-C, SIGTERM) or 'time budget' when this process, or under torchrun any process,
        has to stop after optimizer step `step`; else None."""
        wants_stop, out_of_time = bool(stop), self.out_of_time()
        if self.ctx.is_distributed:
            if not force and step < self.next_check:
                return None
            interval = self.check_interval() if self.ctx.is_main else 0
            stops, late, interval = self.ctx.all_reduce_sum([wants_stop, out_of_time, interval])
            self.check_every = max(1, int(interval))
            self.next_check = step + self.check_every
            wants_stop, out_of_time = stops > 0, late > 0
            if wants_stop and not stop:
                stop.signal_name = "a signal to another process"
        return "interrupted" if wants_stop else "time budget" if out_of_time else None

    def check_interval(self) -> int:
        """Optimizer steps in about STOP_CHECK_SECONDS, from the recent step times (rank 0's decides)."""
        if not self.recent_steps:
            return 1
        seconds_per_step = self.grad_accum * sum(self.recent_steps) / len(self.recent_steps)
        return int(min(1000, max(1, STOP_CHECK_SECONDS // max(seconds_per_step, 1e-6))))


def early_stop_due(patience: int, evals_since_best: int) -> bool:
    """--early-stop N: N evaluations in a row without a better accuracy (0: never)."""
    return bool(patience) and evals_since_best >= patience


class NonFiniteGuard:
    """Counts optimizer steps with a non-finite loss or a step the GradScaler skipped, on the device (no host
    sync per step), and says when the run must stop: `max_bad_steps` in a row with fp16's scaler, the first
    one without it (the weights are then already broken). `reason` says why, for the final message."""

    def __init__(self, ctx: Any, device: torch.device, skipped_steps: torch.Tensor, use_grad_scaler: bool,
                 max_bad_steps: int, precision_name: str) -> None:
        self.ctx = ctx
        self.use_grad_scaler = use_grad_scaler
        self.precision_name = precision_name
        self.limit = max_bad_steps if use_grad_scaler else 1
        self.reason = "non-finite loss"
        self._run = torch.zeros((), dtype=torch.int64, device=device)
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_before = skipped_steps.clone()

    def record(self, loss: torch.Tensor, skipped_steps: torch.Tensor) -> None:
        """After each batch; device-side only."""
        bad = ~torch.isfinite(loss) | (skipped_steps > self._skipped_before)
        self._skipped_before = skipped_steps.clone()
        self._run = (self._run + 1) * bad
        self._total += bad

    def must_stop(self) -> bool:
        """True when the run must stop (reads two counters: a host sync point; under torchrun every process
        stops when one must)."""
        run, total = int(self._run.item()), int(self._total.item())
        self._total.zero_()
        bad = run >= self.limit or (self.limit == 1 and total > 0)
        if bad:
            self.reason = (f"{run} optimizer steps in a row had a non-finite loss or gradient (the fp16 "
                           f"GradScaler skipped them)" if self.use_grad_scaler else
                           f"the loss became non-finite (NaN/inf) in {self.precision_name}, which has no "
                           f"GradScaler to skip such steps")
        if self.ctx.any_true(bad):
            if not bad:
                self.reason = "another process saw non-finite losses or gradients"
            return True
        return False
