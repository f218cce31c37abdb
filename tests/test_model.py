"""model.py on CPU: loading (real from_pretrained path on a local tiny checkpoint), the compact vocabulary,
saving, LoRA, packed attention, generation and the FLOP count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import arc_dataset as data
import model as M
import training as T
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# A byte-level vocabulary like Qwen's ("Ċ" is the newline), ordered so that no symbol keeps its compact id.
PRETRAINED_TOKENS = ["<unk>", "a", "7", "Ċ", "b", "3", "I", "0", "1", "2", "O", "4", "5", "6", "8", "9", "cd",
                     "<|endoftext|>", "<|im_end|>"]
ENDOFTEXT, IM_END = 17, 18


def save_pretrained_checkpoint(folder: Path, tied: bool) -> torch.nn.Module:
    """A tiny Qwen2 'pretrained' checkpoint plus a locally built tokenizer, as a Hub download would look."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    vocab = {token: i for i, token in enumerate(PRETRAINED_TOKENS)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    config = Qwen2Config(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         bos_token_id=ENDOFTEXT, eos_token_id=IM_END)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config)
    original.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return original


def expected_source_ids() -> list[int]:
    """Pretrained id per compact symbol: spelled symbols through the vocabulary, then bos (the config's,
    since the tokenizer has none), eos and pad from the tokenizer."""
    index = {token: i for i, token in enumerate(PRETRAINED_TOKENS)}
    spelled = [index[str(d)] for d in range(10)] + [index["Ċ"], index["I"], index["O"]]
    return spelled + [ENDOFTEXT, IM_END, ENDOFTEXT]


def make_batch(rows: list[list[int]], target_start: int) -> data.Batch:
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :target_start] = data.IGNORE_INDEX
    positions = torch.arange(ids.shape[1]).expand_as(ids).clone()
    return data.Batch(ids, labels, positions, None, None, ids.numel(), int((labels != data.IGNORE_INDEX).sum()),
                      [("t", i) for i in range(len(rows))])


@pytest.fixture
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return M.load_model(M.ModelSettings("tiny"))


def test_tiny_preset_is_a_compact_tied_qwen2_with_sdpa(tiny):
    assert type(tiny).__name__ == "Qwen2ForCausalLM"
    assert tiny.config.vocab_size == data.VOCAB_SIZE == 16
    assert tiny.config.num_hidden_layers == 2 and tiny.config.hidden_size == 64
    assert tiny.config._attn_implementation == "sdpa"
    assert tiny.get_input_embeddings().weight is tiny.get_output_embeddings().weight
    assert tiny(input_ids=torch.tensor([[data.BOS, data.INPUT, 3]])).logits.shape == (1, 3, 16)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pretrained_load_slices_rows_from_the_tokenizers_tokens(tmp_path, tied):
    original = save_pretrained_checkpoint(tmp_path, tied)
    model = M.load_model(M.ModelSettings(str(tmp_path)))
    source = expected_source_ids()

    assert model.config.vocab_size == 16 and model.config.tie_word_embeddings == tied
    assert model.config.eos_token_id == data.EOS
    assert torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight[source])
    assert torch.equal(model.get_output_embeddings().weight, original.get_output_embeddings().weight[source])
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    if not tied:  # the untied output rows really are the output layer's own, not the embedding's
        assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    # The compact model computes exactly what the full one does on those tokens, restricted to them.
    compact_ids = torch.tensor([[data.BOS, data.INPUT, 3, 1, data.ROW_END, data.OUTPUT, 7, data.EOS]])
    full_ids = torch.tensor(source)[compact_ids]
    with torch.no_grad():
        expected = original(input_ids=full_ids).logits[..., source]
        got = model(input_ids=compact_ids).logits
    torch.testing.assert_close(got, expected)


def test_tokenizer_that_cannot_spell_a_symbol_is_a_user_error():
    class NoNewline:
        bos_token_id, eos_token_id, pad_token_id = None, 1, 1

        def encode(self, text, add_special_tokens=False):
            return [] if text == "\n" else [2]

    class Config:
        bos_token_id = eos_token_id = 1

    with pytest.raises(UserError, match="cannot spell"):
        M.symbol_token_ids(NoNewline(), Config())


