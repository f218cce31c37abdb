"""Both scripts under `torchrun --nproc_per_node 2` on CPU (gloo), with the tiny model.

The trainer: two processes train the same thing as one process with twice the gradient accumulation (loss for
loss), the processes together train every sample of each epoch once, rank 0 alone writes the outputs, a
checkpoint resumes exactly under torchrun, and Ctrl-C stops both processes with a checkpoint. The benchmark:
the JSON records world size 2 and per-process batches. Each torchrun start costs ~4 s on this machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpointing
import run_monitor
import run_plan
import trainloop_gpu_finetuned as trainloop
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MAPPING = np.array([3, 7, 1, 9, 0, 2, 8, 5, 4, 6])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
       "PYTHONUNBUFFERED": "1"}


def write_tasks(path: Path, n_tasks: int, seed: int = 0) -> Path:
    """n_tasks tasks of 3 train pairs (3 leave-one-out samples each) that recolour 3x3 grids."""
    rng = np.random.default_rng(seed)
    tasks = {}
    for t in range(n_tasks):
        grids = rng.integers(0, 10, size=(4, 3, 3))
        pairs = [{"input": g.tolist(), "output": MAPPING[g].tolist()} for g in grids]
        tasks[f"t{t:03d}"] = {"train": pairs[:-1], "test": pairs[-1:]}
    path.write_text(json.dumps(tasks))
    return path


def torchrun(script: str, *flags: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / script), *flags]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-name", "tiny", "--device", "cpu", "--data", str(data), "--output-dir", str(out),
            "--eval-tasks", "0", "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", *extra]


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in run_monitor.read_metrics(run / run_plan.METRICS_FILE) if r["kind"] == kind]


def losses(run: Path, after_step: int = 0) -> list[float]:
    """step, loss, step, loss, ... of the step lines after `after_step` (a flat list for pytest.approx)."""
    return [value for r in records(run, "step") if r["step"] > after_step for value in (r["step"], r["loss"])]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """6 tasks = 18 samples = 18 batches per epoch: 9 per process. --grad-accum 2 on each process makes an
    optimizer step of 4 batches, so epoch 0 ends between the two batches of step 5 (gradients pending).
    Evaluation (the untrained model writes no grid, which keeps it quick) runs after each epoch. Every batch
    recomputes its activations in the backward pass (the one-process runs do not): gradients must not change."""
    folder = tmp_path_factory.mktemp("torchrun")
    data = write_tasks(folder / "tasks.json", 6)
    run = torchrun("trainloop_gpu_finetuned.py",
                   *tiny(data, folder / "two", "--epochs", "2", "--grad-accum", "2", "--save-every", "3",
                         "--keep-checkpoints", "10", "--eval-tasks", "5", "--checkpoint-long-batches", "1"),
                   cwd=folder)
    return folder, data, run


def test_two_processes_train_like_one_with_twice_the_accumulation(two_process_run):
    folder, data, run = two_process_run
    assert run.returncode == 0, run.stderr[-3000:]
    # One process, --grad-accum 4: the same 4 batches per optimizer step (round-robin sharding).
    assert trainloop.main(tiny(data, folder / "one", "--epochs", "2", "--grad-accum", "4")) == 0
    two, one = losses(folder / "two"), losses(folder / "one")
    assert two[::2] == list(range(1, 10))
    assert two == pytest.approx(one, rel=1e-5)
    assert [r["loss"] for r in records(folder / "two", "epoch")] == pytest.approx(
        [r["loss"] for r in records(folder / "one", "epoch")], rel=1e-5)


def test_rank_zero_alone_writes_and_the_ranks_share_each_epoch(two_process_run):
    folder, _, run = two_process_run
    out = run.stdout
    assert out.count("Training finished: 2 of 2 epochs, 9 steps") == 1   # printed by rank 0 only
    assert "distributed: 2 processes (torchrun, gloo" in out and "18 batches take 9 per process" in out
    assert "activation recomputation: batches over 1 computed tokens (given): 18 of epoch 0's 18 batches" in out
    epochs = records(folder / "two", "epoch")
    # metrics.jsonl has each line once; every one of the 18 samples trained once per epoch, none twice
    assert [(r["epoch"], r["batches"], r["world_size"]) for r in epochs] == [(0, 9, 2), (1, 9, 2)]
    assert [(r["samples"], r["samples_repeated"]) for r in epochs] == [(18, 0), (18, 0)]
    # evaluation split 3 + 2 tasks over the ranks, gathered into one result
    assert [(r["eval_tasks"], r["eval_inputs"]) for r in epochs] == [(5, 5), (5, 5)]
    assert [r["step"] for r in records(folder / "two", "step")] == list(range(1, 10))
    meta = checkpointing.read_meta(checkpointing.latest_checkpoint(folder / "two" / "checkpoints"))
    assert meta["world_size"] == 2
    assert (folder / "two" / "model" / "config.json").is_file()
    assert (folder / "two" / run_plan.PLOT_FILE).is_file()


def test_checkpoints_resume_exactly_under_torchrun(two_process_run):
    """From the end of epoch 0 (step 4 + one batch of step 5 pending: the ranks' mean gradient is saved) and
    from the middle of epoch 1 (step 6): the rest of the run matches the uninterrupted one."""
    folder, _, _ = two_process_run
    whole = folder / "two"
    epoch_end = torchrun("trainloop_gpu_finetuned.py", "--resume", str(whole / "checkpoints" / "step-00000004"),
                         "--model-name", "tiny", "--output-dir", str(folder / "from_epoch"), cwd=folder)
    assert epoch_end.returncode == 0, epoch_end.stderr[-3000:]
    assert "resumed from" in epoch_end.stdout
    assert losses(folder / "from_epoch", 4) == pytest.approx(losses(whole, 4), rel=1e-5)
    # the epoch line of epoch 1 (loss sums and samples carried over the resume) matches too
    middle = torchrun("trainloop_gpu_finetuned.py", "--resume", str(whole / "checkpoints" / "step-00000006"),
                      "--model-name", "tiny", "--output-dir", str(folder / "from_middle"), cwd=folder)
    assert middle.returncode == 0, middle.stderr[-3000:]
    assert losses(folder / "from_middle", 6) == pytest.approx(losses(whole, 6), rel=1e-5)
    resumed, expected = records(folder / "from_middle", "epoch")[-1], records(whole, "epoch")[-1]
    assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert (resumed["samples"], resumed["samples_repeated"]) == (18, 0)


def test_resume_with_another_number_of_processes_is_refused(two_process_run, capsys):
    folder, _, _ = two_process_run
    with pytest.raises(UserError, match="trained by 2 processes.*torchrun --nproc_per_node 2"):
        trainloop.main(["--resume", str(folder / "two"), "--model-name", "tiny", "--output-dir", str(folder / "other")])


def test_ctrl_c_stops_both_processes_with_a_checkpoint(tmp_path):
    data = write_tasks(tmp_path / "tasks.json", 40)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "trainloop_gpu_finetuned.py"),
               *tiny(data, tmp_path / "run", "--epochs", "200", "--log-every", "20")]
    # A new session, so the signal goes to torchrun and both workers, as a terminal's Ctrl-C does.
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(records(tmp_path / "run", "step")) < 2:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert out.count("Interrupted (SIGINT)") == 1, err[-3000:]
    assert f"resume with  torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py --resume {tmp_path / 'run'}" in out
    assert err.count("SIGINT: stopping") == 1            # rank 0 says it; both stop
    state, meta = checkpointing.load_checkpoint(checkpointing.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert meta["world_size"] == 2 and meta["step"] == state["loop"]["step"] >= 20
    assert meta["step"] < 200 * 60                       # it stopped long before the end


def test_benchmark_under_torchrun_records_world_size_and_per_process_batches(tmp_path):
    data = write_tasks(tmp_path / "tasks.json", 6)
    result_path = tmp_path / "r.json"
    run = torchrun("measure_throughput.py", "--model-name", "tiny", "--device", "cpu", "--data", str(data),
                   "--num-batches", "6", "--warmup", "1", "--json", str(result_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["world_size"] == result["settings"]["world_size"] == 2
    assert (result["batches_per_epoch"], result["plan_batches_per_epoch"]) == (9, 18)
    assert result["settings"]["cpu_threads"] == 1
    assert run.stdout.count("Per-Batch Time Statistics") == 1          # rank 0 prints
    assert "Processes: 2 (torchrun, gloo)" in run.stdout
    assert result["next_command"].startswith("torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py ")
