"""stopping: the time budget's reserve, the agreed stop under torchrun, early stop and the non-finite guard,
with a fake clock and a fake process group (no model, no training run)."""
from __future__ import annotations

import math
import signal

import pytest
import torch

import stopping
from stopping import NonFiniteGuard, StopRequest, StopRules, early_stop_due


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Alone:
    is_distributed, is_main, world_size = False, True, 1

    def any_true(self, flag: bool) -> bool:
        return bool(flag)

    def all_reduce_sum(self, values):
        return values


class Group(Alone):
    """Rank 0 of two processes; the other one adds `others` to every all-reduce and any_true."""
    is_distributed, world_size = True, 2

    def __init__(self, others=(0, 0, 0), other_true: bool = False):
        self.others, self.other_true, self.reductions = others, other_true, 0

    def any_true(self, flag: bool) -> bool:
        return bool(flag) or self.other_true

    def all_reduce_sum(self, values):
        self.reductions += 1
        return [v + o for v, o in zip(values, self.others)]


def rules(ctx=None, deadline=100.0, clock=None, **kwargs) -> StopRules:
    return StopRules(ctx or Alone(), deadline, grad_accum=kwargs.get("grad_accum", 1),
                     checkpoint_bytes=kwargs.get("checkpoint_bytes", 0), model_bytes=kwargs.get("model_bytes", 0),
                     clock=clock or FakeClock())


def test_the_reserve_keeps_a_step_a_checkpoint_and_the_final_model_in_hand():
    r = rules(checkpoint_bytes=150_000_000, model_bytes=300_000_000)
    # before any save: 1 + 1 s for the checkpoint, 1 + 2 s for the model, each x 1.5, + 5
    assert r.reserve_seconds() == pytest.approx(1.5 * 2 + 1.5 * 3 + 5)
    r.add_step(0.5)
    r.add_step(2.0)
    r.save_seconds = 4.0   # the model is twice the checkpoint: 8 s
    assert r.reserve_seconds() == pytest.approx(2 * 2.0 + 1.5 * 4 + 1.5 * 8 + 5)


def test_out_of_time_follows_the_clock_and_no_budget_never_stops():
    clock = FakeClock(0.0)
    r = rules(deadline=100.0, clock=clock)
    r.save_seconds, r.checkpoint_bytes, r.model_bytes = 2.0, 1, 1
    assert r.reserve_seconds() == pytest.approx(11.0)
    clock.now = 88.0
    assert not r.out_of_time() and r.agreed_stop(StopRequest(announce=False), 1, force=False) is None
    clock.now = 89.5
    assert r.out_of_time() and r.agreed_stop(StopRequest(announce=False), 1, force=False) == "time budget"
    assert not rules(deadline=None).out_of_time() and rules(deadline=None).seconds_to_spare() is None


def test_a_signal_wins_over_the_budget():
    stop = StopRequest(announce=False)
    stop.signal_name = "SIGINT"
    r = rules(deadline=0.0)
    assert r.agreed_stop(stop, 1, force=False) == "interrupted"


def test_evaluation_is_skipped_when_the_last_one_would_not_fit():
    clock = FakeClock(0.0)
    r = rules(deadline=100.0, clock=clock)
    assert r.evaluation_fits() == (True, math.inf)   # no evaluation timed yet
    r.eval_seconds = 50.0
    left = 100.0 - r.reserve_seconds()
    assert r.evaluation_fits() == (True, pytest.approx(left))   # 1.2 x 50 = 60 s fits
    clock.now = 40.0
    assert r.evaluation_fits()[0] is False
    assert rules(ctx=Group(other_true=True), deadline=1e9).evaluation_fits()[0] is True  # no eval timed: no collective


def test_under_torchrun_the_stop_is_agreed_every_check_interval():
    group = Group(others=(1, 0, 0))      # the other process got a signal
    r = rules(ctx=group, deadline=None)
    for _ in range(10):
        r.add_step(0.25)
    r.grad_accum = 2                     # an optimizer step is 2 batches of 0.25 s: 4 of them in ~2 s
    assert r.check_interval() == 4
    stop = StopRequest(announce=False)
    assert r.agreed_stop(stop, 1, force=False) == "interrupted" and group.reductions == 1
    assert stop.signal_name == "a signal to another process"
    assert (r.check_every, r.next_check) == (4, 5)
    quiet = rules(ctx=Group(), deadline=None)
    quiet.check_every, quiet.next_check = 4, 5
    assert quiet.agreed_stop(StopRequest(announce=False), 3, force=False) is None and quiet.ctx.reductions == 0
    assert quiet.agreed_stop(StopRequest(announce=False), 3, force=True) is None and quiet.ctx.reductions == 1
    # the reserve keeps the agreed interval's batches in hand
    r.recent_steps.clear()
    r.add_step(1.0)
    assert r.reserve_seconds() == pytest.approx((1 + 4 * 2) * 1.0 + 1.5 + 1.5 + 5)


def test_check_interval_is_bounded():
    r = rules()
    assert r.check_interval() == 1
    r.add_step(1e-9)
    assert r.check_interval() == 1000
    r.recent_steps.clear()
    r.add_step(10.0)
    assert r.check_interval() == 1


def test_early_stop_after_n_evaluations_without_improvement():
    assert not early_stop_due(0, 99)
    assert not early_stop_due(3, 2) and early_stop_due(3, 3)


def guard(use_grad_scaler: bool, limit: int = 3, ctx=None) -> tuple[NonFiniteGuard, torch.Tensor]:
    skipped = torch.zeros((), dtype=torch.int64)
    return NonFiniteGuard(ctx or Alone(), torch.device("cpu"), skipped, use_grad_scaler, limit, "fp16"), skipped


def test_without_a_scaler_the_first_non_finite_loss_stops():
    g, skipped = guard(use_grad_scaler=False)
    g.record(torch.tensor(1.0), skipped)
    assert not g.must_stop()
    g.record(torch.tensor(float("nan")), skipped)
    g.record(torch.tensor(1.0), skipped)   # a finite loss after it does not undo it
    assert g.must_stop() and "the loss became non-finite (NaN/inf) in fp16" in g.reason


def test_with_the_scaler_max_bad_steps_in_a_row_stop():
    g, skipped = guard(use_grad_scaler=True, limit=3)
    for _ in range(2):
        skipped = skipped + 1              # the GradScaler skipped the step
        g.record(torch.tensor(1.0), skipped)
    assert not g.must_stop()
    g.record(torch.tensor(1.0), skipped)   # a good step resets the run
    for _ in range(2):
        g.record(torch.tensor(float("inf")), skipped)
    assert not g.must_stop()
    g.record(torch.tensor(float("inf")), skipped)
    assert g.must_stop() and "3 optimizer steps in a row" in g.reason


def test_another_process_seeing_non_finite_losses_stops_this_one():
    g, skipped = guard(use_grad_scaler=True, ctx=Group(other_true=True))
    assert g.must_stop() and g.reason == "another process saw non-finite losses or gradients"


def test_stop_request_turns_the_first_signal_into_a_request(capsys):
    with StopRequest(announce=True) as stop:
        assert not stop
        stop._handle(signal.SIGTERM, None)
        assert stop and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)   # a second Ctrl-C quits at once
    assert "SIGTERM: stopping after the current batch" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is not stop._handle   # restored on leaving


def test_the_check_interval_constant_is_about_two_seconds():
    assert stopping.STOP_CHECK_SECONDS == 2.0
