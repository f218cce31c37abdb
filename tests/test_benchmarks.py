"""Smoke tests of the scripts in benchmarks/: they run, and what they claim about packing holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_hf_trainer  # noqa: E402
import packing_attention  # noqa: E402
from errors import UserError  # noqa: E402


def test_packed_rows_match_each_sample_alone_and_a_kv_cache_breaks_the_detection() -> None:
    result = packing_attention.run("tiny", [40, 60, 30], row_length=140, repeats=1)
    errors = result["max_abs_logit_error"]
    for name in ("sdpa, position_ids only, use_cache=False", "sdpa, explicit 4-D bool mask",
                 "eager, position_ids only, use_cache=False", "sdpa, padded batch with 2-D mask"):
        assert errors[name] < 1e-4, (name, errors[name])
    # transformers only infers packing from position_ids without a cache and without a 2-D mask: a plain
    # model(...) call (Qwen2's config says use_cache=True) lets samples attend to each other.
    assert errors["sdpa, position_ids only, use_cache left at config default"] > 1e-2
    assert errors["sdpa, position_ids + 2-D all-ones mask"] > 1e-2
    timings = result["fwd_bwd"]
    assert timings["packed row, position_ids only"]["real_share"] == pytest.approx(130 / 140)
    assert timings["padded batch (2-D mask)"]["real_share"] == pytest.approx(130 / 180)


@pytest.mark.slow  # four fresh worker processes: ~25-40 s on 2 cores
def test_compare_hf_trainer_runs_both_recipes_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_hf_trainer.py"), "--device", "cpu",
         "--model-shape", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "1", "--batch-size", "2",
         "--max-length", "512", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "HF Trainer, padded" in proc.stdout and "ours / Trainer" in proc.stdout
    # Each batch size is reported (and the JSON rewritten) when it finishes, so a run cut short keeps it.
    assert proc.stdout.index("batch 1 done: ours ") < proc.stdout.index("batch 2, round 1/1")
    result = json.loads(out.read_text())
    assert set(result["comparisons"]) == {"1", "2"}
    for comparison in result["comparisons"].values():
        ours, theirs = comparison["ours"], comparison["trainer"]
        assert ours["vocab_size"] == 16 and theirs["vocab_size"] == 151936
        assert ours["real_tokens"] == theirs["real_tokens"] > 0  # the very same samples
        assert ours["tokens_per_second"] > 0 and theirs["peak_memory_bytes"] > 0
        assert comparison["ratios"]["tokens_per_second"] == pytest.approx(
            ours["tokens_per_second"] / theirs["tokens_per_second"])
    assert result["comparisons"]["1"]["trainer"]["real_share"] == 1.0
    assert result["comparisons"]["2"]["trainer"]["real_share"] < 1.0  # padding


def test_compare_hf_trainer_warms_both_recipes_up_on_the_longest_timed_sample() -> None:
    args = compare_hf_trainer.build_parser().parse_args(["--steps", "5", "--warmup", "2", "--max-length", "512"])
    samples, _, _ = compare_hf_trainer.usable_samples(args)
    warm, timed = compare_hf_trainer.draw(samples, args, batch_size=3, round_index=1)
    assert len(timed) == 15 and len(warm) == 2 * 3 + 3
    keys = lambda group: {(s.task_id, s.index) for s in group}  # noqa: E731
    assert not keys(warm[:6]) & keys(timed)  # random warm-up samples are not timed ones
    lengths = {(e.task_id, e.index): len(e.input_ids) for e in compare_hf_trainer.encoded(timed, args)}
    assert [lengths[(s.task_id, s.index)] for s in warm[6:]] == [max(lengths.values())] * 3


def test_compare_hf_trainer_rejects_bad_flags_before_loading_anything() -> None:
    with pytest.raises(UserError, match="tokens-per-batch"):
        compare_hf_trainer.main(["--tokens-per-batch", "100", "--max-length", "512", "--batch-size", "2"])


def test_gpu_check_rehearses_its_speed_stage_on_cpu(tmp_path: Path) -> None:
    """The script a GPU lease runs, rehearsed as its header says: benchmark, one epoch, the summary."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL_ARGS": "--model-name tiny",
           "EXTRA": f"--data {ROOT / 'data' / 'examples' / 'tasks.json'} --max-length 512",
           "TRAIN_DIR": str(tmp_path / "train"), "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "speed"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "throughput.json").read_text())["device"]["type"] == "cpu"
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("epoch: projected ") and "evaluation: " in summary
    assert not (out / "compare.json").exists()  # the compare stage was not asked for
