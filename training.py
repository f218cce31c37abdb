"""The one training step and the one device/precision helper that the benchmark and the trainer share.

The benchmark times exactly this code, so its projection holds for the trainer:

    device = resolve_device("auto")                  # cuda if present, else cpu
    precision = resolve_precision(device, "auto")    # T4: fp16 + GradScaler; A100/H100: bf16; CPU: fp32
    model = load_model(settings).to(device)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=1000, warmup_steps=100)
    step = TrainStep(model, optimizer, scheduler, precision, device, grad_accum=1)
    for batch in batches:
        out = step(batch)        # no host sync: out.loss is a device tensor; read it at log time

Precision choices (FACTS: the T4 has no native bf16, and emulated bf16 is ~4x slower than fp16 there):
- auto: bf16 autocast where the GPU has it natively (compute capability >= 8.0), fp16 autocast with fp32
  master weights and a dynamic GradScaler on older GPUs, fp32 on CPU.
- --precision bf16 on a GPU without native bf16 runs (emulated) with a warning; fp16 on an Ampere+ GPU runs
  with the scaler; fp16 on CPU is a UserError (no GradScaler path worth having there); bf16 on CPU runs
  with a warning (~5x slower matmuls than fp32 on the measured CPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import arc_dataset as data
from distributed import no_sync
from errors import UserError
from model import attention_implementation, attention_layer_types, checkpointable_layers, model_inputs, set_checkpointing

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


# ------------------------------------------------------------------------------------ device / precision

def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device; asking for CUDA where there is none is a UserError.

    A CUDA device also becomes the current device, so allocations and capability checks refer to it.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    prefix, _, index = spec.partition(":")
    if prefix != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {spec}: {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    number = int(index) if index else torch.cuda.current_device()
    if number >= count:
        raise UserError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    torch.cuda.set_device(number)
    return torch.device("cuda", number)


@dataclass(frozen=True)
class Precision:
    """How the step computes: autocast dtype (None: plain fp32) and whether a GradScaler guards fp16."""
    name: str
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool


FP32 = Precision("fp32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)


def resolve_precision(device: torch.device, requested: str = "auto") -> Precision:
    """The precision to train in on `device`; weights stay fp32 (master copies) in every mode."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if requested == "fp16":
            raise UserError("--precision fp16 needs a CUDA GPU; on CPU use fp32 (the default)")
        if requested == "bf16":
            warnings.warn("bf16 on CPU: matmuls run ~5x slower than fp32 on typical CPUs", stacklevel=2)
            return BF16
        return FP32
    # torch's check looks at the current device; resolve_device made `device` current.
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return BF16 if native_bf16 else FP16
    if requested == "bf16" and not native_bf16:
        major, minor = torch.cuda.get_device_capability(device)
        warnings.warn(f"bf16 on a GPU of compute capability {major}.{minor} is emulated (~4x slower than fp16 "
                      f"on a T4); --precision fp16 is the fast choice here", stacklevel=2)
    return {"bf16": BF16, "fp16": FP16, "fp32": FP32}[requested]


