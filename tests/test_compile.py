"""--compile on CPU (inductor's C++ backend): compiled decoder blocks train exactly like eager ones, keep the
checkpoint layout, generate uncompiled, and compile before the benchmark's timed window, not in it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import arc_dataset as data
import measure_throughput as mt
from errors import UserError
from model import (ModelSettings, compile_decoder_layers, decoder_layers, generate_token_batch, load_model)
from training import (FP32, TrainStep, build_optimizer, build_scheduler, one_batch_per_graph_variant,
                      resolve_compile)


def _samples(count: int, seed: int = 0) -> list[data.Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        side = 2 + i % 4
        grid = lambda: rng.integers(0, 10, (side, side))  # noqa: E731
        samples.append(data.Sample(f"t{i}", 0, ((grid(), grid()),), grid(), grid()))
    return samples


def _batches(batch_size: int = 1, tokens_per_batch: int | None = None) -> list[data.Batch]:
    settings = data.DataSettings(max_length=256, batch_size=batch_size, tokens_per_batch=tokens_per_batch,
                                 augment=False, seed=0)
    return list(data.TrainingData(_samples(6), settings).batches(0))


def _step(compiled: bool) -> TrainStep:
    torch.manual_seed(0)
    model = load_model(ModelSettings("tiny"))
    if compiled:
        assert compile_decoder_layers(model) == 2
    optimizer = build_optimizer(model, lr=1e-3)
    return TrainStep(model, optimizer, build_scheduler(optimizer, 100, 0), FP32, torch.device("cpu"))


def test_auto_compiles_on_cuda_with_triton_only(monkeypatch):
    import torch.utils._triton as triton_check

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_compile(cpu, "auto") and not resolve_compile(cpu, "off") and resolve_compile(cpu, "on")
    monkeypatch.setattr(triton_check, "has_triton", lambda: True)
    assert resolve_compile(cuda, "auto") and not resolve_compile(cuda, "off")
    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    assert not resolve_compile(cuda, "auto")
    with pytest.raises(UserError, match="needs Triton"):
        resolve_compile(cuda, "on")


def test_compiled_blocks_train_like_eager_ones_and_save_the_same_weights():
    batches = _batches(1)[:3] + _batches(2)[:2]  # single rows, then padded pairs: two graph variants
    eager, compiled = _step(False), _step(True)
    eager_losses = [float(eager(b).loss) for b in batches]
    compiled_losses = [float(compiled(b).loss) for b in batches]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    eager_state, compiled_state = eager.model.state_dict(), compiled.model.state_dict()
    assert list(compiled_state) == list(eager_state)  # Module.compile keeps the parameter names
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-3, atol=1e-5)


def test_generation_runs_the_blocks_uncompiled_and_leaves_them_compiled():
    step = _step(True)
    step(_batches(1)[0])
    layers = decoder_layers(step.model)
    seen = []
    hook = layers[0].register_forward_pre_hook(lambda module, args: seen.append(module._compiled_call_impl))
    prompt = torch.tensor([data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT])
    tokens = generate_token_batch(step.model, [prompt], max_new_tokens=4)
    hook.remove()
    assert seen and all(impl is None for impl in seen)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    reference = _step(False)
    reference.model.load_state_dict(step.model.state_dict())
    assert generate_token_batch(reference.model, [prompt], max_new_tokens=4) == tokens


def test_one_batch_per_graph_variant():
    step = _step(False)
    batches = _batches(1) + _batches(2) + _batches(tokens_per_batch=256) + _batches(1)
    chosen = one_batch_per_graph_variant(step, batches)
    variants = [step.graph_variant(b) for b in batches]
    assert [step.graph_variant(b) for b in chosen] == list(dict.fromkeys(variants))  # each first one, in order
    assert {v[:3] for v in variants} >= {(False, False, False), (True, False, True), (False, True, False)}
    assert all(batches[variants.index(step.graph_variant(b))] is b for b in chosen)
    single = _batches(1)
    step.checkpoint_above = max(b.input_ids.numel() for b in single) - 1  # the longest single row recomputes
    assert [v[3] for v in map(step.graph_variant, one_batch_per_graph_variant(step, single))] == [False, True]


def test_the_benchmark_compiles_before_its_timed_window(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for t in range(4):
        grid = lambda: rng.integers(0, 10, (2 + t, 2 + t)).tolist()  # noqa: E731
        (folder / f"task{t}.json").write_text(json.dumps(
            {"train": [{"input": grid(), "output": grid()} for _ in range(3)],
             "test": [{"input": grid(), "output": grid()}]}))
    args = mt.parse_args(["--model-name", "tiny", "--device", "cpu", "--data", str(folder), "--compile", "on",
                          "--batch-size", "2", "--num-batches", "6", "--warmup", "0"])
    s = mt.setup(args)
    assert s.compiled
    assert len(mt.compile_graph_variants(s)[0]) >= 2  # padded pairs and the odd one out at the epoch's end
    graphs = counters["stats"]["unique_graphs"]
    timings = mt.time_batches(s, 0, 6)
    assert len(timings.batch_ms) == 6 and timings.startup_seconds > 0
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while timing
