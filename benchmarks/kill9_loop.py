"""kill -9 the trainer at random moments, resume it each time, and check that nothing was lost.

A run with frequent checkpoints (--save-every) is started, SIGKILLed after a random delay, resumed with the
command it would print, killed again, ... N times, then resumed to the end. After every kill:
  * the newest checkpoint loads (checkpointing.load_checkpoint, weights_only);
  * every complete line of metrics.jsonl parses (a line cut by the kill is counted, not an error);
and at the end the run's step losses equal, bit for bit, those of the same run done without interruption.

    .venv/bin/python benchmarks/kill9_loop.py --kills 20 --seed 0          # ~2-4 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpointing  # noqa: E402

SCRIPT = ROOT / "trainloop_gpu_finetuned.py"
MAPPING = np.array([3, 7, 1, 9, 0, 2, 8, 5, 4, 6])


def write_tasks(path: Path, n_tasks: int, train_pairs: int, seed: int) -> Path:
    """Small ARC tasks whose outputs recolour the input (enough batches for a run of a minute or so)."""
    rng = np.random.default_rng(seed)
    tasks = {}
    for t in range(n_tasks):
        grids = rng.integers(0, 10, size=(train_pairs + 1, 3, 3))
        pairs = [{"input": g.tolist(), "output": MAPPING[g].tolist()} for g in grids]
        tasks[f"k{t:04d}"] = {"train": pairs[:-1], "test": pairs[-1:]}
    path.write_text(json.dumps(tasks))
    return path


def run_flags(data: Path, epochs: int) -> list[str]:
    return ["--model-name", "tiny", "--device", "cpu", "--data", str(data), "--epochs", str(epochs),
            "--eval-tasks", "0", "--log-every", "1", "--save-every", "3", "--keep-checkpoints", "2",
            "--warmup-steps", "2", "--lr", "3e-3"]


def metrics_lines(path: Path) -> tuple[list[dict], int]:
    """(parsed complete lines, lines that did not parse)."""
    if not path.is_file():
        return [], 0
    parsed, broken = [], 0
    for line in path.read_text().splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            broken += 1
    return parsed, broken


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_lines(run / "metrics.jsonl")[0] if r.get("kind") == "step"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--min-delay", type=float, default=2.0, help="seconds after start, at least")
    parser.add_argument("--max-delay", type=float, default=10.0, help="seconds after start, at most")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill9-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    data = write_tasks(work / "tasks.json", 24, 3, seed=args.seed)
    flags = run_flags(data, args.epochs)

    start = time.monotonic()
    reference = subprocess.run([sys.executable, str(SCRIPT), *flags, "--output-dir", str(work / "reference")],
                               cwd=work, env=env, capture_output=True, text=True)
    if reference.returncode != 0:
        print(reference.stderr[-2000:], file=sys.stderr)
        return 1
    reference_seconds = time.monotonic() - start
    expected = step_losses(work / "reference")

    run = work / "killed"
    problems: list[str] = []
    kills = broken_lines = no_checkpoint_yet = 0
    for attempt in range(args.kills):
        started = run.is_dir() and checkpointing.latest_checkpoint(run / "checkpoints") is not None
        argv = ([*flags, "--resume", str(run)] if started else [*flags, "--output-dir", str(run)])
        if not started and run.exists():
            shutil.rmtree(run)  # killed before its first checkpoint: start again, as a user would
        process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=work, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(args.min_delay, args.max_delay)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        else:
            if process.returncode != 0:
                problems.append(f"attempt {attempt}: exit {process.returncode}: {process.stderr.read()[-500:]}")
            break  # the run finished before the kill
        latest = checkpointing.latest_checkpoint(run / "checkpoints")
        if latest is None:
            no_checkpoint_yet += 1
        else:
            try:
                checkpointing.load_checkpoint(latest)
            except Exception as err:  # noqa: BLE001 - any failure to load is what this loop looks for
                problems.append(f"after kill {kills}: {latest} does not load: {err}")
        _, broken = metrics_lines(run / "metrics.jsonl")
        broken_lines += broken

    final = subprocess.run([sys.executable, str(SCRIPT), *flags, "--resume", str(run)], cwd=work, env=env,
                           capture_output=True, text=True)
    if final.returncode != 0:
        problems.append(f"final resume: exit {final.returncode}: {final.stderr[-800:]}")
    got = step_losses(run)
    mismatched = [step for step, loss in expected.items() if got.get(step) != loss]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")] \
        if (run / "checkpoints").is_dir() else []
    _, broken_at_end = metrics_lines(run / "metrics.jsonl")
    print(f"kills: {kills} (random delays {args.min_delay:g}-{args.max_delay:g} s, seed {args.seed}); "
          f"{no_checkpoint_yet} before the first checkpoint; uninterrupted run {reference_seconds:.1f} s")
    print(f"newest checkpoint loads after every kill: {not any('does not load' in p for p in problems)}")
    print(f"metrics.jsonl: {broken_lines} lines cut by a kill seen between kills, {broken_at_end} at the end; "
          f"{len(got)} step lines")
    print(f"resume bit-exact: {len(expected) - len(mismatched)} of {len(expected)} step losses identical"
          + (f" (first differing step {mismatched[0]}: {expected[mismatched[0]]!r} vs {got.get(mismatched[0])!r})"
             if mismatched else ""))
    print(f"temporary folders left: {leftovers or 'none'}")
    for problem in problems:
        print(f"problem: {problem}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if problems or mismatched or broken_at_end or leftovers else 0


if __name__ == "__main__":
    raise SystemExit(main())
