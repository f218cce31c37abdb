"""A planned run end to end on CPU: the benchmark plans the whole run for a budget, the trainer takes the plan with
--epochs auto, trains every planned epoch inside the budget and ends metrics.jsonl with the run's time, planned
beside measured. Both scripts run as processes, so start-up counts from process start as it does for a user."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainloop import write_tasks  # noqa: E402  (the synthetic recolouring family, fixed 3x3 grids)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(script: str, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _settings(data: Path) -> list[str]:
    return ["--model-name", "tiny", "--device", "cpu", "--data", str(data), "--batch-size", "4",
            "--eval-tasks", "0", "--save-every", "0"]


@pytest.mark.slow
def test_a_planned_run_trains_every_planned_epoch_inside_its_budget(tmp_path):
    data = write_tasks(tmp_path / "tasks.json", 16, 3, seed=0)   # 48 samples, 12 batches of 4
    budget = 40
    bench = _run("measure_throughput.py", *_settings(data), "--num-batches", "24", "--max-useful-epochs", "1000",
                 "--time-budget", f"{budget}s", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    row = next(r for r in result["recommendations"] if r["source"] == "--time-budget")
    assert row["budget_hours"] * 3600 == budget and row["epochs"] > 1
    assert sum(row["breakdown"].values()) == pytest.approx(row["planned_seconds"])
    assert row["planned_seconds"] * (1 + row["margin"]) <= budget
    assert row["breakdown"]["evaluation"] == 0 and row["counts"]["evaluations"] == 0
    assert f"--epochs auto --time-budget {budget}s --throughput-json" in bench.stdout

    train = _run("trainloop_gpu_finetuned.py", *_settings(data), "--epochs", "auto", "--time-budget", f"{budget}s",
                 "--throughput-json", str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    run = lines[-1]
    assert run["kind"] == "run" and [line["kind"] for line in lines].count("run") == 1
    assert "Training finished" in train.stdout and "Stopped for the time budget" not in train.stdout, train.stdout[-1500:]
    assert len([line for line in lines if line["kind"] == "epoch"]) == row["epochs"]   # every planned epoch
    assert run["run_seconds"] < budget
    assert run["plan"]["planned_seconds"] == pytest.approx(row["planned_seconds"], abs=1e-3)
    assert run["counts"]["checkpoints"] == row["counts"]["checkpoints"] == row["epochs"]
    assert set(run["breakdown"]) == {"startup", "training", "evaluation", "checkpoints"}
    assert sum(run["breakdown"].values()) + run["other_seconds"] == pytest.approx(run["run_seconds"], abs=1e-2)
    assert "planned against measured:" in train.stdout and "whole run" in train.stdout


def test_budgets_too_short_for_any_run_are_refused_with_the_minimum(tmp_path):
    data = write_tasks(tmp_path / "tasks.json", 4, 3, seed=0)
    bench = _run("measure_throughput.py", *_settings(data)[:-4], "--num-batches", "4", "--warmup", "1",
                 "--time-budget", "2s", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert bench.returncode == 2
    assert "--time-budget 2 seconds is shorter than the smallest run" in bench.stderr
    assert "one evaluation" in bench.stderr and "give at least --time-budget" in bench.stderr
    assert "2 seconds        -> too short: the smallest run needs" in bench.stdout
    unitless = _run("measure_throughput.py", *_settings(data), "--time-budget", "2", cwd=tmp_path)
    assert unitless.returncode == 2 and "needs a unit: write e.g. 2s, 2m or 2h" in unitless.stderr
