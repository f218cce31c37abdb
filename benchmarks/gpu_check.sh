#!/usr/bin/env bash
# One prepared run of every check that needs a GPU, for a machine lent for a few minutes:
#   1. the benchmark on the real Qwen2.5-0.5B architecture (random weights: no download), fp16/bf16 path;
#   2. one full training epoch with the same settings, to compare its measured epoch_seconds with the
#      benchmark's projection (the goal: within 3%);
#   3. the side-by-side against the Hugging Face Trainer recipe.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (results and logs land in OUT_DIR, default gpu-results/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python}
common=(--device cuda --random-init)

nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

timeout 420 "$py" measure_throughput.py "${common[@]}" --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
timeout 900 "$py" trainloop_gpu_finetuned.py "${common[@]}" --epochs 1 --eval-tasks 10 \
    --throughput-json "$out/throughput.json" --output-dir "$out/train" 2>&1 | tr '\r' '\n' | tail -40 | tee "$out/train.log"
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
projected = json.loads((out / "throughput.json").read_text())["epoch_seconds"]
records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
measured = [r["epoch_seconds"] for r in records if r.get("kind") == "epoch"]
if measured:
    print(f"projected {projected:.1f} s, measured {measured[-1]:.1f} s: {measured[-1] / projected - 1:+.1%}")
PY
timeout 600 "$py" benchmarks/compare_hf_trainer.py --device cuda --model-shape qwen2.5-0.5b --steps 20 \
    --batch-size 8 --max-length 8192 --json "$out/compare.json" 2>&1 | tee "$out/compare.log"
