#!/usr/bin/env bash
# Every check that needs a GPU, sized for a machine lent for a few minutes (10 minutes a command), in two
# stages, each capped by timeouts inside 10 minutes (run them back to back while the machine is warm):
#   speed    the benchmark on the real Qwen2.5-0.5B architecture (random weights: no download), then one full
#            training epoch with the same settings, and how far its measured epoch_seconds landed from the
#            benchmark's projection (issue 4's goal: within 3%); also the evaluation time per test input.
#   compare  compare_hf_trainer.py against the Hugging Face Trainer recipe at batch size 1 and 4, max length
#            8192 (issue 6's goal: >= 2x the real tokens/s with less memory; at batch size 8 the Trainer
#            recipe ran out of memory on a 139.8 GiB H200).
#   compile  the benchmark with --compile off and on (COMPILE_BATCHES, 150), then compare_hf_trainer with ours
#            compiled at batch size 1 and 4 (--compile off if the compiled benchmark did not finish).
#   variants the benchmark (100 batches) as on a T4, fp16 autocast + GradScaler in --gpu-memory 14.7 (does the
#            longest sample fit with --checkpoint-long-batches auto?), and at --batch-size 8 (length-grouped:
#            more tokens per step for GPUs that a batch of one leaves idle).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [speed|compare|compile|variants|all]
# Each step's cap in seconds can be set: BENCH_TIMEOUT (200), TRAIN_TIMEOUT (330), COMPARE_TIMEOUT (500),
# VARIANT_TIMEOUT (150 each).
# On a machine without this project's pins (no network): run benchmarks/device_wheels.sh where pip works,
# carry .whl/, and this script installs it first. DEVICE=cpu MODEL_ARGS="--model-name tiny" EXTRA="..."
# COMPARE_ARGS="..." rehearse the flow on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [speed|compare|compile|variants|all]}
stage=${2:-all}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
device=${DEVICE:-cuda}
read -r -a common <<< "--device $device ${MODEL_ARGS:---random-init} ${EXTRA:-}"
train_dir=${TRAIN_DIR:-/tmp/gpu_check_train}   # checkpoints of a 0.5B model are GBs: not under OUT

{ nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, transformers; from torch.utils._triton import has_triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'triton', __import__('triton').__version__ if has_triton() else None)"; } | tee "$out/versions.txt"

if [[ $stage == speed || $stage == all ]]; then
    timeout "${BENCH_TIMEOUT:-200}" "$py" measure_throughput.py "${common[@]}" --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
    rm -rf "$train_dir"
    timeout "${TRAIN_TIMEOUT:-330}" "$py" trainloop_gpu_finetuned.py "${common[@]}" --epochs 1 --eval-tasks 10 \
        --throughput-json "$out/throughput.json" --output-dir "$train_dir" 2>&1 \
        | tr '\r' '\n' | grep -v '^Epoch .*Training: *[0-9]' | tee "$out/train.log"
    cp "$train_dir/metrics.jsonl" "$out/" 2>/dev/null
    "$py" - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
projected = json.loads((out / "throughput.json").read_text())["epoch_seconds"]
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
epochs = [r for r in records if r.get("kind") == "epoch"]
if epochs:
    measured = epochs[-1]["epoch_seconds"]
    print(f"epoch: projected {projected:.1f} s, measured {measured:.1f} s: {measured / projected - 1:+.2%}")
    evals = [r for r in records if "eval_seconds" in r]
    if evals:
        print(f"evaluation: {evals[-1]['eval_seconds']:.1f} s for {evals[-1].get('eval_inputs', '?')} test inputs")
else:
    print("no epoch finished: see train.log")
PY
fi
if [[ $stage == compare || $stage == all ]]; then
    read -r -a compare <<< "${COMPARE_ARGS:---model-shape qwen2.5-0.5b --steps 10 --batch-size 4 --max-length 8192}"
    timeout "${COMPARE_TIMEOUT:-500}" "$py" benchmarks/compare_hf_trainer.py --device "$device" "${compare[@]}" \
        --json "$out/compare.json" 2>&1 | tee "$out/compare.log"
fi
if [[ $stage == compile ]]; then
    for mode in off on; do
        timeout "${BENCH_TIMEOUT:-200}" "$py" measure_throughput.py "${common[@]}" --compile $mode \
            --num-batches "${COMPILE_BATCHES:-150}" --json "$out/throughput_compile_$mode.json" 2>&1 \
            | tee "$out/throughput_compile_$mode.log"
    done
    mode=on; [[ -s $out/throughput_compile_on.json ]] || mode=off
    read -r -a compare <<< "${COMPARE_ARGS:---model-shape qwen2.5-0.5b --steps 10 --batch-size 4 --max-length 8192}"
    timeout "${COMPARE_TIMEOUT:-500}" "$py" benchmarks/compare_hf_trainer.py --device "$device" "${compare[@]}" \
        --compile $mode --json "$out/compare.json" 2>&1 | tee "$out/compare.log"
fi
if [[ $stage == variants || $stage == all ]]; then
    for variant in "t4:--precision fp16 --gpu-memory 14.7" "batch8:--batch-size 8"; do
        timeout "${VARIANT_TIMEOUT:-150}" "$py" measure_throughput.py "${common[@]}" ${variant#*:} --num-batches 100 \
            --json "$out/throughput_${variant%%:*}.json" 2>&1 | tee "$out/throughput_${variant%%:*}.log"
    done
fi
