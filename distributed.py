"""Data-parallel training under torchrun: one process per device, each taking its share of every epoch.

Both scripts run unchanged as one process; started by torchrun they become one rank of a group:

    # one machine, two GPUs (a Kaggle 2xT4): NCCL between the GPUs
    torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py --epochs 3 --device cuda
    # the same on CPU with the gloo backend (what the tests do)
    torchrun --nproc_per_node 2 trainloop_gpu_finetuned.py --model-name tiny --device cpu --epochs 1
    # two machines of eight GPUs: run this on each, with the first machine's address (torchrun's c10d rendezvous)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id arc1 \\
        trainloop_gpu_finetuned.py --epochs 3 --device cuda

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `DistributedContext.from_env` reads them, starts the process
group (NCCL on CUDA, gloo on CPU) and gives each rank its device (cuda:LOCAL_RANK; pick the GPUs with
CUDA_VISIBLE_DEVICES). Without torchrun every call here is a cheap no-op, so the scripts need no branches.

Rules every rank must keep, or the group hangs until the collective times out:
  * every rank runs the same number of optimizer steps per epoch (`shard_batch_plan` guarantees it);
  * collectives (`all_reduce_*`, `gather_objects`, `any_true`, `barrier`) are called by every rank at the
    same point: at log steps, after evaluation, before a checkpoint; never only on rank 0;
  * a decision to stop (Ctrl-C, SIGTERM, time budget, early stopping) is agreed with `any_true` first.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from errors import UserError, skip_interpreter_teardown

T = TypeVar("T")

# Evaluation or a checkpoint on one rank can keep the others waiting at the next collective; NCCL's default
# of 10 minutes would kill a long evaluation, so allow more.
DEFAULT_TIMEOUT = timedelta(minutes=60)
# Process groups this process has left, kept alive to its end (see DistributedContext.cleanup).
_LEFT_GROUPS: list[Any] = []


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not a whole number; start the script "
                        f"with torchrun, which sets it") from None


@dataclass
class DistributedContext:
    """Where this process stands in the group: its rank, the group size and its device.

    With world_size 1 (no torchrun, or torchrun with one process) no process group exists and the
    collectives return their input, so callers never branch on whether they are distributed."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" or "gloo" when a process group was started
    # Host-side messages (stop flags, objects, barriers) go through a gloo group even when gradients use
    # NCCL, so they never wait for the GPU's queue: a stop check every step costs ~0.1 ms, not a sync.
    control_group: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, device: torch.device, timeout: timedelta = DEFAULT_TIMEOUT) -> "DistributedContext":
        """Join the torchrun group, if any. `device` is the one training.resolve_device chose; under torchrun
        a CUDA device becomes cuda:LOCAL_RANK (so one `--device cuda` works for every rank)."""
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if world_size <= 1:
            return cls(device=device)
        if device.type == "cuda":
            visible = torch.cuda.device_count()
            if local_rank >= visible:
                raise UserError(f"torchrun started a process for local rank {local_rank} but only {visible} "
                                f"GPU(s) are visible; use --nproc_per_node {visible} or fewer")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise UserError(f"distributed training supports CUDA (NCCL) and CPU (gloo) devices, not {device.type}")
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend,
                   control_group=control)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs, plots and writes checkpoints."""
        return self.rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on rank 0 only, flushed so torchrun's interleaved output stays in order."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. others wait while rank 0 writes a checkpoint). Host-side:
        it does not wait for queued GPU work."""
        if self.is_distributed:
            dist.barrier(group=self.control_group)

    def all_reduce_sum(self, value: T) -> T:
        """Sum over ranks of a tensor, a number, or a list of numbers (one collective for the whole list).

        A tensor is reduced on this rank's device (NCCL on GPUs: it queues behind the step, no host sync
        until you read it) and not changed in place. Numbers come back as floats, which means the caller
        already synced to get them: call it at log steps, not every step."""
        return self._all_reduce(value, mean=False)

    def all_reduce_mean(self, value: T) -> T:
        """Mean over ranks, as `all_reduce_sum` (for losses; counts such as tokens should be summed)."""
        return self._all_reduce(value, mean=True)

    def _all_reduce(self, value: Any, mean: bool) -> Any:
        if isinstance(value, torch.Tensor):
            reduced = value.detach().clone()
            if mean and not reduced.is_floating_point():
                reduced = reduced.double()
            if self.is_distributed:
                reduced = reduced.to(self.device)
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
                if mean:
                    reduced /= self.world_size
            return reduced.to(value.device)
        numbers = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
        if self.is_distributed:
            reduced = torch.tensor(numbers, dtype=torch.float64)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.control_group)
            numbers = (reduced / self.world_size if mean else reduced).tolist()
        return type(value)(numbers) if isinstance(value, (list, tuple)) else numbers[0]

    def any_true(self, flag: bool) -> bool:
        """True on every rank when it is True on any: how ranks agree to stop (Ctrl-C, SIGTERM, time budget,
        early stopping) after the same step. Every rank must call it at the same step; it is a host-side
        exchange (no GPU sync), cheap enough for every step.

        Under torchrun, Ctrl-C reaches torchrun, which forwards SIGINT to every rank and SIGKILLs them
        --shutdown_timeout (30) seconds later: stop at the next agreed step and save within that time."""
        if not self.is_distributed:
            return bool(flag)
        return self.all_reduce_sum(1.0 if flag else 0.0) > 0

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's picklable `obj`, in rank order, on every rank (evaluation results, skipped counts)."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control_group)
        return gathered

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (a resume path or run directory that rank 0 decided)."""
        if not self.is_distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.control_group)
        return holder[0]

    def cleanup(self) -> None:
        """Leave the process group (call once at exit, also after an error, so torchrun ends cleanly).

        The group objects themselves are never destroyed: a gloo group's destructor joins its worker threads
        while holding the GIL, and a worker that is still releasing a finished collective's tensors needs the
        GIL, so the process hangs (torch 2.13; 3 runs in 12 of a 2-process test on a loaded 2-core machine).
        They stay referenced until errors.run_cli ends the process with os._exit, after flushing output."""
        if self.is_distributed and dist.is_initialized():
            _LEFT_GROUPS.extend(group for group in (dist.group.WORLD, self.control_group) if group is not None)
            dist.destroy_process_group()
            skip_interpreter_teardown()

    def __enter__(self) -> "DistributedContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def shard_batch_plan(plan: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of an epoch, from the plan that every rank computed identically.

    Batches are dealt round-robin: optimizer step k on rank r trains plan[k * world_size + r], so one
    step of the group covers world_size consecutive batches of the plan, and after k steps exactly
    plan[:k * world_size] is done. DDP averages the ranks' mean losses as TrainStep averages accumulated
    batches, so N ranks with --grad-accum A train like one device with --grad-accum N*A, up to
    floating-point order: keep N*A fixed for the same results on any number of GPUs.

    Every rank gets the same number of batches, ceil(len(plan) / world_size), or DDP would hang. When
    len(plan) does not divide evenly, the last round's r < world_size batches are split (never merged, so a
    piece still fits the token budget and keeps its length grouping) into world_size smaller batches: every
    sample is still trained exactly once (a sample in a smaller piece weighs a little more in that one
    step's average). Only when that round has fewer samples than ranks (batch size 1 and a remainder)
    do the missing batches repeat the plan's first batches: at most world_size - 1 extra batches per
    epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    batches = [list(batch) for batch in plan]
    full_rounds = len(batches) // world_size
    mine = batches[rank:full_rounds * world_size:world_size]
    remainder = batches[full_rounds * world_size:]
    if remainder:
        mine.append(_last_round(remainder, batches, world_size)[rank])
    return mine


def steps_per_epoch(num_batches: int, world_size: int) -> int:
    """Optimizer-step rounds per epoch on every rank (before gradient accumulation)."""
    return -(-num_batches // world_size)


def _last_round(remainder: list[list[int]], plan: list[list[int]], world_size: int) -> list[list[int]]:
    """Split the last round's batches into world_size pieces: halve the largest piece until there are enough;
    top up with the plan's first batches if the samples run out."""
    pieces = [batch for batch in remainder if batch]
    while len(pieces) < world_size:
        largest = max(range(len(pieces)), key=lambda i: len(pieces[i]), default=None)
        if largest is None or len(pieces[largest]) < 2:
            break
        batch = pieces.pop(largest)
        half = (len(batch) + 1) // 2
        pieces[largest:largest] = [batch[:half], batch[half:]]
    fillers = iter(plan)
    while len(pieces) < world_size:
        pieces.append(list(next(fillers)))
    return pieces


def shard_items(items: Sequence[T], ctx: DistributedContext) -> list[T]:
    """This rank's share of a list of independent items (evaluation samples): items[rank::world_size].

    Shares may differ by one: fine for work without collectives (generation on the unwrapped model)."""
    return list(items[ctx.rank::ctx.world_size])


def wrap_model(model: torch.nn.Module, ctx: DistributedContext) -> torch.nn.Module:
    """Wrap for DistributedDataParallel (gradients averaged over ranks in backward); unchanged on one rank.

    find_unused_parameters stays off: every trainable parameter is used in every forward, LoRA included
    (peft freezes the base weights, which DDP then ignores). Gradient checkpointing works because
    transformers uses non-reentrant checkpointing by default."""
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper: what save_model, generation and parameter counts should see."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation: use as
    `with no_sync(model, sync=is_last_micro_batch): loss.backward()`."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
