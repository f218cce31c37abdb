"""What measure_throughput.py and trainloop_gpu_finetuned.py build from the same flags.

The benchmark's projection is only right if it times exactly what the trainer runs, so the data pipeline
and the model / optimizer / training step are built here, once, for both scripts.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import distributed
from arc_dataset import DataError, DataSettings, TaskSet, TrainingData, load_tasks, training_samples
from model import ModelSettings, load_model
from training import Precision, TrainStep, build_optimizer, build_scheduler


def build_training_data(args: argparse.Namespace) -> tuple[TaskSet, TrainingData]:
    """The training tasks and the epoch pipeline (samples, augmentation, batches) the flags ask for."""
    tasks = load_tasks(args.data, args.solutions, args.strict)
    settings = DataSettings(max_length=args.max_length, batch_size=args.batch_size,
                            tokens_per_batch=args.tokens_per_batch, augment=args.augment, seed=args.seed)
    data = TrainingData(training_samples(tasks), settings)
    if data.num_batches(0) == 0:
        raise DataError(f"{tasks.description}: no training sample fits --max-length {args.max_length} "
                        f"even with one demonstration; raise --max-length")
    return tasks, data


@dataclass
class TrainingParts:
    """The model and everything that updates it; `step` runs the DDP-wrapped model under torchrun."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep


def build_training_step(args: argparse.Namespace, ctx: distributed.DistributedContext, precision: Precision,
                        total_steps: int) -> TrainingParts:
    """Model (seeded, on the context's device), AdamW, warm-up + cosine schedule over `total_steps`
    optimizer steps, and the one training step both scripts call."""
    torch.manual_seed(args.seed)  # random initialisation (tiny, --random-init) repeats with the seed
    model = load_model(ModelSettings.from_args(args)).to(ctx.device)
    model.train()
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_steps)
    # Saving, evaluation and parameter counts use `model`; the step runs the DDP wrapper (gradients
    # averaged over the processes).
    step = TrainStep(distributed.wrap_model(model, ctx), optimizer, scheduler, precision, ctx.device,
                     grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm)
    return TrainingParts(model, optimizer, scheduler, step)
