"""Is a packed row (several ARC samples in one sequence) exact, and which way of packing is fastest?

Several samples share one row; each must see only itself (block-diagonal causal attention) and its own
positions (0, 1, ... restarting per sample). transformers 5.x offers two ways to say this to Qwen2:

  * position_ids only, attention_mask=None: `masking_utils.find_packed_sequence_indices` sees the positions
    restart and builds the block-diagonal causal mask itself (sdpa/eager), and flash_attention_2 switches to
    its varlen kernel. Only when there is no KV cache: a training forward must pass `use_cache=False`,
    because Qwen2's config says use_cache=True and a cache turns the packing detection off.
  * an explicit 4-D boolean mask [B, 1, T, T] (True = attend), which transformers passes through untouched.

This script checks both against each sample run alone (max |logit difference| over real tokens) and times a
forward + backward of the same samples packed, padded into a batch, and one at a time. CPU, fp32.

    python benchmarks/packing_attention.py --shape tiny
    python benchmarks/packing_attention.py --shape mid --repeats 2 --json packing.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# Hidden sizes of the Qwen2.5-0.5B architecture (hidden 896, 14 query / 2 key-value heads, MLP 4864) with
# fewer layers, and a 2-layer toy; both with the project's 16-symbol vocabulary.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
    "mid": dict(num_hidden_layers=4, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864),
}
# Lengths spread like ARC-AGI-2 leave-one-out samples (median ~750, mean ~1070 tokens).
DEFAULT_LENGTHS = "310,520,750,1100,1330"


def build_model(shape: str, attn_implementation: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=16, max_position_embeddings=8192, tie_word_embeddings=True,
                         attn_implementation=attn_implementation, **SHAPES[shape])
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> [B, 1, T, T] bool: attend to earlier tokens of the same segment only."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    return (same & causal)[:, None]


def make_inputs(lengths: list[int], row_length: int, seed: int = 0) -> dict[str, Any]:
    """Random token samples, packed into one row (pad at the end), padded into a batch, and alone."""
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 15, (n,), generator=generator) for n in lengths]
    total = sum(lengths)
    if total > row_length:
        raise SystemExit(f"error: the lengths add up to {total}, more than --row-length {row_length}")
    pad = row_length - total
    ids = torch.cat(samples + [torch.full((pad,), 15)])[None]
    # Padding gets its own run of positions (0..pad-1) and segment 0: it is a separate "sample" to every
    # mechanism, attends only to itself, and carries no label.
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(pad, dtype=torch.long)])[None]
    longest = max(lengths)
    padded_ids = torch.full((len(lengths), longest), 15)
    padded_mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, sample in enumerate(samples):
        padded_ids[row, :len(sample)] = sample
        padded_mask[row, :len(sample)] = 1
    return dict(samples=samples, ids=ids, positions=positions, segments=segments,
                padded_ids=padded_ids, padded_mask=padded_mask, pad=pad)


def packed_logits_error(packed: torch.Tensor, alone: list[torch.Tensor], lengths: list[int]) -> float:
    start, worst = 0, 0.0
    for logits, n in zip(alone, lengths):
        worst = max(worst, (packed[0, start:start + n] - logits[0]).abs().max().item())
        start += n
    return worst


def padded_logits_error(padded: torch.Tensor, alone: list[torch.Tensor], lengths: list[int]) -> float:
    return max((padded[row, :n] - logits[0]).abs().max().item()
               for row, (logits, n) in enumerate(zip(alone, lengths)))


def time_interleaved(model: Qwen2ForCausalLM, mechanisms: dict[str, list[Callable[[], torch.Tensor]]],
                     repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of forward + backward per mechanism (one call = one model forward). The
    mechanisms take turns within each round, so a slow spell of a shared CPU hits all of them alike; the
    process CPU time is the steadier figure when other jobs share the cores."""
    def once(calls: list[Callable[[], torch.Tensor]]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for call in calls:
            call().float().sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu
    for calls in mechanisms.values():
        once(calls)  # warm-up: allocator, kernel selection
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in mechanisms}
    for _ in range(repeats):
        for name, calls in mechanisms.items():
            seconds[name].append(once(calls))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in seconds.items()}