def test_unfetchable_model_names_it_and_the_offline_alternatives():
    code = ("import model, errors\n"
            "try:\n    model.load_model(model.ModelSettings('Qwen/Qwen2.5-7B-Instruct'))\n"
            "except errors.UserError as e:\n    print('USER:', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(ROOT / ".pytest_cache" / "empty-hf-home"))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    line = [l for l in result.stdout.splitlines() if l.startswith("USER:")]
    assert len(line) == 1, result.stdout + result.stderr
    assert "'Qwen/Qwen2.5-7B-Instruct'" in line[0] and "HF_HUB_OFFLINE" in line[0]
    assert "--random-init" in line[0] and "local" in line[0] and "tiny" in line[0]


def test_random_init_without_a_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no bundled config.*tiny"):
        M.load_model(M.ModelSettings(str(tmp_path / "missing"), random_init=True))


def test_bundled_configs_cover_the_guides_models():
    from transformers import AutoConfig
    bundled = M.bundled_configs()
    for name in ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen1.5-0.5B",
                 "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen3-0.6B"]:
        config = AutoConfig.for_model(**json.loads(bundled[name].read_text()))
        assert config.model_type in ("qwen2", "qwen3") and config.vocab_size == 151936


def test_random_init_builds_the_real_architecture_with_the_compact_vocabulary():
    model = M.load_model(M.ModelSettings("Qwen/Qwen2.5-0.5B-Instruct", random_init=True))
    total, trainable = M.count_parameters(model)
    # 494M with the full vocabulary; 151936 - 16 rows of 896 go (tied: one matrix).
    assert total == trainable == 494_032_768 - (151_936 - 16) * 896
    assert model.config._attn_implementation == "sdpa" and model.config.vocab_size == 16


def test_save_and_load_round_trip_is_exact_and_atomic(tmp_path, tiny):
    ids = torch.tensor([[data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 2, 1, data.ROW_END]])
    target = tmp_path / "final"
    M.save_model(tiny, target, {"lr": 0.001, "model_name": "tiny"})
    M.save_model(tiny, target, {"lr": 0.002, "model_name": "tiny"})  # replaces the folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp or old folders left
    assert {"config.json", "model.safetensors", M.VOCAB_FILE, M.SETTINGS_FILE} <= {p.name for p in target.iterdir()}
    assert M.load_run_settings(target)["lr"] == 0.002

    loaded = M.load_saved_model(target)
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tiny(input_ids=ids).logits)
    # A saved folder is also a valid --model-name.
    again = M.load_model(M.ModelSettings(str(target)))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, tiny(input_ids=ids).logits)


def test_loading_a_folder_that_is_not_a_saved_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a saved ARC model"):
        M.load_saved_model(tmp_path)


