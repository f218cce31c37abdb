"""Does per-task test-time training (TTT) on a held-out task's own demonstrations raise its pass@2?

Task family ("fill"): each task has a hidden rule that only its demonstrations show, drawn per task from
  * an output side s in {1, 2, 3} (the output is an s x s grid), and
  * an output colour rule: the query's own colour ("query"), a colour fixed for the task ("task", shown only
    in the demonstration outputs), or the background 0 ("background").
Inputs are 3x3 grids of 0 and one colour a drawn per pair; 2-4 train pairs (held-out tasks: 3), one test pair.
The rule is invariant under every view inference and training use (rotations/flips, colour permutations
keeping 0, demonstration order), so each view of a task is again a task of the family, and TTT on augmented
copies of a task's demonstrations teaches the same rule the test input needs. The tiny model reads these
rules from the demonstrations only partly: its dev greedy accuracy wanders between ~0.5 and ~0.9 for
thousands of steps at lr 3e-3 (measured here), so the base model is genuinely unsure and voting has room.

The measurement (one command, both seeds, settings fixed before the test set is seen):
1. Base: train the tiny 2-layer, hidden-64 Qwen2 from scratch with the project's training step
   (training.TrainStep, AdamW, batch 8, lr 3e-3, arc_dataset.TrainingData leave-one-out samples, augmented);
   greedy-evaluate the DEV tasks every --eval-every steps and stop once it reaches --target.
2. Tuning (first seed only, DEV tasks only): per-task TTT for every (steps, lr) in --grid; the setting with
   the best dev pass@2 (greedy + second view, then 8-view voted, as a tie-break) is fixed for all seeds.
3. Report (TEST tasks, never used for stopping or tuning), each seed:
   before      the base model;
   ttt         for each task a fresh copy trained `steps` steps on that task's own train pairs: leave-one-out
               samples, augmented as in training (arc_dataset.TrainingData, augment=True: D8 transform,
               colour permutation keeping 0, demonstration order, new draw each epoch); its test output is
               never seen;
   control     the same, but each copy trains on another (training-set) task's train pairs: the same steps,
               lr and augmentation, so what TTT adds beyond "more training" is the task's own demonstrations;
   more_training  one copy trained as many steps (same lr, batch 8) on the whole training set, then evaluated
               on all test tasks: whether the base model simply had not finished learning the family.
   Each row: greedy pass@1 (view 0), pass@2 greedy + second view (evaluate(..., attempts=2)), 8-view voted
   pass@2 (evaluate(..., views=8)); seconds per task for each evaluation and for the TTT itself.

CPU (1 thread; measured 12 minutes wall for three seeds at load average 3-4.5 on the 2-core machine; the load
average is printed and written):

    python benchmarks/voting_and_ttt.py --json voting_ttt.json
    python benchmarks/voting_and_ttt.py --seeds 0 --ttt-steps 32 --ttt-lr 1e-3   # fixed settings, no tuning
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arc_dataset import DataSettings, Task, TrainingData, training_samples  # noqa: E402
from evaluation import EvalResult, evaluate, merge_results  # noqa: E402
from model import ModelSettings, load_model  # noqa: E402
from training import FP32, TrainStep, build_optimizer, build_scheduler  # noqa: E402

# Generation prompts keep room for the largest answer (931 tokens, arc_dataset.encode_prompt), so a max_length
# under ~1100 silently drops the prompts to one demonstration.
EVAL_MAX_LENGTH = 2048
COLOUR_RULES = ("query", "task", "background")
CPU = torch.device("cpu")
DEFAULT_GRID = "8:1e-3,32:3e-4,32:1e-3,32:3e-3,96:3e-4,96:1e-3,192:1e-3"


def fill_tasks(n: int, seed: int, train_pairs: Sequence[int] = (3,), size: int = 3) -> list[Task]:
    """Tasks of the "fill" family (module docstring): per task an output side and a colour rule; the
    task id records both ("<rule>-<side>-...") so tests and reports can read the rule back."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n):
        side = int(rng.integers(1, 4))
        rule = COLOUR_RULES[int(rng.integers(len(COLOUR_RULES)))]
        task_colour = int(rng.integers(1, 10))
        pairs = []
        for _ in range(int(rng.choice(train_pairs)) + 1):
            a = int(rng.integers(1, 10))
            mask = rng.random((size, size)) < 0.5
            mask.flat[rng.integers(size * size)] = True   # at least one cell of colour a
            grid = np.where(mask, a, 0).astype(np.uint8)
            colour = {"query": a, "task": task_colour, "background": 0}[rule]
            out = np.full((side, side), colour, dtype=np.uint8)
            grid.setflags(write=False)
            out.setflags(write=False)
            pairs.append((grid, out))
        tasks.append(Task(f"{rule}-{side}-s{seed}t{t:05d}", pairs[:-1], pairs[-1:]))
    return tasks


