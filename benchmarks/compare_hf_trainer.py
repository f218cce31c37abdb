"""Side by side: this project's training step against the Hugging Face Trainer recipe, same samples, same device.

The Trainer recipe is what a user would otherwise write: a Qwen2 causal LM with its full vocabulary
(151,936 tokens), the same ARC samples serialised one token per cell (our 16 symbols mapped onto the Qwen
tokenizer's ids for "0".."9", "\\n", "I", "O" and its special tokens), labels masked to the output grid,
padded batches (a padding collator, as DataCollatorForSeq2Seq does), AdamW, clipping at 1.0, the same
precision. Ours is the exact code trainloop_gpu_finetuned.py runs: model.load_model (16-symbol vocabulary),
arc_dataset.TrainingData batches (length-grouped at batch size > 1, or packed with --tokens-per-batch) and
training.TrainStep. Both start from random weights of the same architecture: speed does not depend on them.

Each recipe runs in its own fresh process (so peak memory is its own), alternating ours/Trainer,
Trainer/ours (ABBA) over --rounds rounds, each round on the same freshly drawn ARC samples for both, after
untimed warm-up steps (--warmup random batches, then one of the round's longest sample). Printed per
recipe: real tokens/s (non-padding input tokens / timed wall seconds, data preparation included), the
share of computed tokens that are real, seconds per epoch projected as the epoch's real tokens / tokens/s,
and peak memory (CUDA: max allocated; CPU: the process's peak RSS
above its RSS before the model was built).

    python benchmarks/compare_hf_trainer.py --device cuda --model-shape qwen2.5-0.5b --steps 20 \\
        --batch-size 8 --max-length 8192 --json results_compare_gpu.json
    python benchmarks/compare_hf_trainer.py --device cpu --threads 1          # scaled-down shape, ~2-3 min
    python benchmarks/compare_hf_trainer.py --device cpu --model-shape qwen2.5-0.5b --steps 2 \\
        --json results_compare_cpu.json                                         # needs ~16 GB free RAM

A recipe that runs out of memory is reported as such (the Trainer recipe's full-vocabulary logits are
the usual cause), not as a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import arc_dataset as data  # noqa: E402
import cli_common  # noqa: E402
import throughput_report  # noqa: E402
from errors import UserError, run_cli  # noqa: E402

BUNDLED_05B = "Qwen/Qwen2.5-0.5B-Instruct"
# model shape -> (bundled config it starts from, overrides). "small" keeps Qwen2's structure (GQA, SwiGLU MLP
# 5.4x wide, tied embeddings, full vocabulary on the Trainer side) at a size a 2-core CPU steps in ~0.1-1 s.
# Its embedding is a larger share of the model than in the real 0.5B, so the vocabulary's effect is bigger.
SHAPES: dict[str, tuple[str, dict[str, int]]] = {
    "qwen2.5-0.5b": (BUNDLED_05B, {}),
    "small": (BUNDLED_05B, dict(hidden_size=256, intermediate_size=1408, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2)),
    "tiny": (BUNDLED_05B, dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)),  # for the smoke test
}
# The Qwen2/2.5 tokenizer's ids for our 16 symbols: "0".."9" are 15..24 (byte-level BPE puts printable ASCII
# at ord(c) - 33), "\n" is 198, "I" 40, "O" 46; BOS <|im_start|> 151644, EOS <|im_end|> 151645,
# PAD <|endoftext|> 151643. Which ids are used does not change the speed; that they are real rows does.
QWEN_TOKEN_IDS = np.array([*range(15, 25), 198, 40, 46, 151644, 151645, 151643], dtype=np.int64)
RECIPES = ("ours", "trainer")


# ------------------------------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=cli_common.HelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="small",
                        help="qwen2.5-0.5b: the real architecture (random weights, bundled config); "
                             "small: a scaled-down Qwen2 (hidden 256, 4 layers) for a quick CPU run; "
                             "tiny: hidden 64, 2 layers, for tests")
    parser.add_argument("--steps", type=cli_common.positive_int, default=4,
                        help="timed optimizer steps per recipe per round (after the warm-up)")
    parser.add_argument("--warmup", type=cli_common.positive_int, default=3,
                        help="untimed random batches per recipe before the timed ones (then one of the longest "
                             "timed sample)")
    parser.add_argument("--rounds", type=cli_common.positive_int, default=2,
                        help="rounds; each runs both recipes on the same samples, order alternating")
    parser.add_argument("--batch-size", type=cli_common.positive_int, default=2,
                        help="the padded batch size compared besides batch size 1 (1: compare only batch 1)")
    parser.add_argument("--tokens-per-batch", type=cli_common.positive_int, default=None,
                        help="ours packs the padded comparison's samples into rows of this many tokens "
                             "instead of length-grouped batches")
    parser.add_argument("--max-length", type=cli_common.positive_int, default=1024,
                        help="longest sample in tokens (demonstrations dropped to fit), for both recipes. The "
                             "trainer's default is 8192 (use it on a GPU); the Trainer recipe's full-vocabulary "
                             "logits and their gradients (~4 x batch x length x 151,936 floats) need ~2.5 GB "
                             "per 1000 tokens of padded batch, which this default keeps inside a small machine")
    parser.add_argument("--compile", default=cli_common.COMPILE_DEFAULT, choices=["auto", "on", "off"],
                        help="ours compiles its decoder blocks as the scripts' --compile does (the Trainer recipe "
                             "stays eager, as its defaults are); the compile happens in the warm-up")
    parser.add_argument("--data", default=None, help="ARC tasks (as the scripts' --data; default arc-agi-2)")
    parser.add_argument("--seed", type=int, default=0, help="sample draw, augmentation and initialisation")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate for both recipes")
    parser.add_argument("--threads", type=cli_common.positive_int, default=None,
                        help="CPU threads per recipe (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")
    parser.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-round", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    return parser


def validate(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.tokens_per_batch is not None and args.tokens_per_batch < args.max_length:
        problems.append(f"--tokens-per-batch ({args.tokens_per_batch}) must be at least --max-length "
                        f"({args.max_length})")
    if args.tokens_per_batch is not None and args.batch_size == 1:
        problems.append("--tokens-per-batch packs the padded comparison: give --batch-size 2 or more too")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        problems.append(f"--device {args.device!r} is not one of auto, cpu, cuda, cuda:N")
    return problems


# --------------------------------------------------------------------------------------------------- samples

def shape_config(shape: str) -> dict[str, Any]:
    """The architecture's config values with the full Qwen vocabulary."""
    name, overrides = SHAPES[shape]
    values = json.loads((PROJECT_DIR / "configs" / (name.replace("/", "--") + ".json")).read_text())
    return {**values, **overrides}


