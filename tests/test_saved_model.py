"""The saved model folder as users and other tools meet it: plain transformers with its own tokenizer, a
saved folder as --model-name (test-time training of a model trained before), damaged folders as one-line
errors (pickles never unpickled), and a model id the hub cannot give failing in seconds, not minutes."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import arc_dataset as data
import model as M
import trainloop_gpu_finetuned as trainloop
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GRID_A = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
GRID_B = np.array([[6, 5, 4], [3, 2, 1]], dtype=np.uint8)
QUERY = np.array([[0, 9], [9, 0]], dtype=np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = M.load_model(M.ModelSettings("tiny"))
    folder = M.save_model(model, tmp_path_factory.mktemp("saved") / "model", {"model_name": "tiny"})
    return folder, model


def grid_text(grid: np.ndarray) -> str:
    return "".join("".join(str(c) for c in row) + "\n" for row in grid.tolist())


def test_plain_transformers_loads_the_model_and_a_tokenizer_of_its_vocabulary(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    folder, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == model.config.vocab_size == model.get_input_embeddings().num_embeddings == 16
    assert tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]) == list(range(10))
    assert tokenizer("\n")["input_ids"] == [data.ROW_END]
    assert tokenizer.convert_tokens_to_ids(["I", "O"]) == [data.INPUT, data.OUTPUT]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (data.BOS, data.EOS, data.PAD)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)


def test_tokenizer_encodes_a_prompt_as_the_training_encoder_does(saved):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(saved[0])
    sample = data.Sample("t", 0, ((GRID_A, GRID_B),), QUERY, None)
    text = f"<bos>I{grid_text(GRID_A)}O{grid_text(GRID_B)}I{grid_text(QUERY)}O"
    assert tokenizer(text)["input_ids"] == data.encode_prompt(sample, 8192).tolist()
    # Spaces between cells (how arc_dataset --show prints a grid) are dropped.
    assert tokenizer("0 9\n9 0\n")["input_ids"] == data.grid_tokens(QUERY).tolist()
    ids = data.grid_tokens(GRID_B).tolist() + [data.EOS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == grid_text(GRID_B) == "654\n321\n"


def test_decoding_model_generate_reads_as_the_grid_text_our_decoder_produces(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ours = saved
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(f"<bos>I{grid_text(GRID_A)}O{grid_text(GRID_B)}I{grid_text(QUERY)}O", return_tensors="pt")
    # Generation may only write colours, row ends and EOS, as the project's own greedy decoder does.
    others = [i for i in range(16) if not M.GENERATABLE[i]]
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False, suppress_tokens=others)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    expected = M.generate_tokens(ours, prompt["input_ids"][0], 12)
    assert new[:len(expected)] == expected  # ours stops early once the tokens cannot be a grid
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert text == "".join("\n" if t == data.ROW_END else str(t) for t in new if t != data.EOS)
    assert model.generation_config.eos_token_id == data.EOS


def test_a_sliced_pretrained_model_saves_generation_ids_of_the_compact_vocabulary(tmp_path):
    from test_model import save_pretrained_checkpoint
    save_pretrained_checkpoint(tmp_path / "hub", tied=True)
    model = M.load_model(M.ModelSettings(str(tmp_path / "hub")))
    M.save_model(model, tmp_path / "model", {})
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (data.BOS, data.EOS)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_saved_folder_is_a_model_name_with_its_compact_vocabulary_as_saved(saved, lora_rank):
    folder, original = saved
    loaded = M.load_model(M.ModelSettings(str(folder), lora_rank=lora_rank))
    assert M.is_lora(loaded) == bool(lora_rank)
    state = M.merged_state_dict(loaded)  # LoRA starts as a zero update: the saved weights unchanged
    assert state.keys() == original.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in original.state_dict().items())
    ids = torch.from_numpy(data.encode_prompt(data.Sample("t", 0, ((GRID_A, GRID_B),), QUERY, None), 8192))[None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_the_trainer_fine_tunes_a_model_it_saved_before(tmp_path, capsys):
    from test_trainloop import tiny_args
    assert trainloop.main(tiny_args(tmp_path, "first", "--max-batches", "2")) == 0
    first = tmp_path / "first" / "model"
    argv = tiny_args(tmp_path, "second", "--max-batches", "2")
    argv[argv.index("tiny")] = str(first)
    assert trainloop.main(argv) == 0
    assert f"model: {first}" in capsys.readouterr().out
    again = M.load_saved_model(tmp_path / "second" / "model")
    assert again.config.vocab_size == 16
    before = M.load_saved_model(first).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in again.state_dict().items())  # it trained


class _Marker:
    """Unpickling this writes a file: proof that a .bin was (or was not) unpickled."""
    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _damage(folder: Path, how: str, marker: Path) -> str:
    """Damage a copy of a saved folder; returns the file name the error must give."""
    weights = folder / "model.safetensors"
    if how == "empty weights":
        weights.write_bytes(b"")
        return "model.safetensors"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "model.safetensors"
    if how == "vocabulary not JSON":
        (folder / M.VOCAB_FILE).write_text('{"symbols": [')
        return M.VOCAB_FILE
    if how == "vocabulary of other symbols":
        (folder / M.VOCAB_FILE).write_text(json.dumps({"symbols": list("abc")}))
        return M.VOCAB_FILE
    assert how == "pickled weights"
    weights.unlink()
    _Marker.path = str(marker)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker()))
    return "pytorch_model.bin"


DAMAGE = ["empty weights", "truncated weights", "vocabulary not JSON", "vocabulary of other symbols",
          "pickled weights"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_saved_folder_is_one_line_naming_the_file(saved, tmp_path, how):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    marker = tmp_path / "unpickled"
    name = _damage(folder, how, marker)
    with pytest.raises(UserError) as error:
        M.load_model(M.ModelSettings(str(folder)))
    message = str(error.value)
    assert str(folder / name) in message and "\n" not in message, message
    assert not marker.exists()


def test_a_plain_hf_folder_with_pickled_weights_only_is_refused_unread(tmp_path):
    from test_model import save_pretrained_checkpoint
    folder = tmp_path / "hub"
    save_pretrained_checkpoint(folder, tied=True)
    marker = tmp_path / "unpickled"
    _damage(folder, "pickled weights", marker)
    with pytest.raises(UserError, match="pytorch_model.bin: pickled weights are not loaded"):
        M.load_model(M.ModelSettings(str(folder)))
    assert not marker.exists()


def test_the_trainer_reports_a_damaged_model_folder_in_one_line(saved, tmp_path):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    _damage(folder, "truncated weights", tmp_path / "unpickled")
    script = ROOT / "trainloop_gpu_finetuned.py"
    result = subprocess.run([sys.executable, str(script), "--model-name", str(folder), "--device", "cpu",
                             "--data", str(ROOT / "data" / "examples" / "tasks.json"), "--eval-tasks", "0",
                             "--output-dir", str(tmp_path / "run")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0], result.stderr


HUB_SCRIPT = """
import sys, time, model
from errors import UserError
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        loaded = model.load_model(model.ModelSettings(name))
        print("LOADED", name, loaded.config.vocab_size, round(time.perf_counter() - start, 2))
    except UserError as exc:
        print("USER", name, round(time.perf_counter() - start, 2), exc)
"""


def test_the_cache_comes_first_and_an_unreachable_hub_fails_in_seconds(tmp_path):
    """A model in the HF cache loads with no request at all; a model id that is not cached, with the hub
    unreachable (a closed local port here), fails at once with what to do. Before the check, the same
    failure took ~47 s of huggingface_hub's retries on this machine."""
    from test_model import save_pretrained_checkpoint
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    save_pretrained_checkpoint(snapshot, tied=True)
    refs = tmp_path / "hub" / "models--someone--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "someone/tiny", "someone/tinny"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("LOADED", "USER"))]
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("LOADED someone/tiny 16"), lines[0]
    kind, name, seconds, message = lines[1].split(" ", 3)
    assert (kind, name) == ("USER", "someone/tinny") and float(seconds) < 5, lines[1]
    assert "not in the local Hugging Face cache" in message and "cannot be reached" in message
    assert "`hf download someone/tinny`" in message and "--random-init" in message and "tiny" in message