def lora_model(rank: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return M.load_model(M.ModelSettings("tiny", lora_rank=rank))


def test_lora_trains_only_adapters_and_the_compact_vocabulary():
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "embed_tokens" in n for n in trainable), trainable
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = T.build_optimizer(model, lr=1e-2)
    step = T.TrainStep(model, optimizer, T.build_scheduler(optimizer, 10, 0), T.FP32, torch.device("cpu"))
    batch = make_batch([[data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 2, 1, data.ROW_END, data.EOS]], 6)
    for _ in range(2):  # two steps: lora_A only gets a gradient once lora_B has left zero
        step(batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_lora_model_saves_merged_and_leaves_the_live_model_alone(tmp_path):
    model = lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    ids = torch.tensor([[data.BOS, data.INPUT, 4, 5, data.ROW_END, data.OUTPUT]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    M.save_model(model, tmp_path / "lora", {})
    assert M.is_lora(model) and any("lora_A" in n for n, _ in model.named_parameters())
    loaded = M.load_saved_model(tmp_path / "lora")
    assert not M.is_lora(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(attn):
    torch.manual_seed(0)
    model = M.load_model(M.ModelSettings("tiny", attn_implementation=attn)).eval()
    first = [data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 3]
    second = [data.BOS, data.INPUT, 7, data.ROW_END, data.OUTPUT]
    padding = [data.PAD] * 3
    row = torch.tensor([first + second + padding])
    positions = torch.tensor([list(range(7)) + list(range(5)) + list(range(3))])
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    packed = data.Batch(row, row.clone(), positions, None, segments, 12, 0, [])
    with torch.no_grad():
        logits = model(**M.model_inputs(packed, attn)).logits[0]
        alone_1 = model(input_ids=torch.tensor([first])).logits[0]
        alone_2 = model(input_ids=torch.tensor([second])).logits[0]
    assert torch.isfinite(logits).all()  # padding rows are not fully masked
    torch.testing.assert_close(logits[:7], alone_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[7:12], alone_2, rtol=1e-5, atol=1e-5)
    # Without the mask the second sample would see the first: the test can tell the difference.
    with torch.no_grad():
        leaky = model(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row)).logits[0]
    assert not torch.allclose(leaky[7:12], alone_2, atol=1e-4)


def test_padded_batch_logits_equal_single_sample_logits(tiny):
    tiny.eval()
    long = [data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 3, 4]
    short = [data.BOS, data.INPUT, 5, data.ROW_END, data.OUTPUT]
    ids = torch.tensor([long, short + [data.PAD] * 3])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = data.Batch(ids, ids.clone(), torch.arange(8).expand(2, 8).clone(), mask, None, 13, 0, [])
    with torch.no_grad():
        logits = tiny(**M.model_inputs(batch)).logits
        torch.testing.assert_close(logits[1, :5], tiny(input_ids=torch.tensor([short])).logits[0],
                                   rtol=1e-5, atol=1e-5)


def test_training_inputs_skip_transformers_mask_building_that_syncs_the_host(tiny, monkeypatch):
    """Left to build the mask, transformers reads a device value back on every forward (is this packed? is
    anything padded?), a GPU stall per step. Single, padded and packed rows all arrive with the mask prepared,
    and give the logits transformers' own mask gives."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    built = []
    real_builder = qwen2.create_causal_mask
    monkeypatch.setattr(qwen2, "create_causal_mask", lambda **kw: built.append(1) or real_builder(**kw))
    long = [data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 3, data.EOS]
    short = [data.BOS, data.INPUT, 5, data.ROW_END, data.OUTPUT, 6, data.EOS]
    single = data.Batch(torch.tensor([long]), torch.tensor([long]), torch.arange(8)[None], None, None, 8, 2, [])
    padded = data.Batch(torch.tensor([long, short + [data.PAD]]), torch.tensor([long, short + [data.PAD]]),
                        torch.arange(8).expand(2, 8).clone(), torch.tensor([[1] * 8, [1] * 7 + [0]]), None, 15, 4, [])
    packed = data.Batch(torch.tensor([long + short]), torch.tensor([long + short]),
                        torch.tensor([list(range(8)) + list(range(7))]), None, torch.tensor([[1] * 8 + [2] * 7]),
                        15, 4, [])
    tiny.eval()
    with torch.no_grad():
        ours = [tiny(**M.model_inputs(b, M.attention_implementation(tiny), M.attention_layer_types(tiny))).logits
                for b in (single, padded, packed)]
        assert not built
        reference = [tiny(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in (single, padded)]
        assert built  # the builder is the one the model calls, so the assertion above can fail
        separate = [tiny(input_ids=torch.tensor([ids])).logits[0] for ids in (long, short)]
    torch.testing.assert_close(ours[0], reference[0])
    torch.testing.assert_close(ours[1][0], reference[1][0])
    torch.testing.assert_close(ours[1][1, :7], reference[1][1, :7])
    torch.testing.assert_close(ours[2][0], torch.cat(separate), rtol=1e-5, atol=1e-5)
    # A config that does not list its layer kinds may not take prepared masks: the plain forms instead.
    assert M.model_inputs(padded, "sdpa", frozenset())["attention_mask"] is padded.attention_mask
    assert "attention_mask" not in M.model_inputs(single, "sdpa", frozenset())


def test_batched_decoding_matches_each_prompt_alone(tiny):
    """Left-padded rows with their mask and positions decode exactly as each prompt does by itself."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.tensor([data.BOS, data.INPUT, *torch.randint(0, 10, (n,), generator=g).tolist(),
                             data.ROW_END, data.OUTPUT]) for n in (6, 17, 33, 50)]
    batched = M.generate_token_batch(tiny, prompts, 60)
    assert batched == [M.generate_tokens(tiny, p, 60) for p in prompts]
    assert all(len(tokens) > 10 for tokens in batched)


class _ScriptedDecoder(torch.nn.Module):
    """A stand-in model whose row r writes a 1 x widths[r] grid then EOS: rows finish at different steps."""

    def __init__(self, widths):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.widths = widths
        self.calls = 0

    def forward(self, input_ids, use_cache=True, cache=None, attention_mask=None, position_ids=None):
        step = 0 if cache is None else cache + 1
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], data.VOCAB_SIZE)
        for row, width in enumerate(self.widths):
            token = 7 if step < width else data.ROW_END if step == width else data.EOS
            logits[row, -1, token] = 1.0
        return types.SimpleNamespace(logits=logits, cache=step)


def test_batched_decoding_stops_each_row_on_its_own_and_the_batch_when_all_are_done():
    decoder = _ScriptedDecoder([1, 4, 2])
    prompts = [torch.tensor([data.BOS, data.OUTPUT]), torch.tensor([data.BOS, data.INPUT, 3, data.OUTPUT]),
               torch.tensor([data.OUTPUT])]
    tokens = M.generate_token_batch(decoder, prompts, 100)
    assert tokens == [[7, data.ROW_END, data.EOS], [7] * 4 + [data.ROW_END, data.EOS], [7, 7, data.ROW_END, data.EOS]]
    assert decoder.calls == 6  # the prompt, then one step per token until the longest row's EOS
    assert [None if g is None else g.tolist() for g in M.generate_grids(decoder, prompts, 100)] == \
        [[[7]], [[7, 7, 7, 7]], [[7, 7]]]
    assert M.generate_grids(_ScriptedDecoder([3]), prompts[:1], 3) == [None]  # cut off before EOS: malformed


