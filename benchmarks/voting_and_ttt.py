"""Does voting over augmented views, and test-time training, solve more held-out tasks than greedy decoding?

A synthetic task family whose rule differs per task and must be read from the demonstrations: each task
recolours one colour `a` of a 3x3 grid (cells 0 or a) into another colour `b`, both drawn per task from 1-9;
three train pairs (training tasks: three or four), one test pair. The query shows `a`; only the demonstrations
show `b`. Every view of such a task (rotation/flip, colour permutation keeping 0) is again a task of the family,
so voting is fair.

1. Train the tiny 2-layer, hidden-64 Qwen2 from scratch with the project's own training step
   (training.TrainStep, AdamW, batch 8, lr 3e-3, augmented leave-one-out samples) and greedy-evaluate a
   dev set of tasks every --eval-every steps; stop once the dev set's greedy accuracy reaches --target
   (part-way: neither 0% nor 100%).
2. On held-out tasks, decode greedily (1 view) and with --views views voted: pass@2 and seconds per task.
3. Test-time training: a copy of that model trained --ttt-steps steps on the held-out tasks' own train pairs
   (leave-one-out, augmented; their test outputs are never seen), then the same evaluations again.
4. Control: another copy trained as many steps on the training tasks instead, so the table shows what the
   held-out tasks' own demonstrations add beyond training longer.

CPU, a few minutes (1 thread; the machine's load is printed, as other processes change the timings):

    python benchmarks/voting_and_ttt.py --json voting_ttt.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arc_dataset import (Augmentation, DataSettings, Task, TrainingData, evaluation_samples,  # noqa: E402
                         training_samples)
from evaluation import EvalResult, evaluate, merge_results  # noqa: E402
from model import ModelSettings, load_model  # noqa: E402
from training import FP32, TrainStep, build_optimizer, build_scheduler  # noqa: E402
from views import task_views  # noqa: E402

# Generation prompts keep room for the largest answer (931 tokens, arc_dataset.encode_prompt), so a max_length
# under ~1100 silently drops the prompts to one demonstration: a first run of this script at 512 evaluated
# 1-demonstration prompts of a model trained on 2-3.
EVAL_MAX_LENGTH = 2048


def recolour_tasks(n: int, seed: int, train_pairs: tuple[int, ...] = (3,), size: int = 3) -> list[Task]:
    """Tasks recolouring colour a (the only non-zero colour of the input) into b, (a, b) per task, with a
    number of train pairs drawn from `train_pairs`."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n):
        a, b = (int(c) for c in rng.choice(np.arange(1, 10), size=2, replace=False))
        pairs = []
        for _ in range(int(rng.choice(train_pairs)) + 1):
            mask = rng.random((size, size)) < 0.5
            mask.flat[rng.integers(size * size)] = True   # at least one cell of colour a
            grid = np.where(mask, a, 0).astype(np.uint8)
            out = np.where(mask, b, 0).astype(np.uint8)
            grid.setflags(write=False)
            out.setflags(write=False)
            pairs.append((grid, out))
        tasks.append(Task(f"s{seed}t{t:05d}", pairs[:-1], pairs[-1:]))
    return tasks


def view_copies(task: Task, mode: str, views: int, seed: int) -> list[Task]:
    """The task's train pairs under each of the 8 rotations/flips with its own colours ("keep": test-time
    training that may learn the task's colours), or under the very views inference decodes ("views":
    views.task_views of its test input, colour permutations included)."""
    if mode == "keep":
        chosen = [Augmentation(transform) for transform in range(8)]
    else:
        chosen = task_views(evaluation_samples([task])[0], views, seed)
    copies = []
    for transform, view in enumerate(chosen):
        copies.append(Task(f"{task.task_id}/{transform}", [(view.apply(i), view.apply(o)) for i, o in task.train],
                           []))
    return copies


