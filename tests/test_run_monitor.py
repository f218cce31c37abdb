"""run_monitor: the step-time fit behind the ETA, slowdown warnings, the progress bar, metrics and the plot."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

import run_monitor
import throughput_report


def test_step_time_model_recovers_overhead_and_per_token_cost():
    model = run_monitor.StepTimeModel()
    rng = np.random.default_rng(0)
    for tokens in rng.integers(100, 8000, 200):
        model.add(int(tokens), 0.05 + 2e-5 * tokens)
    a, b = model.coefficients()
    assert a == pytest.approx(0.05, rel=1e-6) and b == pytest.approx(2e-5, rel=1e-6)
    constant = run_monitor.StepTimeModel()
    for _ in range(10):
        constant.add(4096, 0.3)  # packed rows: every batch the same size
    assert constant.predict(10, 40960) == pytest.approx(3.0)


def test_eta_from_tokens_does_not_swing_with_sample_length():
    """ARC-like lengths (log-normal, ~100x spread): after 5% of the epoch the token-based ETA stays within
    10% of the truth, while 'remaining batches x mean batch time so far' (tqdm's way) strays further."""
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(750), 0.8, 3232), 60, 7500).astype(int)
    seconds = 0.02 + 6e-5 * lengths
    model, worst_tokens, worst_batches = run_monitor.StepTimeModel(), 0.0, 0.0
    for i, (tokens, step) in enumerate(zip(lengths, seconds)):
        model.add(int(tokens), float(step))
        if i >= 160:
            truth = seconds[i + 1:].sum()
            if truth > 60:
                eta = model.predict(len(lengths) - i - 1, int(lengths[i + 1:].sum()))
                naive = seconds[:i + 1].mean() * (len(lengths) - i - 1)
                worst_tokens = max(worst_tokens, abs(eta / truth - 1))
                worst_batches = max(worst_batches, abs(naive / truth - 1))
    assert worst_tokens < 0.10 and worst_batches > 2 * worst_tokens


def test_slowdown_is_reported_once():
    shape = throughput_report.BatchShape(1, 1000, 1000)
    timing, monitor = run_monitor.StepTimeModel(), run_monitor.SlowdownMonitor()
    warnings = []
    for i in range(400):
        slow = 2.0 if i >= 250 else 1.0
        tokens = 500 + (i * 37) % 1000  # lengths vary: longer samples alone must not warn
        seconds = slow * (0.01 + 1e-5 * tokens)
        timing.add(tokens, seconds)
        monitor.add(tokens, shape, seconds, timing)
        if i % 25 == 0:
            warnings += monitor.check()
            assert not warnings or i > 250
    assert len(warnings) == 1 and "2.0x slower than early in this run" in warnings[0]


def test_slower_than_the_benchmark_is_reported_for_the_same_batch_shapes():
    """The benchmark's cost model (ms = 5 + 10 per 1k padded tokens) predicts each batch; a run of long batches
    at that speed is fine, the same batches 1.5x slower warn once."""
    model = throughput_report.CostModel("linear", (5.0, 10.0))
    for factor, expected in ((1.0, 0), (1.5, 1)):
        timing, monitor, warnings = run_monitor.StepTimeModel(), run_monitor.SlowdownMonitor(model), []
        for i in range(200):
            length = 200 if i < 100 else 4000
            seconds = factor * (5 + 10 * length / 1000) / 1000
            timing.add(length, seconds)
            monitor.add(length, throughput_report.BatchShape(1, length, length), seconds, timing)
            if i % 20 == 0:
                warnings += monitor.check()
        assert len(warnings) == expected
    assert "1.50x as long as measure_throughput.py measured" in warnings[0]


def test_progress_bar_looks_like_the_guide():
    stream = io.StringIO()
    bar = run_monitor.EpochBar(total=3232, initial=807, desc="Epoch 0 Training", file=stream, ncols=100)
    bar.eta_seconds = 20 * 60 + 15
    bar.stats = "loss: 0.4521, 2,345 tok/s"
    bar.refresh()
    text = stream.getvalue()
    assert "Epoch 0 Training:  25%|" in text and "| 807/3232 [00:00<20:15] loss: 0.4521, 2,345 tok/s" in text