def train(model: torch.nn.Module, tasks: list[Task], steps: int, lr: float, seed: int,
          check: Callable[[int], bool] | None = None, check_every: int = 0,
          warmup: int = 50) -> tuple[int, float]:
    """TrainStep over augmented leave-one-out samples of `tasks` (arc_dataset.TrainingData: a random
    rotation/flip, colour permutation keeping 0 and demonstration order per sample and epoch), batch 8, for
    `steps` steps; `check(step)` every `check_every` steps may end training by returning True.
    Returns (steps done, seconds)."""
    data = TrainingData(training_samples(tasks), DataSettings(max_length=512, batch_size=8, augment=True, seed=seed))
    optimizer = build_optimizer(model, lr)
    scheduler = build_scheduler(optimizer, steps, warmup_steps=min(warmup, steps // 10), min_lr_ratio=1.0)
    step_fn = TrainStep(model, optimizer, scheduler, FP32, CPU)
    done, start, epoch = 0, time.perf_counter(), 0
    while done < steps:
        for batch in data.batches(epoch):
            step_fn(batch)
            done += 1
            if check is not None and check_every and done % check_every == 0 and check(done):
                return done, time.perf_counter() - start
            if done >= steps:
                break
        epoch += 1
    return done, time.perf_counter() - start


@dataclass(frozen=True)
class Scores:
    """One model (or one set of per-task copies) on one set of tasks; fractions of test inputs (one per task)."""
    greedy_pass1: float
    greedy_view_pass2: float     # view 0, then view 1 (a fixed augmented view) for wrong first answers
    voted_pass2: float           # the two best-ranked grids over `views` views
    views: int
    tasks: int
    malformed: int
    eval_seconds_per_task: float      # both evaluations together
    ttt_seconds_per_task: float = 0.0
    scoring_share: float = 0.0           # of the voted evaluation's seconds, spent scoring candidates (evaluation.py)
    solved_voted: tuple[str, ...] = ()   # ids of the tasks the voted pass@2 solves (paired comparisons)


def evaluations(model: torch.nn.Module, tasks: list[Task], views: int, seed: int) -> tuple[EvalResult, EvalResult]:
    """(greedy with a second-view attempt, `views`-view voted) on `tasks`."""
    kwargs = dict(max_length=EVAL_MAX_LENGTH, precision=FP32, device=CPU, seed=seed)
    return (evaluate(model, tasks, attempts=2, **kwargs),
            evaluate(model, tasks, views=views, batch_size=max(8, views), **kwargs))


def scores(greedy: EvalResult, voted: EvalResult, ttt_seconds: float = 0.0) -> Scores:
    n = max(1, greedy.num_tasks)
    return Scores(round(greedy.first_attempt_accuracy, 4), round(greedy.accuracy, 4), round(voted.voted_accuracy, 4),
                  voted.views, greedy.num_tasks, greedy.malformed + voted.malformed,
                  round((greedy.seconds + voted.seconds) / n, 4), round(ttt_seconds / n, 4),
                  round(voted.scoring_seconds / voted.seconds, 3) if voted.seconds else 0.0,
                  tuple(sorted(t for t, ok in voted.solved_voted.items() if ok)))


def per_task_training(model: torch.nn.Module, tasks: list[Task], sources: list[Task], steps: int, lr: float,
                      views: int, seed: int) -> Scores:
    """For each task: a fresh copy of `model` trained `steps` steps on its source task's augmented
    leave-one-out samples (the task itself: TTT; another task: the control), then evaluated on the task.
    Training draws its augmentations from seed + 1; evaluation uses `seed`'s views, as the base model's does."""
    greedy, voted, seconds = [], [], 0.0
    for task, source in zip(tasks, sources):
        tuned = copy.deepcopy(model)
        seconds += train(tuned, [source], steps, lr, seed + 1, warmup=0)[1]
        g, v = evaluations(tuned, [task], views, seed)
        greedy.append(g)
        voted.append(v)
    merged = [merge_results(parts) for parts in (greedy, voted)]
    for m, parts in zip(merged, (greedy, voted)):
        m.seconds = sum(p.seconds for p in parts)    # one after another, not shards side by side
    return scores(*merged, ttt_seconds=seconds)


def tune(model: torch.nn.Module, dev: list[Task], grid: list[tuple[int, float]], views: int,
         seed: int) -> tuple[tuple[int, float], list[dict[str, Any]]]:
    """Per-task TTT on the DEV tasks for every (steps, lr); the best by pass@2 (greedy + view), then voted."""
    rows = []
    for steps, lr in grid:
        s = per_task_training(model, dev, dev, steps, lr, views, seed)
        rows.append({"steps": steps, "lr": lr, **asdict(s)})
        print(f"  tune steps {steps:>3} lr {lr:.0e}: dev pass@1 {s.greedy_pass1:.3f} pass@2 {s.greedy_view_pass2:.3f} "
              f"voted {s.voted_pass2:.3f}", file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: (r["greedy_view_pass2"], r["voted_pass2"]))
    return (best["steps"], best["lr"]), rows


def base_model(train_tasks: list[Task], dev: list[Task], seed: int, target: float, max_steps: int,
               eval_every: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny model trained from scratch until its dev greedy accuracy reaches `target`."""
    torch.manual_seed(seed)
    model = load_model(ModelSettings("tiny"))
    trace: list[dict[str, Any]] = []

    def check(step: int) -> bool:
        accuracy = evaluate(model, dev, max_length=EVAL_MAX_LENGTH, precision=FP32, device=CPU).accuracy
        trace.append({"step": step, "dev_greedy": accuracy})
        return accuracy >= target

    steps, seconds = train(model, train_tasks, max_steps, 3e-3, seed, check, eval_every)
    return model, {"steps": steps, "seconds": round(seconds, 1), "dev_trace": trace}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def parse_grid(text: str) -> list[tuple[int, float]]:
    """"16:1e-3,48:3e-3" -> [(16, 0.001), (48, 0.003)]."""
    out = []
    for item in text.split(","):
        steps, lr = item.split(":")
        out.append((int(steps), float(lr)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tasks", type=int, default=3000, help="training tasks of the family (default 3000)")
    parser.add_argument("--dev-tasks", type=int, default=40,
                        help="DEV tasks: decide when base training stops and tune TTT (default 40)")
    parser.add_argument("--test-tasks", type=int, default=60, help="TEST tasks: the reported ones (default 60)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--max-steps", type=int, default=4000, help="base training steps at most (default 4000)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between dev evaluations (default 25)")
    parser.add_argument("--target", type=float, default=0.5,
                        help="stop base training once dev greedy accuracy reaches this (default 0.5)")
    parser.add_argument("--views", type=int, default=8, help="views for the voted evaluation (default 8)")
    parser.add_argument("--grid", type=parse_grid, default=parse_grid(DEFAULT_GRID),
                        help=f"TTT settings tried on the dev tasks, steps:lr,... (default {DEFAULT_GRID})")
    parser.add_argument("--ttt-steps", type=int, default=None, help="fix the TTT steps (skips tuning; with --ttt-lr)")
    parser.add_argument("--ttt-lr", type=float, default=None, help="fix the TTT learning rate (with --ttt-steps)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    problems = []
    if (args.ttt_steps is None) != (args.ttt_lr is None):
        problems.append("give --ttt-steps and --ttt-lr together (or neither, to tune on the dev tasks)")
    if min(args.dev_tasks, args.test_tasks, args.train_tasks) < 1:
        problems.append("--train-tasks, --dev-tasks and --test-tasks must be at least 1")
    if args.test_tasks > args.train_tasks:
        problems.append("--train-tasks must be at least --test-tasks (the control trains on training tasks)")
    if problems:
        parser.error("; ".join(problems))
    return args


STAGES = ("before", "ttt", "control", "more_training")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    loads = {"start": load_average()}
    report: dict[str, Any] = {"family": "fill: per-task output side (1-3) and colour rule (query/task/background)",
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "seeds": {}}
    chosen = None if args.ttt_steps is None else (args.ttt_steps, args.ttt_lr)
    for seed in args.seeds:
        # Training tasks have 2-4 train pairs (leave-one-out: 1-3 demonstrations), held-out ones 3 (their TTT
        # samples carry 2, their test prompts 3), so every prompt length was trained on.
        train_tasks = fill_tasks(args.train_tasks, seed=1000 + seed, train_pairs=(2, 3, 4))
        dev = fill_tasks(args.dev_tasks, seed=2000 + seed)
        test = fill_tasks(args.test_tasks, seed=3000 + seed)
        model, base = base_model(train_tasks, dev, seed, args.target, args.max_steps, args.eval_every)
        print(f"seed {seed}: base trained {base['steps']} steps in {base['seconds']:.0f} s, dev greedy "
              f"{base['dev_trace'][-1]['dev_greedy']:.2f}", file=sys.stderr, flush=True)
        out: dict[str, Any] = {"base": base}
        if chosen is None:
            out["dev_before"] = asdict(scores(*evaluations(model, dev, args.views, seed)))
            chosen, out["tuning"] = tune(model, dev, args.grid, args.views, seed)
            print(f"  chosen on dev: {chosen[0]} steps, lr {chosen[1]:g}", file=sys.stderr, flush=True)
        steps, lr = chosen
        out["ttt_steps"], out["ttt_lr"] = steps, lr
        out["before"] = asdict(scores(*evaluations(model, test, args.views, seed)))
        out["ttt"] = asdict(per_task_training(model, test, test, steps, lr, args.views, seed))
        out["control"] = asdict(per_task_training(model, test, train_tasks[:len(test)], steps, lr, args.views,
                                                  seed))
        more = copy.deepcopy(model)
        more_seconds = train(more, train_tasks, steps, lr, seed + 1, warmup=0)[1]
        out["more_training"] = asdict(scores(*evaluations(more, test, args.views, seed), ttt_seconds=more_seconds))
        report["seeds"][str(seed)] = out
    loads["end"] = load_average()
    report["load_average_1_5_15min"] = loads
    report["cpu_threads"] = torch.get_num_threads()
    print(f"TEST tasks: {args.test_tasks} per seed; TTT {chosen[0]} steps, lr {chosen[1]:g}; load average {loads}")
    print(f"{'seed  model':<18} {'pass@1 greedy':>14} {'pass@2 g+view':>14} {'pass@2 voted':>13} "
          f"{'eval s/task':>12} {'TTT s/task':>11} {'voted +/- vs before':>20}")
    for seed, out in report["seeds"].items():
        for stage in STAGES:
            r = out[stage]
            now, then = set(r["solved_voted"]), set(out["before"]["solved_voted"])
            print(f"{seed:<5} {stage:<12} {r['greedy_pass1']:>14.3f} {r['greedy_view_pass2']:>14.3f} "
                  f"{r['voted_pass2']:>13.3f} {r['eval_seconds_per_task']:>12.4f} {r['ttt_seconds_per_task']:>11.4f} "
                  f"{f'+{len(now - then)} -{len(then - now)}':>20}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