def avoid_per_shape_attention_plans(device: torch.device) -> None:
    """Keep PyTorch's SDPA off the cuDNN attention backend on CUDA (flash / memory-efficient kernels instead).

    On Hopper GPUs torch prefers cuDNN attention, which builds a kernel plan for every new sequence length,
    forward and backward. ARC samples change length every batch, so the plans are rebuilt all the time:
    measured on an H200 (torch 2.11) this made a 0.5B batch-size-1 step ~134 ms with the time independent of
    the batch's length. Flash and memory-efficient attention take any length as it comes. Process-wide; GPUs
    where cuDNN attention is never chosen (T4) are unaffected."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_compile(device: torch.device, requested: str = "auto") -> bool:
    """--compile auto|on|off -> whether to compile the decoder blocks (model.compile_decoder_layers).

    auto compiles on CUDA GPUs where Triton (inductor's GPU code generator) is installed; on a CPU a step is
    bound by its matmuls, which compiling does not speed up (measured here: ~10% on a 4-layer model)."""
    if requested == "off":
        return False
    from torch.utils._triton import has_triton

    if device.type == "cuda" and not has_triton():
        if requested == "on":
            raise UserError("--compile on needs Triton on a GPU (pip install triton, the version your torch "
                            "wheel names), or use --compile off")
        return False
    return requested == "on" or device.type == "cuda"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a host sync: for timers and pauses only, never per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cap_gpu_memory(device: torch.device, gib: float | None) -> int | None:
    """--gpu-memory: the bytes this process may use on the GPU, enforced by PyTorch's allocator (an allocation
    past it is an out-of-memory, as on a card that size); None leaves the whole card. For sharing a GPU with
    another process, or rehearsing a T4's 14.7 GiB on a bigger card."""
    if gib is None:
        return None
    if device.type != "cuda":
        raise UserError("--gpu-memory caps GPU memory, and this run is on the CPU: drop it or use --device cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(gib * 2**30)
    if budget > total:
        raise UserError(f"--gpu-memory {gib:g}: this GPU has {total / 2**30:.1f} GiB; give at most that")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    return budget


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, memory and compute capability (GPU) or thread count (CPU), for banners and result files."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "total_memory_gb": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}
    return {"type": device.type, "name": _cpu_name(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def measure_matmul_peak(device: torch.device, precision: Precision, seconds: float = 0.5,
                        size: int | None = None) -> float:
    """Dense matmul FLOP/s this device sustains in the training dtype.

    The honest denominator for utilisation: a spec-sheet peak is rarely reachable (a T4 sustains ~20 of its
    65 fp16 TFLOP/s on a 4096^3 matmul), so the benchmark reports model FLOP/s over both."""
    dtype = precision.autocast_dtype or torch.float32
    n = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, clocks
        a @ b
    synchronize(device)  # the timer must see finished work
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        done += 4
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * done / elapsed


# ---------------------------------------------------------------------------------- optimizer / schedule

def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decay on matrices only (not biases or norms).

    Build it after moving the model to its device: it uses the fused kernel (one pass over each tensor; on
    this 2-core CPU 3.0x faster than the default per-tensor loop, 66 vs 196 ms for 105M parameters), which on
    CUDA also lets the GradScaler skip an inf/NaN step without a host sync. The Hugging Face Trainer's
    default (`adamw_torch_fused`) is the same kernel.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a checkpoint's optimizer state but keep this process's kernel choice (`fused`, `foreach`):
    torch would otherwise take it from the checkpoint, so a run saved with the per-tensor loop (or on
    another device) would resume without the fused kernel."""
    kernel = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernel):
        group.update(chosen)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr over `warmup_steps` optimizer steps, then cosine decay to
    `min_lr_ratio` x peak at `total_steps` (and held there if training runs longer)."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



def describe_schedule(lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> str:
    """What build_scheduler's schedule really does over `total_steps`, in the banner's words. A run no longer
    than its warm-up never decays: the lr climbs for the whole run and ends near its peak."""
    total_steps = max(1, total_steps)
    floor = "0" if min_lr_ratio == 0 else f"{lr * min_lr_ratio:g}"
    if warmup_steps >= total_steps:
        last = lr * total_steps / (min(warmup_steps, total_steps) + 1)
        return (f"lr rises linearly for all {total_steps} steps to {last:.3g} (peak {lr:g}), with no decay: the run "
                f"is no longer than --warmup-steps {warmup_steps}; a smaller --warmup-steps leaves room for the "
                f"cosine decay")
    if warmup_steps == 0:
        return f"lr {lr:g}, cosine to {floor} over {total_steps} steps"
    return f"lr {lr:g}, {warmup_steps} warm-up steps then cosine to {floor} at step {total_steps}"

# ------------------------------------------------------------------------------------------- the step

def autocast(device: torch.device, precision: Precision):
    """The autocast context for `precision` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None)


def forward_loss(model: nn.Module, batch: data.Batch, precision: Precision) -> torch.Tensor:
    """Mean cross-entropy over the labelled (output-grid) tokens, next-token shifted; fp32 loss."""
    device = batch.input_ids.device
    with autocast(device, precision):
        logits = model(**model_inputs(batch, attention_implementation(model), attention_layer_types(model))).logits
    # The 16-symbol vocabulary keeps these logits tiny, so the fp32 upcast costs nothing.
    logits = logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=data.IGNORE_INDEX)


@dataclass
class StepOutput:
    """What one call of TrainStep reports; tensors stay on the device until the caller logs them."""
    loss: torch.Tensor                 # detached mean loss of this batch (not divided by grad_accum)
    num_tokens: int                    # real (non-pad) input tokens
    num_target_tokens: int             # tokens that carried a label
    optimizer_stepped: bool            # True on the gradient-accumulation boundary
    grad_norm: torch.Tensor | None = None  # pre-clipping norm on the boundary, else None


class TrainStep:
    """Forward (autocast), backward through the GradScaler, and on every `grad_accum`-th call: unscale,
    clip, optimizer step (skipped by the scaler on inf/NaN), scaler update, scheduler step, zero grads.

    Nothing here reads a value back to the host, so the GPU runs ahead of Python. `skipped_steps` counts
    optimizer steps whose gradients were not finite, in a device tensor: read it at log time. With fp16 the
    scaler skips those steps (and lowers its scale); with bf16/fp32 there is no scaler, so such a step is
    applied and the count is the warning that the run diverged.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, precision: Precision,
                 device: torch.device, grad_accum: int = 1, max_grad_norm: float = 1.0):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.device = device
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        self.micro_steps = 0        # batches seen
        self.optimizer_steps = 0    # accumulation boundaries reached (including skipped ones)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Batches of more than this many computed tokens (rows x length) recompute their activations in the
        # backward pass; None leaves the model's own setting (--gradient-checkpointing: every batch). Set by
        # run_setup, which measures it with this step (long_batch_threshold).
        self.checkpoint_above: int | None = None
        self._checkpoint_layers = checkpointable_layers(model)
        self._checkpointing: bool | None = None
        avoid_per_shape_attention_plans(device)

    def __call__(self, batch: data.Batch) -> StepOutput:
        batch = batch.to(self.device)
        if not self.model.training:  # train() walks every module (~0.7 ms a step for 24 layers on a CPU core)
            self.model.train()
        if self.checkpoint_above is not None:
            self._recompute(self._recomputes(batch))
        stepped = (self.micro_steps + 1) % self.grad_accum == 0
        # Under DDP, gradients are all-reduced only on the accumulation boundary.
        with no_sync(self.model, sync=stepped):
            loss = forward_loss(self.model, batch, self.precision)
            self.scaler.scale(loss / self.grad_accum).backward()
        self.micro_steps += 1
        grad_norm = None
        if stepped:
            grad_norm = self._optimizer_step()
        return StepOutput(loss.detach(), batch.num_tokens, batch.num_target_tokens, stepped, grad_norm)

    def graph_variant(self, batch: data.Batch) -> tuple[bool, bool, bool, bool]:
        """What makes compiled decoder blocks (--compile) trace a graph of their own: one row or several, packed
        or not, a padding mask or none, activations recomputed or not. Lengths do not: shapes are dynamic."""
        return (batch.input_ids.shape[0] > 1, batch.segment_ids is not None, batch.attention_mask is not None,
                self._recomputes(batch))

    def _recomputes(self, batch: data.Batch) -> bool:
        """Whether `batch` is over the long-batch limit (checkpoint_above) and recomputes its activations."""
        return self.checkpoint_above is not None and batch.input_ids.numel() > self.checkpoint_above

    def _recompute(self, enabled: bool) -> None:
        if enabled != self._checkpointing:
            if enabled and not self._checkpoint_layers:
                raise ValueError("checkpoint_above needs a model prepared with long_batch_checkpointing")
            set_checkpointing(self._checkpoint_layers, enabled)
            self._checkpointing = enabled

    def _optimizer_step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # inf/NaN anywhere in the gradients makes the norm non-finite; that is exactly when the scaler skips.
        self.skipped_steps += (~torch.isfinite(grad_norm)).to(torch.int64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # The schedule advances on a skipped step too (knowing it was skipped would need a host sync);
            # torch warns about that the first time. It costs one step of warm-up, nothing more.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return grad_norm.detach()

    def state_dict(self) -> dict[str, Any]:
        """Scaler and counters for a checkpoint (reads skipped_steps back: checkpoint time only)."""
        return {"scaler": self.scaler.state_dict(), "micro_steps": self.micro_steps,
                "optimizer_steps": self.optimizer_steps, "skipped_steps": int(self.skipped_steps.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps = int(state["micro_steps"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps.fill_(int(state["skipped_steps"]))


def one_batch_per_graph_variant(step: TrainStep, batches: Iterable[data.Batch]) -> list[data.Batch]:
    """The first batch of each graph variant in `batches` (TrainStep.graph_variant): stepping on these
    compiles every graph a run will need, so a timed window that follows contains no compiling."""
    chosen: dict[tuple[bool, bool, bool, bool], data.Batch] = {}
    for batch in batches:
        chosen.setdefault(step.graph_variant(batch), batch)
    return list(chosen.values())


# ------------------------------------------------------------------------- long batches and memory

MEMORY_HEADROOM = 0.85  # of the GPU's memory, for what a line through two measurements does not see


def tokens_that_fit(points: list[tuple[int, int]], extra_bytes: int, total_bytes: int,
                    headroom: float = MEMORY_HEADROOM) -> int:
    """The most computed tokens a batch may have and still fit, from (tokens, peak bytes) of measured steps.

    Peak memory grows about linearly with a batch's tokens (activations; the weights, gradients and the
    rest are the constant). Two points at different sizes give the line; with one size only (samples all of
    one length), it fits or not: that size, or 0. `extra_bytes` is what later steps hold that the
    measured ones did not (AdamW's two moment buffers, created at the first optimizer step)."""
    room = headroom * total_bytes - extra_bytes
    (t0, m0), (t1, m1) = min(points), max(points)
    if t1 == t0:
        return t1 if max(m0, m1) <= room else 0
    per_token = max((m1 - m0) / (t1 - t0), 1.0)
    return max(0, int(t1 + (room - m1) / per_token))


def measure_step_peak(step: TrainStep, batch: data.Batch) -> int:
    """Peak CUDA memory of one forward + backward on `batch`, leaving training untouched: no optimizer step,
    no gradient all-reduce, the gradients dropped, random state restored."""
    device = step.device
    step.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device]), no_sync(step.model, sync=False):
        step.model.train()
        forward_loss(step.model, batch.to(device), step.precision).backward()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    step.optimizer.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats(device)
    return int(peak)