def test_greedy_generation_with_the_cache_matches_recomputing_and_stays_in_the_grid_alphabet(tiny):
    prompt = torch.tensor([data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT])
    tokens = M.generate_tokens(tiny, prompt, max_new_tokens=40)
    assert 0 < len(tokens) <= 40
    assert all(t < 10 or t in (data.ROW_END, data.EOS) for t in tokens)
    ids = prompt.tolist()
    with torch.no_grad():  # the slow way: re-run the whole sequence for every token
        for _ in tokens:
            logits = tiny(input_ids=torch.tensor([ids])).logits[0, -1]
            logits[~M.GENERATABLE] = -float("inf")
            ids.append(int(logits.argmax()))
    assert ids[len(prompt):] == tokens
    assert tiny.training  # generation restores the mode it found


def test_generation_is_capped_at_the_largest_grid(tiny, monkeypatch):
    never_eos = M.GENERATABLE.clone()
    never_eos[data.EOS] = False
    monkeypatch.setattr(M, "GENERATABLE", never_eos)
    prompt = torch.tensor([data.BOS, data.INPUT, 1, data.ROW_END, data.OUTPUT])
    assert len(M.generate_tokens(tiny, prompt, 10_000)) <= M.MAX_GRID_TOKENS == 931
    assert M.generate_grid(tiny, prompt, 5) is None  # no EOS: malformed


def test_grid_grammar_stops_at_the_first_token_that_cannot_make_a_grid():
    def first_rejected(tokens):
        grammar = M.GridGrammar()
        return next((i for i, t in enumerate(tokens) if not grammar.accepts(t)), None)

    R, E = data.ROW_END, data.EOS
    assert first_rejected([1, 2, R, 3, 4, R, E]) is None           # a 2x2 grid
    assert first_rejected([1, 2, R, 3, R]) == 4                      # ragged row
    assert first_rejected([1, 2, R, 3, 4, 5]) == 5                   # row longer than the first
    assert first_rejected([R]) == 0                                  # empty row
    assert first_rejected([1, 2, E]) == 2                            # EOS inside a row
    assert first_rejected([E]) == 0                                  # no rows at all
    assert first_rejected([7] * 31) == 30                            # wider than 30
    assert first_rejected([7, R] * 31) == 61                         # taller than 30
    assert first_rejected([7] * 30 + [R]) is None


def test_generated_tokens_decode_with_the_data_modules_decoder():
    grid = data.decode_grid([1, 2, data.ROW_END, 3, 4, data.ROW_END, data.EOS])
    assert grid.dtype == np.uint8 and grid.tolist() == [[1, 2], [3, 4]]
    for bad in ([1, 2, data.ROW_END, 3, data.ROW_END], [1, 2], [data.ROW_END], [1, data.INPUT, data.ROW_END]):
        with pytest.raises(ValueError):
            data.decode_grid(bad)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch([[data.BOS, data.INPUT, 1, 2, data.ROW_END, data.OUTPUT, 2, 1, data.ROW_END, data.EOS]], 6)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = M.load_model(M.ModelSettings("tiny", gradient_checkpointing=checkpointing))
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        T.forward_loss(model, batch, T.FP32).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_parameter_count_and_flops(tiny):
    total, trainable = M.count_parameters(tiny)
    assert total == trainable == sum(p.numel() for n, p in tiny.named_parameters())  # tied matrix once
    assert total == 16 * 64 + 2 * (4 * 64 * 64 + 3 * 64 + 3 * 64 * 256 + 2 * 64) + 64
    assert M.flops_per_token(tiny, 100) == 6 * total + 12 * 2 * 4 * 16 * 100
    lora = lora_model()
    assert M.count_parameters(lora)[1] < M.count_parameters(lora)[0]


def test_settings_from_the_shared_flags():
    import argparse
    import cli_common
    parser = argparse.ArgumentParser()
    cli_common.add_shared_args(parser)
    args = parser.parse_args(["--model-name", "tiny", "--lora-rank", "8", "--gradient-checkpointing",
                              "--attn-implementation", "eager"])
    assert M.ModelSettings.from_args(args) == M.ModelSettings("tiny", lora_rank=8, gradient_checkpointing=True,
                                                              attn_implementation="eager")