def data_settings(args: argparse.Namespace, batch_size: int) -> data.DataSettings:
    """Our batching for a comparison at `batch_size`; encoding (and so every token) is the same for all."""
    if batch_size > 1 and args.tokens_per_batch is not None:
        return data.DataSettings(max_length=args.max_length, tokens_per_batch=args.tokens_per_batch, seed=args.seed)
    return data.DataSettings(max_length=args.max_length, batch_size=batch_size, seed=args.seed)


def usable_samples(args: argparse.Namespace) -> tuple[list[data.Sample], data.TrainingData, str]:
    """The training samples that fit --max-length (others cannot be trained by either recipe), the epoch
    they make, and the data's description."""
    taskset = data.load_tasks(args.data)
    samples = data.training_samples(taskset)
    epoch = data.TrainingData(samples, data_settings(args, 1))
    kept = {(e.task_id, e.index) for e in epoch.encoded(0)}
    return [s for s in samples if (s.task_id, s.index) in kept], epoch, taskset.description


def draw(samples: list[data.Sample], args: argparse.Namespace, batch_size: int,
         round_index: int) -> tuple[list[data.Sample], list[data.Sample]]:
    """(warm-up samples, this round's timed samples): a seeded random draw, the same for both recipes.

    The warm-up is --warmup random batches, then a batch of copies of the round's longest timed sample, as the
    benchmark steps on the epoch's longest batch first: both recipes' memory allocators then hold blocks big
    enough for every timed step, and the one-off first-step costs are out of the window (on an H200, after a
    single warm-up step ours timed 3,305 real tokens/s at batch 1, against 13,250 in the benchmark's 120
    steps after its warm-up)."""
    order = np.random.default_rng(args.seed).permutation(len(samples))
    warm = [samples[i] for i in order[:args.warmup * batch_size]]
    start = args.warmup * batch_size + round_index * args.steps * batch_size
    timed = [samples[i] for i in order[start:start + args.steps * batch_size]]
    longest_item = max(encoded(timed, args), key=lambda item: len(item.input_ids))
    longest = next(s for s in timed if (s.task_id, s.index) == (longest_item.task_id, longest_item.index))
    return warm + [longest] * batch_size, timed


