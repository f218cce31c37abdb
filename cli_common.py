"""Flags shared by measure_throughput.py and trainloop_gpu_finetuned.py, with one meaning each.

Both scripts build their parser as `Parser` (bad flags are one line, no abbreviations) and call
`add_shared_args` (data, model, precision, optimisation) and `add_run_args` (time budget, evaluation,
checkpoints), so a setting named in the benchmark means exactly the same thing in the trainer;
`speed_settings` names the settings whose change invalidates a benchmark result, and `launcher` starts
the commands both scripts print with as many processes as this one.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping, NoReturn

from errors import UserError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
COMPILE_DEFAULT = "off"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def auto_off_or_positive_int(text: str) -> str | int:
    """argparse type: 'auto', 'off' or an integer >= 1."""
    word = text.strip().lower()
    if word in ("auto", "off"):
        return word
    try:
        return positive_int(word)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a whole number of tokens, got {text!r}") from None


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*"
                       r"(s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?|d|days?)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in '90m', '2h', '1.5 hours', '45min' or '3600s'. A bare number is refused: '--time-budget 2'
    meant as hours would otherwise stop a run after 2 seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a duration; write e.g. 30m, 2h, 1.5h or 5400s")
    if match.group(2) is None:
        number = text.strip()
        raise ValueError(f"the duration {text!r} needs a unit: write e.g. {number}s, {number}m or {number}h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()[0]]
    if seconds <= 0:
        raise ValueError(f"the duration {text!r} must be greater than zero")
    return seconds


def duration_arg(text: str) -> float:
    """argparse type for a duration; returns seconds."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Parser(argparse.ArgumentParser):
    """Both scripts' parser: bad flags are one line (`error: ...`, exit 2) like every other user error, not
    usage text; and no abbreviations, so `--epoch 1` is an error rather than silently `--epochs 1`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def launcher(ctx: Any) -> list[str]:
    """How to start a script with as many processes as this one has (`python`, or torchrun with this
    node count and processes per node), for the commands the scripts print."""
    if not ctx.is_distributed:
        return ["python"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    nodes = [] if per_node == ctx.world_size else ["--nnodes", str(ctx.world_size // per_node)]
    return ["torchrun", *nodes, "--nproc_per_node", str(per_node)]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default in --help and keeps the module docstring's examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is` / isinstance, not `in (None, False, True)`: 0 == False and 1 == True would hide the defaults 0 and 1
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text  # switches, and flags whose help already says what the default means
        return super()._get_help_string(action)


def add_data_source_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--data, --solutions, --strict, --max-length: where the tasks come from and how long a sample may be
    (also used by `python arc_dataset.py`)."""
    parser.add_argument("--data", default=None,
                        help="ARC tasks: a *_challenges.json (Kaggle), one tasks JSON, a folder of <task>.json, "
                             "or a built-in set: arc-agi-2, arc-agi-2:evaluation, arc-agi-1, arc-agi-1:evaluation "
                             "(default: data/training.json if present, else arc-agi-2)")
    parser.add_argument("--solutions", default=None,
                        help="Kaggle *_solutions.json (default: found beside the challenges file)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first invalid task instead of skipping it with a warning")
    parser.add_argument("--max-length", type=positive_int, default=8192,
                        help="longest sample in tokens; longer ones drop demonstrations until they fit")


