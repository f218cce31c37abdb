"""measure_throughput.py end to end on CPU with the tiny model: printed sections, the JSON, bad input, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli_common
import measure_throughput as mt
import run_setup
import trainloop_gpu_finetuned as trainloop
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NUM_TASKS, PAIRS = 6, 3   # leave-one-out: 18 samples, 18 batches per epoch at batch size 1


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """A folder of small ARC tasks whose grid sizes differ, so batch lengths do."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    for t in range(NUM_TASKS):
        side = 2 + 2 * t
        def grid():
            return rng.integers(0, 10, (side, side)).tolist()
        task = {"train": [{"input": grid(), "output": grid()} for _ in range(PAIRS)],
                "test": [{"input": grid(), "output": grid()}]}
        (folder / f"task{t}.json").write_text(json.dumps(task))
    return folder


def _env() -> dict[str, str]:
    # One thread: on a shared 2-core machine, OpenMP threads spinning against other processes make CPU step
    # times erratic; one thread keeps the run fast and its timings steady.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "measure_throughput.py"), *flags], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _tiny(tasks_dir: Path, *more: str) -> list[str]:
    return ["--model-name", "tiny", "--device", "cpu", "--data", str(tasks_dir), *more]


def test_cpu_run_prints_the_guides_sections_and_writes_json(tasks_dir, tmp_path):
    out = tmp_path / "results.json"
    run = _run(*_tiny(tasks_dir, "--num-batches", "24", "--warmup", "1", "--json", str(out), "--estimate-gpus", "2"))
    assert run.returncode == 0, run.stderr
    text = run.stdout
    for section in ("CPU: ", "Precision: fp32", "Per-Batch Time Statistics", "Average:", "Median:", "Min:",
                    "Max:", "Std Dev:", "p90:", "tokens/s (real input tokens", "Peak memory:", "MFU: n/a",
                    "Projected Single Epoch Time (18 batches", "seconds", "minutes", "hours", "expected error",
                    "Why: ", "RECOMMENDED EPOCH COUNTS", "If you have [TIME BUDGET] available (the whole run",
                    "Besides training", "evaluation   ", "timed by real decoding", "checkpoints  ",
                    "30 minutes       ->", "12 hours         ->", "Speed tier: Fast", "Recommended: 10 epochs",
                    "Next command:"):
        assert section in text, section
    assert "1686424" not in text

    result = json.loads(out.read_text())
    for key in ("device", "settings", "per_batch_ms", "tokens_per_second", "peak_memory_bytes",
                "batches_per_epoch", "epoch_seconds", "recommendations", "tier"):
        assert key in result, key
    assert set(result["per_batch_ms"]) == {"mean", "median", "min", "max", "std", "p90"}
    assert result["batches_per_epoch"] == NUM_TASKS * PAIRS
    assert result["timed_batches"] == 24 and result["complete"] and not result["interrupted"]
    assert result["device"]["type"] == "cpu" and result["device"]["precision"] == "fp32"
    assert f"Average:     {result['per_batch_ms']['mean']:.2f} ms" in text
    assert result["tokens_per_second"] > 0 and result["peak_memory_bytes"] > 0
    assert result["tier"] == "fast"
    assert result["world_size"] == result["settings"]["world_size"] == 1
    # Utilisation over the matmul rate measured on this device, and the share of computed tokens that are real
    assert 1e8 < result["measured_matmul_flops"] < 1e13
    assert result["mfu_of_measured_peak"] == pytest.approx(
        result["model_flops_per_second"] / result["measured_matmul_flops"])
    assert result["real_token_share"] == 1.0  # batch size 1: nothing is padded
    assert "of this device's measured dense matmul rate" in text and "Real tokens: 100.0%" in text

    # --estimate-gpus: labelled an estimate, for 2 processes of 9 batches, and never taken for a measurement
    estimate = result["estimate"]
    assert "ESTIMATE for 2 GPUs (not measured" in text and "assumes every GPU as fast as this one" in text
    assert (estimate["world_size"], estimate["batches_per_epoch"]) == (2, 9)
    assert estimate["gradient_bytes"] == 4 * result["model"]["trainable_parameters"]
    assert 0.4 <= estimate["epoch_seconds"] / result["epoch_seconds"] <= 0.8  # ~half: equal tiny batches

    # The settings the trainer checks are exactly cli_common's speed settings, plus what the data resolved to.
    args = mt.parse_args(_tiny(tasks_dir))
    expected = cli_common.speed_settings(args, {"name": result["device"]["name"], "threads": 1}, "fp32")  # OMP_NUM_THREADS
    assert {k: result["settings"][k] for k in expected} == expected
    assert str(tasks_dir) in result["settings"]["data_description"]

    # The recommended projection is the one reported, and it is bracketed by the fastest and slowest batch.
    ms = result["per_batch_ms"]
    assert result["epoch_seconds"] == result["projections"][result["epoch_projection"]["kind"]]["seconds"]
    assert ms["min"] * 18 / 1000 <= result["epoch_seconds"] <= ms["max"] * 18 / 1000
    rows = result["recommendations"]
    assert [r["budget_hours"] for r in rows] == [0.5, 1, 2, 4, 8, 12]
    assert all(r["epochs"] == 10 and r["capped"] for r in rows)   # a tiny epoch: the useful maximum everywhere
    for r in rows:   # the whole run: its parts sum to it, training is the epochs' projection
        assert sum(r["breakdown"].values()) == pytest.approx(r["planned_seconds"])
        assert r["breakdown"]["training"] == pytest.approx(
            10 * result["epoch_seconds"] + 9 * result["run_costs"]["epoch_data_seconds"])  # epochs 1-9 drawn anew
        assert r["counts"]["evaluations"] == 10 and r["margin"] >= 0.05
        assert r["planned_seconds"] * (1 + r["margin"]) <= r["budget_hours"] * 3600
    costs = result["run_costs"]
    assert costs["evaluation"]["inputs"] == NUM_TASKS and costs["evaluation"]["timed_batches"] >= 1
    assert rows[0]["breakdown"]["evaluation"] == pytest.approx(10 * costs["evaluation"]["pass_seconds"])
    assert costs["checkpoint_seconds"] > 0 and costs["final_save_seconds"] > 0 and costs["startup_seconds"] > 0
    assert 0 < costs["added_share"] < 1 and result["schedule"]["eval_tasks"] == NUM_TASKS
    assert f"of the benchmark's" in text

    command = result["next_command"]
    assert " trainloop_gpu_finetuned.py --epochs 10 " in command
    assert command.split()[0].endswith("python") and command.split()[0] != "python"   # the interpreter that ran
    assert "the shortest budget in the table that trains a whole epoch: 30 minutes -> 10 epochs" in text
    assert f"--data {tasks_dir}" in command and "--model-name tiny" in command and "--device cpu" in command
    assert command in text


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device 'tpu' is not one of"),
    (["--device", "cuda"], "--device cuda: "),
    (["--num-batches", "0"], "--num-batches: must be at least 1"),
    (["--data", "/no/such/tasks"], "/no/such/tasks: no such file or folder"),
    (["--model-name", "no-such-org/no-such-model"], "could not load model 'no-such-org/no-such-model'"),
    (["--time-budget", "soon"], "--time-budget: cannot read 'soon'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tasks_dir, flags, message):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base = ["--device", "cpu", "--model-name", "tiny", "--data", str(tasks_dir)]
    run = _run(*base, *flags, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_ctrl_c_while_timing_prints_the_batches_timed_so_far(tasks_dir, tmp_path):
    out = tmp_path / "partial.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "measure_throughput.py"),
                             *_tiny(tasks_dir, "--num-batches", "1000000", "--warmup", "1", "--json", str(out))],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Timing "):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert "INTERRUPTED: statistics of the" in text and "Per-Batch Time Statistics" in text
    assert "RECOMMENDED EPOCH COUNTS" in text
    result = json.loads(out.read_text())
    assert result["interrupted"] and not result["complete"] and 0 < result["timed_batches"] < 1000000


def test_trainer_flags_repeat_every_non_default_shared_setting(tasks_dir):
    argv = ["--data", str(tasks_dir), "--model-name", "tiny", "--device", "cpu", "--batch-size", "4",
            "--max-length", "2048", "--no-augment", "--seed", "7", "--lora-rank", "8", "--gradient-checkpointing",
            "--precision", "fp32", "--lr", "0.0003", "--grad-accum", "2", "--num-batches", "9",
            "--checkpoint-long-batches", "3000", "--eval-tasks", "5", "--eval-every", "20", "--eval-batch-size", "4",
            "--eval-attempts", "2", "--eval-data", "arc-agi-1", "--save-every", "50", "--keep-checkpoints", "3",
            "--time-budget", "2h"]
    args = mt.parse_args(argv)
    flags = mt.trainer_flags(args)
    assert "--num-batches" not in flags and "--warmup-steps" not in flags and "--time-budget" not in flags
    again = mt.parse_args(flags)
    cpu = {"name": "cpu"}
    assert cli_common.speed_settings(again, cpu, "fp32") == cli_common.speed_settings(args, cpu, "fp32")
    assert (again.seed, again.lr) == (7, 0.0003)
    # the evaluation and checkpoint flags mean the same in both scripts, and the next command repeats them
    shared = ("eval_tasks", "eval_every", "eval_batch_size", "eval_attempts", "eval_data", "save_every",
              "keep_checkpoints")
    assert [getattr(again, k) for k in shared] == [5, 20, 4, 2, "arc-agi-1", 50, 3]
    trainer_args, _ = trainloop.parse_args(flags)
    assert [getattr(trainer_args, k) for k in shared] == [5, 20, 4, 2, "arc-agi-1", 50, 3]


def test_a_time_budget_needs_a_unit_in_the_benchmark_too():
    with pytest.raises(UserError, match="'2' needs a unit: write e.g. 2s, 2m or 2h"):
        mt.parse_args(["--time-budget", "2"])
    with pytest.raises(UserError, match="unrecognized arguments: --num-batch"):
        mt.parse_args(["--num-batch", "5"])   # no abbreviations


def test_long_batches_recompute_above_the_given_limit_and_auto_is_off_on_cpu(tasks_dir, tmp_path):
    out = tmp_path / "results.json"
    run = _run(*_tiny(tasks_dir, "--num-batches", "6", "--warmup", "1", "--json", str(out),
                      "--checkpoint-long-batches", "200"))
    assert run.returncode == 0, run.stderr
    line = next(l for l in run.stdout.splitlines() if l.startswith("Activation recomputation"))
    _, epoch = run_setup.build_training_data(mt.parse_args(_tiny(tasks_dir)))
    over = sum(t > 200 for t in epoch.computed_tokens(0))
    assert f"batches over 200 computed tokens (given): {over} of epoch 0's 18 batches" in line and 0 < over < 18
    result = json.loads(out.read_text())
    assert result["checkpoint_above"] == 200 and result["settings"]["checkpoint_long_batches"] == 200
    auto = _run(*_tiny(tasks_dir, "--num-batches", "3", "--warmup", "0", "--json", str(out)))
    assert auto.returncode == 0 and "recomputation" not in auto.stdout
    assert json.loads(out.read_text())["checkpoint_above"] is None


def _rows(epoch_seconds: float, batches: int, time_budget: float | None = None, **more):
    import run_budget
    costs = run_budget.RunCosts(startup_seconds=30, epoch_seconds=epoch_seconds, batches_per_epoch=batches,
                                eval_pass_seconds=more.get("eval", 60.0), checkpoint_seconds=3, final_save_seconds=2,
                                expected_error=0.05)
    return run_budget.recommendations(costs, run_budget.Schedule(batches), time_budget_seconds=time_budget)


def test_next_command_is_the_time_budget_row(tasks_dir):
    from throughput_report import speed_tier
    args = mt.parse_args(_tiny(tasks_dir, "--time-budget", "2h", "--json", "r.json"))
    command, why = mt.next_command(args, _rows(1500.0, 3232, 7200), speed_tier(1500.0), launcher=[".venv/bin/python"])
    # 4 epochs of training alone (1.67 h) fit 2 h; with evaluation, saves and start-up (1.76 h) + 10%, still 4
    assert command.startswith(".venv/bin/python trainloop_gpu_finetuned.py --epochs 4 ")
    assert "fits --time-budget 2h: 2 hours -> 4 epochs (~1.76 h: training 1.67 h, evaluation 0.07 h" in why
    assert "--epochs auto --time-budget 2h --throughput-json r.json" in why
    args = mt.parse_args(_tiny(tasks_dir, "--time-budget", "30m"))
    command, _ = mt.next_command(args, _rows(3 * 3600.0, 1000, 1800), speed_tier(3 * 3600.0))
    assert "--epochs 1 --max-batches 142 " in command   # (1800 / 1.10 - 95 s of the rest) / 10.8 s per batch
    args = mt.parse_args(_tiny(tasks_dir, "--time-budget", "1m"))
    command, why = mt.next_command(args, _rows(3 * 3600.0, 1000, 60), speed_tier(3 * 3600.0))
    assert command == "" and "too short: the smallest run needs" in why


def test_without_a_budget_the_next_command_says_which_row_and_why(tasks_dir):
    from throughput_report import speed_tier
    args = mt.parse_args(_tiny(tasks_dir))
    command, why = mt.next_command(args, _rows(3 * 3600.0, 1000), speed_tier(3 * 3600.0))
    assert " --epochs 1 " in command and "--max-batches" not in command
    assert why.startswith("the shortest budget in the table that trains a whole epoch: 4 hours -> 1 epoch")
    assert "pass --time-budget" in why
    command, why = mt.next_command(args, _rows(20 * 3600.0, 1000), speed_tier(20 * 3600.0))
    assert "--max-batches" in command and why.startswith("the longest budget in the table (none of them holds")


def test_the_next_command_runs_the_python_that_ran_the_benchmark(monkeypatch, tmp_path):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    assert mt.python_launcher(["python"]) == [os.path.join(".venv", "bin", "python")]
    assert mt.python_launcher(["torchrun", "--nproc_per_node", "2"]) == ["torchrun", "--nproc_per_node", "2"]
    monkeypatch.setattr(sys, "executable", "/opt/elsewhere/bin/python3.11")
    assert mt.python_launcher(["python"]) == ["/opt/elsewhere/bin/python3.11"]


def test_next_command_fine_tunes_the_pretrained_model_after_a_random_init_benchmark(tasks_dir):
    from throughput_report import speed_tier
    args = mt.parse_args(["--random-init", "--model-name", "Qwen/Qwen2.5-0.5B", "--device", "cpu",
                          "--data", str(tasks_dir), "--max-length", "1024"])
    command, why = mt.next_command(args, _rows(600.0, 1000), speed_tier(600.0))
    assert "--random-init" not in command
    assert "--model-name Qwen/Qwen2.5-0.5B" in command and "--max-length 1024" in command
    assert "trains the pretrained Qwen/Qwen2.5-0.5B" in why


def test_out_of_memory_on_the_longest_batch_is_one_clear_error():
    shapes = [mt.report.BatchShape(1, 10, 10), mt.report.BatchShape(1, 50, 50)]
    chosen = []

    def step(batch):
        chosen.append(batch.input_ids.shape[1])
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    encoded = [SimpleNamespace(n=10), SimpleNamespace(n=50)]
    data = SimpleNamespace(batch_plan=lambda epoch: [[0], [1]], encoded=lambda epoch: encoded,
                           collate=lambda items: SimpleNamespace(
                               input_ids=torch.zeros(1, items[0].n), to=lambda device: SimpleNamespace(
                                   input_ids=torch.zeros(1, items[0].n))))
    setup = SimpleNamespace(data=data, epoch_shapes=shapes, plan_shapes=shapes, step=lambda b: step(b), device=torch.device("cpu"))
    with pytest.raises(UserError, match="out of memory on cpu.*--max-length.*--gradient-checkpointing"):
        mt.run_longest_batch(setup)
    assert chosen == [50]
