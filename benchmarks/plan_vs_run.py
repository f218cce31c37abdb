"""Does the run land on its plan? The benchmark plans a whole run for a budget, the trainer runs it with --epochs
auto, and this prints planned against measured (whole run and each part), the epochs trained, and whether the
budget stop fired.

Evaluation is a real share of the run here (--eval-tasks 100). The plan decodes each evaluation answer to its
known length, as a trained model writes it; an untrained model stops elsewhere. So the run fine-tunes a tiny
model that has already learnt the task family (pre-trained first, ~20 s), whose answers have the right length.

    .venv/bin/python benchmarks/plan_vs_run.py --budgets 2m 4m        # ~8 min on 2 CPU cores

The benchmark runs with its default 500 timed batches, as a user runs it, and once more right after each run:
on a shared machine the speed drifts over minutes, and the second benchmark shows by how much.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_trainloop import write_tasks  # noqa: E402  (the recolouring family on fixed 3x3 grids)


def run(script: str, *flags: str, cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"{script} failed ({out.returncode}): {out.stderr[-1500:]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["2m", "4m"])
    parser.add_argument("--qwen-random-init", action="store_true",
                        help="the Qwen2.5-0.5B architecture with random weights instead (--max-length 256, "
                             "batch size 1, 4 evaluation tasks, both cores; ~8 min for an 8m budget)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plan-vs-run-"))
    if args.qwen_random_init:
        # Random weights stop decoding wherever they happen to, not at the known answer's length the plan
        # decodes to: the evaluation part is a check of the decode cost model only where the lengths agree.
        data = write_tasks(work / "tasks.json", 30, 2, seed=5)
        held_out = write_tasks(work / "held_out.json", 4, 1, seed=2)
        settings = ["--random-init", "--device", "cpu", "--data", str(data), "--batch-size", "1",
                    "--max-length", "256", "--eval-data", str(held_out), "--eval-tasks", "4", "--save-every", "0"]
        return compare(args.budgets, settings, work, bench_flags=["--num-batches", "20"], threads=2)
    pretrain = work / "pretrain.json"
    pretrain.write_text(json.dumps({**json.loads(write_tasks(work / "a.json", 6000, 1, seed=1).read_text()),
                                    **json.loads(write_tasks(work / "b.json", 4000, 2, seed=3).read_text())}))
    run("trainloop_gpu_finetuned.py", "--model-name", "tiny", "--device", "cpu", "--data", str(pretrain),
        "--epochs", "1", "--max-batches", "1500", "--batch-size", "8", "--no-augment", "--lr", "3e-3",
        "--warmup-steps", "50", "--eval-tasks", "0", "--output-dir", str(work / "base"), cwd=work)
    data = write_tasks(work / "tasks.json", 300, 2, seed=5)
    held_out = write_tasks(work / "held_out.json", 100, 1, seed=2)
    settings = ["--model-name", str(work / "base" / "model"), "--device", "cpu", "--data", str(data),
                "--batch-size", "8", "--eval-data", str(held_out), "--eval-tasks", "100", "--save-every", "0"]
    return compare(args.budgets, settings, work)


def compare(budgets: list[str], settings: list[str], work: Path, bench_flags: tuple[str, ...] | list[str] = (),
            threads: int = 1) -> int:
    """For each budget: benchmark, run --epochs auto on its row, print planned against measured, benchmark again."""
    load = os.getloadavg()[0]
    for k, budget in enumerate(budgets):
        result = work / f"bench-{k}-{budget}.json"
        run("measure_throughput.py", *settings, *bench_flags, "--time-budget", budget, "--max-useful-epochs", "1000",
            "--json", str(result), cwd=work, threads=threads)
        before = json.loads(result.read_text())
        row = next(r for r in before["recommendations"] if r["source"] == "--time-budget")
        folder = work / f"run-{k}-{budget}"
        out = run("trainloop_gpu_finetuned.py", *settings, "--epochs", "auto", "--time-budget", budget,
                  "--throughput-json", str(result), "--output-dir", str(folder), cwd=work, threads=threads)
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        record, epochs = lines[-1], sum(line["kind"] == "epoch" for line in lines)
        planned, measured = row["planned_seconds"], record["run_seconds"]
        share = record["breakdown"]["evaluation"] / measured
        print(f"--time-budget {budget}: planned {planned:.1f} s ({row['epochs']} epochs, margin "
              f"{row['margin']:.0%}), measured {measured:.1f} s ({measured / planned - 1:+.1%}); epochs trained "
              f"{epochs} of {row['epochs']}; budget stop: {'yes' if 'Stopped for the time budget' in out.stdout else 'no'}; "
              f"evaluation {share:.0%} of the run")
        for part, seconds in record["breakdown"].items():
            plan = row["breakdown"][part]
            print(f"    {part:<12} planned {plan:7.1f} s, measured {seconds:7.1f} s"
                  + (f" ({seconds / plan - 1:+.1%})" if plan else ""))
        bench = before["run_costs"]
        print(f"    the benchmark's added measurements: {bench['added_share']:.1%} of its "
              f"{bench['benchmark_seconds']:.1f} s")
        # The host's own drift: the same benchmark again right after the run (a shared machine's speed moves
        # by several percent over minutes; no plan made before the run can see that).
        after = work / f"bench-{k}-{budget}-after.json"
        run("measure_throughput.py", *settings, *bench_flags, "--eval-tasks", "0", "--json", str(after), cwd=work,
            threads=threads)
        per_batch = [r["epoch_seconds"] / r["batches_per_epoch"] * 1000
                     for r in (before, json.loads(after.read_text()))]
        # the run's training part also prepares each later epoch (planned apart, as epoch_data_seconds)
        preparing = max(0, epochs - 1) * bench["epoch_data_seconds"]
        trained = (record["breakdown"]["training"] - preparing) / max(1, record["counts"]["batches"]) * 1000
        print(f"    ms per batch: benchmark before the run {per_batch[0]:.1f}, during the run {trained:.1f} "
              f"({trained / per_batch[0] - 1:+.1%}), benchmark after it {per_batch[1]:.1f} "
              f"({per_batch[1] / per_batch[0] - 1:+.1%}: the host's drift)")
    print(f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