def add_shared_args(parser: argparse.ArgumentParser) -> None:
    """Add the data, model, precision and device flags that both scripts share."""
    data = parser.add_argument_group("data")
    add_data_source_args(data)
    data.add_argument("--batch-size", type=positive_int, default=1,
                      help="samples per batch (length-grouped so padding stays small)")
    data.add_argument("--tokens-per-batch", type=positive_int, default=None,
                      help="pack samples into rows of this many tokens instead of --batch-size samples")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="turn off training augmentation (rotations/flips, colour permutations, demo order)")
    data.add_argument("--seed", type=int, default=0, help="seed for augmentation, order and initialisation")

    model = parser.add_argument_group("model")
    model.add_argument("--model-name", default=DEFAULT_MODEL,
                       help="Hugging Face model id or local checkpoint folder; 'tiny' for a 2-layer test model")
    model.add_argument("--random-init", action="store_true",
                       help="build the named architecture from its bundled config with random weights "
                            "(no download; same speed as the real weights)")
    model.add_argument("--lora-rank", type=non_negative_int, default=0,
                       help="train LoRA adapters of this rank instead of all weights (0: full fine-tuning)")
    model.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass for every batch: less memory, ~30%% slower")
    model.add_argument("--checkpoint-long-batches", type=auto_off_or_positive_int, default="auto",
                       metavar="auto|off|TOKENS",
                       help="recompute activations only for batches of more than TOKENS computed tokens (rows x "
                            "length), so the longest samples fit the GPU and the rest run at full speed; auto: "
                            "the limit this GPU's memory sets, measured at start on two of the epoch's batches "
                            "(on CPU: off)")
    model.add_argument("--compile", default=COMPILE_DEFAULT, choices=["auto", "on", "off"],
                       help="torch.compile the decoder blocks (compiled once in the first steps: ~27 s on an H200 "
                            "machine) to cut "
                            "the per-step Python and kernel-launch cost that bounds small batches on a GPU; "
                            "auto: on for CUDA GPUs with Triton, off on CPU")
    model.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                       help="attention kernel (eager overflows in fp16 on Qwen2)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model repository's own Python code to run (off unless asked)")

    run = parser.add_argument_group("device and precision")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GIB",
                     help="use at most this much GPU memory, in GiB (default: the whole card): to share the GPU, "
                          "or to rehearse a smaller card on a bigger one (a T4: 14.7)")
    run.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                     help="auto: bf16 where native, fp16 + GradScaler on GPUs without bf16 (T4), fp32 on CPU")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--grad-accum", type=positive_int, default=1,
                       help="batches per optimizer step (gradient accumulation)")
    optim.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    optim.add_argument("--warmup-steps", type=non_negative_int, default=100,
                       help="linear warm-up optimizer steps before the cosine decay")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The run's time budget, evaluation and checkpoint flags. The trainer acts on them; the benchmark takes
    them with the same meaning (the next command it prints repeats them), so it can plan their cost."""
    run = parser.add_argument_group("time budget, evaluation and checkpoints")
    run.add_argument("--time-budget", type=duration_arg, default=None, metavar="DURATION",
                     help="wall-clock budget with a unit: 2h, 90m, 1.5h or 45s. The trainer stops with a checkpoint "
                          "and the final model before it runs out, judged from measured step and save times; the "
                          "benchmark's next command fits it")
    run.add_argument("--eval-data", default=None,
                     help="tasks whose test inputs are scored (any --data format; if not given: the test inputs "
                          "of the training tasks, which training never sees)")
    run.add_argument("--eval-tasks", type=non_negative_int, default=100,
                     help="evaluate on the first N tasks with known test outputs (0: no evaluation); greedy "
                          "decoding costs a forward pass per generated token")
    run.add_argument("--eval-every", type=non_negative_int, default=0,
                     help="also evaluate every N optimizer steps (0: at the end of each epoch only)")
    run.add_argument("--eval-batch-size", type=positive_int, default=8,
                     help="test inputs decoded together, shortest prompts first (a decode step costs about the "
                          "same for 8 as for 1 on a GPU); lower it if evaluation runs out of memory")
    run.add_argument("--eval-attempts", type=int, choices=(1, 2), default=1,
                     help="2: a second attempt on an augmented view, mapped back (pass@2, the ARC Prize metric)")
    run.add_argument("--eval-views", type=positive_int, default=1, metavar="K",
                     help="also decode each test input under K augmented views (rotation/flip, colours, demonstration "
                          "order), map the answers back and vote, logging the voted pass@2 beside the greedy "
                          "accuracy (the ARC winners' inference; 8 on a GPU; costs K decodes per input)")
    run.add_argument("--eval-score", choices=("votes", "product"), default="votes",
                     help="rank the views' candidate grids by votes (ties: summed log-probability over the views) "
                          "or by the summed log-probability alone (product of the views' probabilities)")
    run.add_argument("--save-every", type=non_negative_int, default=1000,
                     help="also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    run.add_argument("--keep-checkpoints", type=positive_int, default=2,
                     help="how many of the newest checkpoints to keep on disk")


def validate_shared_args(args: argparse.Namespace) -> list[str]:
    """Problems with the shared flags, all of them, so the user fixes everything in one go."""
    problems = []
    if args.tokens_per_batch is not None and args.batch_size != 1:
        problems.append("--batch-size and --tokens-per-batch exclude each other; give one")
    if args.tokens_per_batch is not None and args.tokens_per_batch < args.max_length:
        problems.append(f"--tokens-per-batch ({args.tokens_per_batch}) must be at least --max-length "
                        f"({args.max_length}) so the longest sample fits in a row")
    if args.device != "auto" and args.device != "cpu" and not _is_cuda_spec(args.device):
        problems.append(f"--device {args.device!r} is not one of auto, cpu, cuda, cuda:N")
    return problems


def _is_cuda_spec(text: str) -> bool:
    if text == "cuda":
        return True
    prefix, _, index = text.partition(":")
    return prefix == "cuda" and index.isdigit()


def speed_settings(args: argparse.Namespace, device_info: Mapping[str, Any], precision: str,
                   world_size: int = 1) -> dict[str, Any]:
    """The settings that change how long a step takes; a benchmark result only applies when they match.

    `device_info` is training.describe_device's: its name, and on CPU its thread count (a step on 1 thread
    and on 8 differ several-fold, so a result measured with another count does not apply either).
    `world_size` is the number of torchrun processes (a 1-GPU result does not time a 2-GPU step, whose
    gradients cross the bus)."""
    device_name = str(device_info["name"])
    cpu_threads = device_info.get("threads")
    settings = {
        "device": device_name,
        "precision": precision,
        "world_size": world_size,
        "model_name": args.model_name,
        "lora_rank": args.lora_rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_long_batches": args.checkpoint_long_batches,
        "compile": args.compile,
        "gpu_memory": args.gpu_memory,
        "attn_implementation": args.attn_implementation,
        "batch_size": args.batch_size,
        "tokens_per_batch": args.tokens_per_batch,
        "max_length": args.max_length,
        "grad_accum": args.grad_accum,
        "augment": args.augment,
        "data": args.data,
    }
    if cpu_threads is not None:
        settings["cpu_threads"] = cpu_threads
    return settings


def jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as plain JSON values (paths and other objects as strings), for result files and checkpoints."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v) for k, v in values.items()}