def test_metrics_restore_keeps_history_up_to_the_checkpoint(tmp_path):
    source = tmp_path / "old.jsonl"
    source.write_text("".join(json.dumps({"kind": "step", "step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                      + '{"kind": "step", "st')  # a line cut short by a crash
    log = run_monitor.MetricsLog(tmp_path / "metrics.jsonl")
    log.restore(source, up_to_step=3)
    log.write({"kind": "step", "step": 4, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in log.records()] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)]


def test_plot_draws_loss_and_eval_accuracy(tmp_path):
    lines = [{"kind": "step", "epoch": e, "step": 4 * e + b, "batch": b, "batches": 4, "loss": 2.0 / (1 + 4 * e + b)}
             for e in range(3) for b in range(1, 5)]
    lines += [{"kind": "epoch", "epoch": e, "step": 4 * e + 4, "batch": 4, "batches": 4, "loss": 1.0 / (e + 1),
               "eval_accuracy": 0.2 * e, "eval_task_accuracy": 0.1 * e} for e in range(3)]
    path = run_monitor.plot_metrics(lines, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert run_monitor.plot_metrics([], tmp_path / "none.png") is None


def drawn(monkeypatch, records, tmp_path):
    """The figure plot_metrics draws for `records` (captured at savefig), and the PNG it wrote."""
    from matplotlib.figure import Figure
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    path = run_monitor.plot_metrics(records, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    return figures[0]


def test_plot_x_axis_is_the_step_and_shows_greedy_and_voted_pass2(monkeypatch, tmp_path):
    """A 100-batch smoke run (log every 50) is drawn at steps 50 and 100, not at 'epoch 0.5-1.0'; evaluation
    with 8 views shows the greedy accuracy and the voted pass@2 side by side."""
    lines = [{"kind": "step", "epoch": 0, "step": s, "batch": s, "batches": 100, "loss": 1.0 / s} for s in (50, 100)]
    lines.append({"kind": "epoch", "epoch": 0, "step": 100, "batch": 100, "batches": 100, "loss": 0.02,
                  "eval_accuracy": 0.1, "eval_task_accuracy": 0.05, "eval_greedy_accuracy": 0.1,
                  "eval_pass2_voted": 0.3, "eval_task_pass2_voted": 0.2, "eval_views": 8, "eval_attempts": 1})
    loss_axes, eval_axes = drawn(monkeypatch, lines, tmp_path).axes[:2]
    assert list(loss_axes.lines[0].get_xdata()) == [50, 100]
    assert "optimizer step" in eval_axes.get_xlabel()
    curves = {line.get_label(): list(line.get_ydata()) for line in eval_axes.lines
              if not line.get_label().startswith("_")}
    assert curves["test inputs, greedy (pass@1)"] == [pytest.approx(10)]
    assert curves["test inputs, pass@2 voted over 8 views"] == [pytest.approx(30)]
    assert curves["tasks, pass@2 voted over 8 views"] == [pytest.approx(20)]


def test_plot_shows_a_single_point_and_no_voted_curve_for_one_view(monkeypatch, tmp_path):
    """A resumed run's log may hold one step line: it is drawn with a marker. One view: no voted curve."""
    lines = [{"kind": "step", "epoch": 0, "step": 7, "batch": 7, "batches": 20, "loss": 1.3},
             {"kind": "eval", "epoch": 0, "step": 7, "batch": 7, "batches": 20, "eval_accuracy": 0.5,
              "eval_task_accuracy": 0.5, "eval_greedy_accuracy": 0.5, "eval_pass2_voted": 0.5, "eval_views": 1}]
    loss_axes, eval_axes = drawn(monkeypatch, lines, tmp_path).axes[:2]
    assert loss_axes.lines[0].get_marker() not in (None, "None", "") and list(loss_axes.lines[0].get_xdata()) == [7]
    assert not [line for line in eval_axes.lines if "voted" in line.get_label()]


def test_the_eta_leaves_one_off_steps_out():
    """Epoch 0's first steps (allocator growth, kernel selection) and a later one-off step (a new shape's first
    allocation) are not steady steps: the fit, and so the next-epoch ETA, leaves them out."""
    model = run_monitor.StepTimeModel()
    for i in range(200):
        seconds = 0.5 if i < 5 else 0.01   # the first 5 steps 50x slower, as on the tiny CPU model
        model.add(100, 3.0 if i == 100 else seconds)
    assert model.predict(100, 100 * 100) == pytest.approx(1.0, rel=1e-6) and model.left_out == 1


def test_slowdown_advice_names_the_tools_of_the_device():
    shape = throughput_report.BatchShape(1, 1000, 1000)
    for device, tool, absent in (("cpu", "check top", "nvidia-smi"), ("cuda", "check nvidia-smi", "top")):
        model = throughput_report.CostModel("linear", (5.0, 0.0))
        timing, monitor, warnings = run_monitor.StepTimeModel(), run_monitor.SlowdownMonitor(model, device), []
        for i in range(300):
            seconds = (0.005 if i < 150 else 0.02)
            timing.add(1000, seconds)
            monitor.add(1000, shape, seconds, timing)
            if i % 25 == 0:
                warnings += monitor.check()
        assert len(warnings) == 2 and all(tool in w and absent not in w for w in warnings)
