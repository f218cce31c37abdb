"""What measure_throughput.py and trainloop_gpu_finetuned.py build from the same flags.

The benchmark's projection is only right if it times exactly what the trainer runs, so the data pipeline
and the model / optimizer / training step are built here, once, for both scripts.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np
import torch

import distributed
from arc_dataset import Batch, DataError, DataSettings, TaskSet, TrainingData, load_tasks, training_samples
from model import ModelSettings, compile_decoder_layers, load_model
from training import (Precision, TrainStep, build_optimizer, build_scheduler, cap_gpu_memory,
                      long_batch_threshold, resolve_compile)


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
    gpu_memory_bytes: int | None = None  # --gpu-memory, as the allocator enforces it (None: the whole card)
    compiled: bool = False               # --compile: the decoder blocks compile at their first step


def build_training_step(args: argparse.Namespace, ctx: distributed.DistributedContext, precision: Precision,
                        total_steps: int, data: TrainingData) -> TrainingParts:
    """Model (seeded, on the context's device), AdamW, warm-up + cosine schedule over `total_steps`
    optimizer steps, and the one training step both scripts call, with its long-batch recomputation limit
    (--checkpoint-long-batches; `auto` measures it on two of `data`'s samples)."""
    long_batches = args.checkpoint_long_batches
    selective = (not args.gradient_checkpointing and long_batches != "off"
                 and (long_batches != "auto" or ctx.device.type == "cuda"))
    settings = replace(ModelSettings.from_args(args), long_batch_checkpointing=selective)
    memory = cap_gpu_memory(ctx.device, args.gpu_memory)
    torch.manual_seed(args.seed)  # random initialisation (tiny, --random-init) repeats with the seed
    model = load_model(settings).to(ctx.device)
    model.train()
    compiled = resolve_compile(ctx.device, args.compile)
    if compiled:
        compile_decoder_layers(model)  # compiles at the first step (the benchmark's warm-up)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_steps)
    # Saving, evaluation and parameter counts use `model`; the step runs the DDP wrapper (gradients
    # averaged over the processes).
    step = TrainStep(distributed.wrap_model(model, ctx), optimizer, scheduler, precision, ctx.device,
                     grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm)
    if selective:
        step.checkpoint_above = (long_batches if long_batches != "auto"
                                 else long_batch_threshold(step, *calibration_batches(data), memory))
    return TrainingParts(model, optimizer, scheduler, step, memory, compiled)


def calibration_batches(data: TrainingData) -> tuple[Batch, Batch]:
    """Two single samples of the epoch, at the 25th and 75th percentile of length: short enough to fit any
    GPU that holds the model, far enough apart to measure memory per token."""
    encoded = data.encoded(0)
    by_length = np.argsort(data.lengths(0), kind="stable")
    small, large = (by_length[int(q * (len(by_length) - 1))] for q in (0.25, 0.75))
    return data.collate([encoded[small]]), data.collate([encoded[large]])


def describe_long_batches(args: argparse.Namespace, step: TrainStep, data: TrainingData) -> str | None:
    """One line on which batches recompute their activations, or None when none does."""
    if args.gradient_checkpointing:
        return "activation recomputation: every batch (--gradient-checkpointing)"
    if step.checkpoint_above is None:
        return None
    tokens = data.computed_tokens(0)
    over = sum(t > step.checkpoint_above for t in tokens)
    card = f"{args.gpu_memory:g} GiB (--gpu-memory)" if args.gpu_memory else "this GPU's memory"
    how = f"auto: what {card} holds, measured" if args.checkpoint_long_batches == "auto" else "given"
    return (f"activation recomputation: batches over {step.checkpoint_above:,} computed tokens ({how}): "
            f"{over} of epoch 0's {len(tokens)} batches")