def train(model: torch.nn.Module, tasks: list[Task], steps: int, lr: float, seed: int,
          check=None, check_every: int = 0, augment: bool = True) -> tuple[int, float, list[dict[str, Any]]]:
    """TrainStep over leave-one-out samples of `tasks` (augmented: a random rotation/flip, colour permutation
    and demonstration order per sample and epoch) for up to `steps` steps (batch 8); `check(step)` every
    `check_every` steps may end training by returning True."""
    data = TrainingData(training_samples(tasks), DataSettings(max_length=512, batch_size=8, augment=augment, seed=seed))
    optimizer = build_optimizer(model, lr)
    scheduler = build_scheduler(optimizer, steps, warmup_steps=min(50, steps // 10), min_lr_ratio=1.0)
    step_fn = TrainStep(model, optimizer, scheduler, FP32, torch.device("cpu"))
    done, log, start, epoch = 0, [], time.perf_counter(), 0
    while done < steps:
        for batch in data.batches(epoch):
            out = step_fn(batch)
            done += 1
            if done % 100 == 0:
                log.append({"step": done, "loss": round(float(out.loss), 4)})  # host read: every 100 steps
            if check is not None and check_every and done % check_every == 0 and check(done):
                return done, time.perf_counter() - start, log
            if done >= steps:
                break
        epoch += 1
    return done, time.perf_counter() - start, log


KINDS = (("greedy", 1, "votes"), ("voted", None, "votes"), ("product", None, "product"))


def run_eval(model: torch.nn.Module, tasks: list[Task], views: int, seed: int, score: str = "votes") -> EvalResult:
    return evaluate(model, tasks, max_length=EVAL_MAX_LENGTH, precision=FP32, device=torch.device("cpu"), views=views,
                    seed=seed, batch_size=max(8, views), score=score)


def measure(model: torch.nn.Module, tasks: list[Task], views: int, seed: int, score: str = "votes") -> dict[str, Any]:
    return summarize(run_eval(model, tasks, views, seed, score), views, score)


def summarize(result: EvalResult, views: int, score: str) -> dict[str, Any]:
    return {"views": views, "score": score, "greedy_pass1": result.first_attempt_accuracy,
            "voted_pass2": result.voted_accuracy, "tasks_solved_voted": result.solved_voted_tasks,
            "tasks": result.num_tasks, "malformed": result.malformed, "scored_inputs": result.scored_inputs,
            "scoring_share": round(result.scoring_seconds / result.seconds, 3) if result.seconds else 0.0,
            "seconds_per_task": round(result.seconds / max(1, result.num_tasks), 4)}


def measure_all(model: torch.nn.Module, tasks: list[Task], views: int, seed: int) -> dict[str, Any]:
    return {kind: measure(model, tasks, k or views, seed, score) for kind, k, score in KINDS}


def per_task_training(model: torch.nn.Module, tasks: list[Task], sources: list[Task], steps: int, lr: float,
                      views: int, seed: int, colours: str) -> tuple[dict[str, Any], float]:
    """For each task: a fresh copy of `model` trained `steps` steps on the leave-one-out samples of its
    source task (itself: test-time training; another task: the control), then evaluated on the task alone.
    Returns the evaluations summed over the tasks, and the training seconds."""
    parts: dict[str, list[EvalResult]] = {kind: [] for kind, _, _ in KINDS}
    seconds = 0.0
    for task, source in zip(tasks, sources):
        tuned = copy.deepcopy(model)
        if colours != "permute":
            seconds += train(tuned, view_copies(source, colours, views, seed), steps, lr, seed, augment=False)[1]
        else:
            seconds += train(tuned, [source], steps, lr, seed)[1]
        for kind, k, score in KINDS:
            parts[kind].append(run_eval(tuned, [task], k or views, seed, score))
    out = {}
    for kind, k, score in KINDS:
        merged = merge_results(parts[kind])
        merged.seconds = sum(p.seconds for p in parts[kind])   # one after another, not shards side by side
        out[kind] = summarize(merged, k or views, score)
    return out, seconds


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tasks", type=int, default=3000, help="training tasks of the family")
    parser.add_argument("--dev-tasks", type=int, default=40, help="tasks that decide when to stop training")
    parser.add_argument("--held-out", type=int, default=60, help="tasks that are reported")
    parser.add_argument("--max-steps", type=int, default=8000, help="training steps at most")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="steps between dev evaluations (accuracy can jump from 20%% to 95%% within 100 steps)")
    parser.add_argument("--target", type=float, default=0.3, help="stop once dev greedy accuracy reaches this")
    parser.add_argument("--views", type=int, default=8, help="views for the voted evaluation")
    parser.add_argument("--ttt", choices=("per-task", "joint"), default="per-task",
                        help="test-time training: a copy per held-out task on its own train pairs (as Omni-ARC), "
                             "or one copy on all held-out tasks together")
    parser.add_argument("--ttt-steps", type=int, default=None,
                        help="test-time training steps (default: 30 per task, or 300 joint)")
    parser.add_argument("--ttt-lr", type=float, default=1e-3, help="test-time training learning rate")
    parser.add_argument("--ttt-colours", choices=("keep", "views", "permute"), default="keep",
                        help="per-task test-time training on the task's 8 rotations/flips with its own colours "
                             "(keep), on the views inference decodes (views), or with the training "
                             "augmentation's random colour permutations (permute)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control: as many steps on training tasks instead of the held-out ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    loads = {"start": load_average()}
    # Training tasks have 3 or 4 train pairs, so their leave-one-out samples carry 2 or 3 demonstrations; the
    # held-out tasks' test prompts carry 3 (all their train pairs). A model this small does not decode at
    # positions it never trained on (measured: trained on 2-demonstration samples only, every 3-demonstration
    # prompt decoded to a malformed grid).
    train_tasks = recolour_tasks(args.train_tasks, seed=1000 + args.seed, train_pairs=(3, 4))
    dev = recolour_tasks(args.dev_tasks, seed=2000 + args.seed)
    held_out = recolour_tasks(args.held_out, seed=3000 + args.seed)
    model = load_model(ModelSettings("tiny"))
    trace = []

    def check(step: int) -> bool:
        accuracy = evaluate(model, dev, max_length=EVAL_MAX_LENGTH, precision=FP32, device=torch.device("cpu")).accuracy
        trace.append({"step": step, "dev_greedy": accuracy})
        print(f"step {step}: dev greedy {accuracy:.2f}", file=sys.stderr, flush=True)
        return accuracy >= args.target

    steps, seconds, log = train(model, train_tasks, args.max_steps, 3e-3, args.seed, check, args.eval_every)
    loads["after_training"] = load_average()
    report: dict[str, Any] = {"family": "recolour a->b per task, 3x3, 3 train pairs", "train_steps": steps,
                              "train_seconds": round(seconds, 1), "dev_trace": trace, "loss_log": log}
    report["before_ttt"] = measure_all(model, held_out, args.views, args.seed)
    ttt_steps = args.ttt_steps or (30 if args.ttt == "per-task" else 300)
    stages = ["before_ttt", "after_ttt"]
    # The control asks whether a gain comes from the held-out tasks' own demonstrations or from training longer.
    if args.ttt == "per-task":
        colours = args.ttt_colours
        report["after_ttt"], ttt_seconds = per_task_training(model, held_out, held_out, ttt_steps, args.ttt_lr,
                                                             args.views, args.seed + 1, colours)
        if args.control:   # each copy trained as long on one training task instead
            report["control_more_training"], _ = per_task_training(model, held_out, train_tasks[:len(held_out)],
                                                                   ttt_steps, args.ttt_lr, args.views,
                                                                   args.seed + 1, colours)
    else:
        tuned = copy.deepcopy(model)
        _, ttt_seconds, _ = train(tuned, held_out, ttt_steps, args.ttt_lr, args.seed + 1)
        report["after_ttt"] = measure_all(tuned, held_out, args.views, args.seed)
        if args.control:   # as many steps on the training tasks instead
            control = copy.deepcopy(model)
            train(control, train_tasks, ttt_steps, args.ttt_lr, args.seed + 2)
            report["control_more_training"] = measure_all(control, held_out, args.views, args.seed)
    if args.control:
        stages.append("control_more_training")
    report.update(ttt=args.ttt, ttt_colours=args.ttt_colours, ttt_steps=ttt_steps, ttt_lr=args.ttt_lr,
                  ttt_seconds=round(ttt_seconds, 1))
    loads["end"] = load_average()
    report["load_average_1_5_15min"] = loads
    report["cpu_threads"] = torch.get_num_threads()
    print(f"trained {steps} steps in {seconds:.0f} s (dev greedy {trace[-1]['dev_greedy']:.2f}); "
          f"test-time training ({args.ttt}) {ttt_steps} steps in {ttt_seconds:.0f} s; load average {loads}")
    print(f"{'held-out ' + str(args.held_out) + ' tasks':<44} {'greedy pass@1':>14} {'voted pass@2':>13} "
          f"{'s/task':>8} {'scoring':>8}")
    for stage in stages:
        for kind in ("greedy", "voted", "product"):
            r = report[stage][kind]
            label = f"{stage.replace('_', ' ')}, {r['views']} view(s), {r['score']}"
            print(f"{label:<44} {r['greedy_pass1']:>14.3f} {r['voted_pass2']:>13.3f} {r['seconds_per_task']:>8.4f} "
                  f"{r['scoring_share']:>8.1%}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