def long_batch_threshold(step: TrainStep, small: data.Batch, large: data.Batch,
                         memory_bytes: int | None = None) -> int:
    """--checkpoint-long-batches auto on a GPU: the computed tokens above which a batch must recompute its
    activations to fit the card (or `memory_bytes` of it), measured on two of the epoch's own batches (both
    must fit without recomputing)."""
    with out_of_memory_as_user_error(step.device, "measuring memory per token on two short samples: "):
        points = [(b.input_ids.numel(), measure_step_peak(step, b)) for b in (small, large)]
    optimizer_state = {id(p) for p in step.optimizer.state}
    moments = sum(2 * p.numel() * p.element_size() for p in step.params if id(p) not in optimizer_state)
    total = memory_bytes or torch.cuda.get_device_properties(step.device).total_memory
    return tokens_that_fit(points, moments, total)


# --------------------------------------------------------------------------------------- out of memory

def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on a CUDA device since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_out_of_memory(exc: BaseException) -> bool:
    """The CUDA caching allocator's OutOfMemoryError, or a CPU allocation failure."""
    return (isinstance(exc, torch.OutOfMemoryError)
            or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()))


@contextlib.contextmanager
def out_of_memory_as_user_error(device: torch.device, doing: str = "") -> Iterator[None]:
    """The one way an out-of-memory error reaches the user: `doing` (what ran, and what to lower first) then
    oom_message's line (where, peak memory, what to change), as a UserError."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(doing + oom_message(device, exc, peak_memory_bytes(device))) from None


def oom_message(device: torch.device, exc: BaseException, peak_bytes: int | None = None) -> str:
    """One line for an out-of-memory error: where, how much, and what to change."""
    if peak_bytes is None:
        peak_bytes = peak_memory_bytes(device)
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
        cap = " allowed by --gpu-memory" if fraction < 1.0 else ""
        where += f" ({peak_bytes / 2**30:.1f} GiB peak of {total * fraction / 2**30:.1f} GiB{cap})"
    elif peak_bytes:
        where += f" ({peak_bytes / 2**30:.1f} GiB peak)"
    return (f"out of memory on {where} ({type(exc).__name__}): lower --max-length (or --batch-size / --tokens-per-batch), add "
            f"--gradient-checkpointing, use --lora-rank 16, or pick a smaller --model-name")