def encoded(samples: list[data.Sample], args: argparse.Namespace) -> list[data.EncodedSample]:
    """The samples as token ids: identical for both recipes (encoding ignores the batching settings)."""
    return data.TrainingData(samples, data_settings(args, 1)).encoded(0)


# --------------------------------------------------------------------------------------------------- workers

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory(device: torch.device, baseline_rss: int) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "CUDA max allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": peak - baseline_rss, "peak_rss_bytes": peak,
            "memory_kind": "peak RSS above the pre-model RSS"}


def run_ours(args: argparse.Namespace, device: torch.device, warm: list[data.Sample],
             timed: list[data.Sample], batch_size: int, baseline_rss: int) -> dict[str, Any]:
    """This project's step: load_model (16-symbol vocabulary), TrainingData batches, TrainStep."""
    from model import ModelSettings, compile_decoder_layers, load_model
    from training import (TrainStep, build_optimizer, build_scheduler, one_batch_per_graph_variant, resolve_compile,
                          resolve_precision, synchronize)

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(shape_config(args.model_shape)))
        torch.manual_seed(args.seed)
        model = load_model(ModelSettings(model_name=folder, random_init=True)).to(device)
    compiled = resolve_compile(device, args.compile)
    if compiled:
        compile_decoder_layers(model)
    precision = resolve_precision(device, "auto")
    optimizer = build_optimizer(model, lr=args.lr)
    scheduler = build_scheduler(optimizer, total_steps=10_000, warmup_steps=0)
    step = TrainStep(model, optimizer, scheduler, precision, device)
    settings = data_settings(args, batch_size)
    timed_data = data.TrainingData(timed, settings)
    warm_batches = list(data.TrainingData(warm, settings).batches(0))
    if compiled:  # compile every graph the timed steps need, in the warm-up
        warm_batches += one_batch_per_graph_variant(step, timed_data.batches(0))
    for batch in warm_batches:
        step(batch)
    real = computed = steps = 0
    synchronize(device)
    start = time.perf_counter()
    for batch in timed_data.batches(0):
        out = step(batch)
        real += batch.num_tokens
        computed += batch.input_ids.numel()
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "real_tokens": real, "computed_tokens": computed,
            "final_loss": float(out.loss), "precision": precision.name, "compiled": compiled,
            "vocab_size": int(model.config.vocab_size), **_peak_memory(device, baseline_rss)}