def run(shape: str, lengths: list[int], row_length: int, repeats: int) -> dict[str, Any]:
    data = make_inputs(lengths, row_length)
    model = build_model(shape, "sdpa")
    eager = build_model(shape, "eager")
    ids, pos, seg = data["ids"], data["positions"], data["segments"]
    mask4d = block_causal_mask(seg)

    def logits(m: Qwen2ForCausalLM, **kwargs: Any) -> torch.Tensor:
        return m(**kwargs).logits

    with torch.no_grad():
        alone = [logits(model, input_ids=s[None], use_cache=False) for s in data["samples"]]
        checks = {
            "sdpa, position_ids only, use_cache=False": packed_logits_error(
                logits(model, input_ids=ids, position_ids=pos, use_cache=False), alone, lengths),
            "sdpa, position_ids only, use_cache left at config default": packed_logits_error(
                logits(model, input_ids=ids, position_ids=pos), alone, lengths),
            "sdpa, explicit 4-D bool mask": packed_logits_error(
                logits(model, input_ids=ids, position_ids=pos, attention_mask=mask4d, use_cache=False),
                alone, lengths),
            "sdpa, position_ids + 2-D all-ones mask": packed_logits_error(
                logits(model, input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                       use_cache=False), alone, lengths),
            "eager, position_ids only, use_cache=False": packed_logits_error(
                logits(eager, input_ids=ids, position_ids=pos, use_cache=False),
                [logits(eager, input_ids=s[None], use_cache=False) for s in data["samples"]], lengths),
            "sdpa, padded batch with 2-D mask": padded_logits_error(
                logits(model, input_ids=data["padded_ids"], attention_mask=data["padded_mask"], use_cache=False),
                alone, lengths),
        }

    model.train()
    real = sum(lengths)
    timed = {
        "packed row, position_ids only": ([lambda: logits(model, input_ids=ids, position_ids=pos, use_cache=False)],
                                          ids.numel()),
        "packed row, explicit 4-D mask": ([lambda: logits(model, input_ids=ids, position_ids=pos,
                                                          attention_mask=mask4d, use_cache=False)], ids.numel()),
        "padded batch (2-D mask)": ([lambda: logits(model, input_ids=data["padded_ids"],
                                                    attention_mask=data["padded_mask"], use_cache=False)],
                                    data["padded_ids"].numel()),
        "one sample at a time": ([(lambda s=s: logits(model, input_ids=s[None], use_cache=False))
                                  for s in data["samples"]], real),
    }
    medians = time_interleaved(model, {name: calls for name, (calls, _) in timed.items()}, repeats)
    timings = {}
    for name, (_, computed) in timed.items():
        seconds, cpu_seconds = medians[name]
        timings[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "real_tokens_per_second": real / seconds,
                         "computed_tokens": computed, "real_share": real / computed}
    return {"shape": shape, "config": SHAPES[shape], "lengths": lengths, "row_length": row_length,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "max_abs_logit_error": checks, "fwd_bwd": timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default: tiny)")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"comma-separated sample lengths to pack (default: {DEFAULT_LENGTHS})")
    parser.add_argument("--row-length", type=int, default=4096, help="packed row length (default: 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per mechanism (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.shape, lengths, args.row_length, args.repeats)

    print(f"shape {args.shape} {SHAPES[args.shape]}, samples {lengths} packed into one row of {args.row_length}, "
          f"torch {torch.__version__}, {result['threads']} threads")
    print("\nmax |logit difference| against each sample run alone (fp32):")
    for name, error in result["max_abs_logit_error"].items():
        print(f"  {name:<58} {error:.2e}")
    print("\nforward + backward of all samples (median):")
    print(f"  {'mechanism':<34} {'wall s':>8} {'CPU s':>8} {'real tok/s':>11} {'real share':>11}")
    for name, row in result["fwd_bwd"].items():
        print(f"  {name:<34} {row['seconds']:>8.3f} {row['cpu_seconds']:>8.3f} "
              f"{row['real_tokens_per_second']:>11.0f} {row['real_share']:>10.1%}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