def run_trainer(args: argparse.Namespace, device: torch.device, warm: list[data.Sample],
                timed: list[data.Sample], batch_size: int, baseline_rss: int) -> dict[str, Any]:
    """The Hugging Face Trainer recipe on the full-vocabulary model, timed from the end of the warm-up."""
    from transformers import (AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                              logging as hf_logging)
    from training import resolve_precision, synchronize

    hf_logging.set_verbosity_error()
    values = shape_config(args.model_shape)
    config = AutoConfig.for_model(**values)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    precision = resolve_precision(device, "auto")

    warm_items = encoded(warm, args)
    if not warm_items:
        raise UserError("the warm-up samples do not fit --max-length; raise it or change --seed")
    rows = []
    for item in warm_items + encoded(timed, args):
        ids = QWEN_TOKEN_IDS[item.input_ids]
        labels = ids.copy()
        labels[:item.target_start] = data.IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    counts = {"real": 0, "computed": 0, "batches": 0}
    warm_batches = -(-len(warm_items) // batch_size)

    def pad_collate(features: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest in the batch (DataCollatorForSeq2Seq without a tokenizer)."""
        width = max(len(f["input_ids"]) for f in features)
        ids = np.full((len(features), width), QWEN_TOKEN_IDS[data.PAD], dtype=np.int64)
        labels = np.full((len(features), width), data.IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(features), width), dtype=np.int64)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = f["input_ids"], f["labels"], 1
        if counts["batches"] >= warm_batches:
            counts["real"] += int(mask.sum())
            counts["computed"] += ids.size
        counts["batches"] += 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, targs, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
            synchronize(device)
            self.ends.append(time.perf_counter())

    timer = StepTimes()
    total_steps = -(-len(rows) // batch_size)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, max_steps=total_steps,
            learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
            logging_steps=10**9, save_strategy="no", report_to="none", disable_tqdm=True,
            train_sampling_strategy="sequential",  # the draw is already random; keep it equal to ours
            dataloader_num_workers=0, remove_unused_columns=False, seed=args.seed,
            use_cpu=device.type == "cpu", bf16=precision.name == "bf16", fp16=precision.name == "fp16")
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=pad_collate,
                          callbacks=[timer])
        result = trainer.train()
    seconds = timer.ends[-1] - timer.ends[warm_batches - 1]
    return {"seconds": seconds, "steps": len(timer.ends) - warm_batches, "real_tokens": counts["real"],
            "computed_tokens": counts["computed"], "final_loss": float(result.training_loss),
            "precision": precision.name, "vocab_size": int(config.vocab_size),
            **_peak_memory(device, baseline_rss)}


def worker_main(args: argparse.Namespace) -> int:
    """One recipe, one comparison, one round, in this fresh process; the result goes to --worker-result."""
    # Both workers import everything first, so neither's memory baseline counts the other's imports.
    from transformers import Trainer  # noqa: F401

    import model  # noqa: F401
    from training import resolve_device

    baseline_rss = _rss_bytes()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples, _, _ = usable_samples(args)
    warm, timed = draw(samples, args, args.worker_batch_size, args.worker_round)
    run = run_ours if args.worker == "ours" else run_trainer
    try:
        result = run(args, device, warm, timed, args.worker_batch_size, baseline_rss)
    except torch.OutOfMemoryError as exc:  # a result, not a crash: the recipe does not fit this device
        result = {"oom": True, "error": str(exc).splitlines()[0], **_peak_memory(device, baseline_rss)}
    Path(args.worker_result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------ the parent

def run_worker(args: argparse.Namespace, recipe: str, batch_size: int, round_index: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    device = args.device
    if device.startswith("cuda:"):  # the Trainer always takes the first visible GPU: make it the asked one
        env["CUDA_VISIBLE_DEVICES"], device = device.split(":", 1)[1], "cuda"
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--device", device,
                   "--model-shape", args.model_shape, "--compile", args.compile, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--max-length", str(args.max_length), "--seed", str(args.seed),
                   "--lr", str(args.lr),
                   *(["--data", args.data] if args.data else []),
                   *(["--tokens-per-batch", str(args.tokens_per_batch)] if args.tokens_per_batch else []),
                   *(["--threads", str(args.threads)] if args.threads else []),
                   "--worker", recipe, "--worker-batch-size", str(batch_size),
                   "--worker-round", str(round_index), "--worker-result", str(result_path)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode in (-9, 137):  # SIGKILL: on CPU, the kernel's out-of-memory killer
            return {"oom": True, "error": "killed (SIGKILL), most likely out of memory"}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise UserError(f"the {recipe} worker (batch {batch_size}, round {round_index}) failed:\n"
                            + "\n".join(tail))
        return json.loads(result_path.read_text())


def summarise(runs: list[dict[str, Any]], epoch_tokens: int) -> dict[str, Any]:
    """Totals over the rounds: tokens/s is all real tokens over all timed seconds."""
    if any(r.get("oom") for r in runs):
        return {"oom": True, "error": next(r["error"] for r in runs if r.get("oom")), "rounds": runs}
    seconds = sum(r["seconds"] for r in runs)
    real = sum(r["real_tokens"] for r in runs)
    computed = sum(r["computed_tokens"] for r in runs)
    tokens_per_second = real / seconds
    return {"tokens_per_second": tokens_per_second, "real_share": real / computed,
            "epoch_seconds": epoch_tokens / tokens_per_second,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs), "seconds": seconds,
            "steps": sum(r["steps"] for r in runs), "real_tokens": real, "computed_tokens": computed,
            "final_loss": runs[-1]["final_loss"], "vocab_size": runs[-1]["vocab_size"],
            "precision": runs[-1]["precision"], "compiled": runs[-1].get("compiled", False),
            "memory_kind": runs[-1]["memory_kind"], "rounds": runs}


def compare(args: argparse.Namespace, report: Callable[[dict[str, Any]], None] = lambda result: None
            ) -> dict[str, Any]:
    """Every batch size's comparison; `report` gets the result so far after each one (a run cut short by a
    time limit keeps what it finished)."""
    from training import describe_device, resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # so describe_device reports what the workers use
    samples, epoch, description = usable_samples(args)
    epoch_tokens = int(epoch.lengths(0).sum())
    needed = max(args.batch_size, 1) * (args.warmup + args.rounds * args.steps)
    if needed > len(samples):
        raise UserError(f"{len(samples)} samples are too few for --rounds {args.rounds} x --steps {args.steps} "
                        f"at --batch-size {args.batch_size}; lower them")
    config = shape_config(args.model_shape)
    comparisons: dict[str, Any] = {}
    result = {"date": time.strftime("%Y-%m-%d"), "device": describe_device(device), "torch": torch.__version__,
              "model_shape": args.model_shape,
              "architecture": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "intermediate_size", "vocab_size")},
              "settings": {"steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size,
                           "tokens_per_batch": args.tokens_per_batch, "max_length": args.max_length,
                           "compile": args.compile, "warmup": args.warmup, "seed": args.seed, "data": description},
              "epoch": {"samples": len(epoch.encoded(0)), "real_tokens": epoch_tokens},
              "comparisons": comparisons}
    for batch_size in sorted({1, args.batch_size}):
        runs: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in RECIPES}
        for round_index in range(args.rounds):
            order = RECIPES if round_index % 2 == 0 else RECIPES[::-1]  # ABBA: drift hits both alike
            for recipe in order:
                if any(r.get("oom") for r in runs[recipe]):
                    continue  # it did not fit once; it will not fit on the next samples either
                print(f"  batch {batch_size}, round {round_index + 1}/{args.rounds}: {recipe} ...", flush=True)
                runs[recipe].append(run_worker(args, recipe, batch_size, round_index))
        ours, theirs = summarise(runs["ours"], epoch_tokens), summarise(runs["trainer"], epoch_tokens)
        ratios = None
        if not ours.get("oom") and not theirs.get("oom"):
            ratios = {"tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"],
                      "epoch_seconds": ours["epoch_seconds"] / theirs["epoch_seconds"],
                      "peak_memory": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]}
        comparisons[str(batch_size)] = {"ours": ours, "trainer": theirs, "ratios": ratios}
        report(result)
    return result


def format_table(result: dict[str, Any]) -> str:
    device = result["device"]
    where = (f"{device['name']}, {device.get('total_memory_gb', '?')} GiB" if device["type"] == "cuda"
             else f"CPU {device['name']}, {device['threads']} threads")
    arch = result["architecture"]
    s = result["settings"]
    fitted = [r for c in result["comparisons"].values() for r in (c["ours"], c["trainer"]) if not r.get("oom")]
    precision = fitted[0]["precision"] if fitted else "?"
    memory_kind = fitted[0]["memory_kind"] if fitted else "?"
    lines = [
        f"this project's TrainStep vs the Hugging Face Trainer recipe, {result['date']}",
        f"device: {where}; precision {precision}; torch {result['torch']}",
        f"shape {result['model_shape']}: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, "
        f"{arch['num_attention_heads']}/{arch['num_key_value_heads']} heads, MLP {arch['intermediate_size']}; "
        f"vocabulary ours {data.VOCAB_SIZE}, Trainer {arch['vocab_size']:,}",
        f"data: {s['data']}; max_length {s['max_length']}; {s['rounds']} rounds x {s['steps']} timed steps per "
        f"recipe, alternating (ABBA), each after "
        + (f"{s['warmup']} random warm-up batches and one of the longest timed sample" if "warmup" in s
           else "1 warm-up step"),  # results written before --warmup existed
        f"epoch: {result['epoch']['samples']} samples, {result['epoch']['real_tokens']:,} real tokens; "
        f"tokens/s = real (non-padding) input tokens / timed wall seconds",
        "",
        f"{'batch':<6}{'recipe':<32}{'real tok/s':>11}{'real share':>11}{'s/epoch':>10}{'peak mem':>10}",
    ]
    for batch_size, c in result["comparisons"].items():
        ours_name = ("ours, packed rows" if s["tokens_per_batch"] and batch_size != "1"
                     else "ours, length-grouped" if batch_size != "1" else "ours")
        theirs_name = "HF Trainer, padded" if batch_size != "1" else "HF Trainer"
        if c["ours"].get("compiled"):
            ours_name += ", compiled"
        for name, r in ((ours_name, c["ours"]), (theirs_name, c["trainer"])):
            if r.get("oom"):
                lines.append(f"{batch_size:<6}{name:<32}{'out of memory':>24}")
                continue
            lines.append(f"{batch_size:<6}{name:<32}{r['tokens_per_second']:>11.1f}{r['real_share']:>10.1%}"
                         f"{r['epoch_seconds']:>10.0f}{r['peak_memory_bytes'] / 2**30:>8.2f}GB")
        q = c["ratios"]
        if q:
            lines.append(f"{'':<6}{'ours / Trainer':<32}{q['tokens_per_second']:>10.2f}x{'':>11}"
                         f"{q['epoch_seconds']:>9.2f}x{q['peak_memory']:>9.2f}x")
    fitted = {b: c for b, c in result["comparisons"].items() if not c["trainer"].get("oom") and c["ratios"]}
    missed = [f"batch {b}: {c['ratios']['tokens_per_second']:.2f}x the tokens/s, "
              f"{c['ratios']['peak_memory']:.2f}x the memory" for b, c in fitted.items()
              if c["ratios"]["tokens_per_second"] < 2 or c["ratios"]["peak_memory"] >= 1]
    goal = "met in every row where the Trainer fits" if not missed else "not met at " + "; ".join(missed)
    lines += ["", f"peak mem: {memory_kind}. Goal (>= 2x the Trainer's real tokens/s with less memory): {goal}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    problems = validate(args)
    if problems:
        raise UserError("; ".join(problems))
    if args.worker:
        return worker_main(args)
    print("running each recipe in its own process, alternating:", flush=True)

    def report(result: dict[str, Any]) -> None:
        batch_size, latest = next(reversed(result["comparisons"].items()))
        rates = ", ".join(f"{recipe} " + ("out of memory" if latest[recipe].get("oom") else
                                          f"{latest[recipe]['tokens_per_second']:.0f} real tok/s")
                          for recipe in RECIPES)
        print(f"  batch {batch_size} done: {rates}", flush=True)
        if args.json:
            throughput_report.write_json_atomic(args.json, result)

    result = compare(args, report)
    print()
    print(format_table(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
