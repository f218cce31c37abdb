"""The Qwen-based ARC model: loading with a compact 16-symbol vocabulary, LoRA, saving, generation.

The pretrained Qwen vocabulary has ~152k rows; ARC needs 16 symbols (colours 0-9, row end, input/output
markers, bos/eos/pad; see arc_dataset). `load_model` slices the embedding and output rows down to those
16, each initialised from the pretrained token that spells the symbol, found through the model's own
tokenizer. Measured on the Qwen2.5-0.5B architecture on CPU this is 1.4-1.8x faster per step and ~3.5 GB
smaller. Token id i of the compact model is arc_dataset's id i, so training needs no tokenizer; saved folders
carry one anyway (`arc_tokenizer`), for users and other tools.

    settings = ModelSettings("Qwen/Qwen2.5-0.5B-Instruct")   # from the HF cache or the Hub
    settings = ModelSettings("Qwen/Qwen2.5-0.5B", random_init=True)   # bundled config, no download
    settings = ModelSettings("tiny")                          # 2-layer Qwen2 for tests and smoke runs
    model = load_model(settings)                              # fp32 on CPU; move it with .to(device)

Training inputs: `model(**model_inputs(batch, attention_implementation(model), attention_layer_types(model)))`
keeps packed samples from attending to each other. Saved folders (`save_model`) load back with
`load_saved_model(path)`, as `--model-name path` (to fine-tune them further), or with plain
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`: LoRA adapters are
merged into the weights before saving. Hub ids are looked up in the local Hugging Face cache first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import arc_dataset as data
from cli_common import DEFAULT_MODEL
from distributed import unwrap_model
from atomic_io import disk_errors, give_normal_permissions, make_temp_dir, replace_directory
from errors import UserError

TINY = "tiny"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VOCAB_FILE = "arc_vocabulary.json"
SETTINGS_FILE = "run_settings.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_GRID_TOKENS = data.MAX_TARGET_TOKENS  # a 30x30 grid: 30 rows of 30 cells + row end, then EOS

# The text each compact symbol is initialised from (special tokens are looked up separately).
SPELLINGS: dict[int, str] = {**{i: str(i) for i in range(10)}, data.ROW_END: "\n", data.INPUT: "I",
                             data.OUTPUT: "O"}


@dataclass(frozen=True)
class ModelSettings:
    """What model to build and how: everything here changes the weights' layout or the step's speed."""
    model_name: str = DEFAULT_MODEL
    random_init: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: 2 x rank (the usual r=16 / alpha=32 convention)
    gradient_checkpointing: bool = False
    long_batch_checkpointing: bool = False  # prepared but off: TrainStep turns it on for long batches only
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelSettings":
        """Settings from the flags that cli_common.add_shared_args declares."""
        return cls(model_name=args.model_name, random_init=args.random_init, lora_rank=args.lora_rank,
                   gradient_checkpointing=args.gradient_checkpointing,
                   attn_implementation=args.attn_implementation,
                   trust_remote_code=args.trust_remote_code)


# ---------------------------------------------------------------------------------------------- loading

def bundled_configs() -> dict[str, Path]:
    """Model ids whose config ships in configs/ (file name: the id with '/' written as '--')."""
    return {p.stem.replace("--", "/"): p for p in sorted(CONFIG_DIR.glob("*.json"))}


def tiny_config(attn_implementation: str = "sdpa"):
    """A 2-layer, hidden-64 Qwen2 with the compact vocabulary: for tests and smoke runs."""
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=data.VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=data.BOS,
                       eos_token_id=data.EOS, pad_token_id=data.PAD, attn_implementation=attn_implementation)


def load_model(settings: ModelSettings) -> nn.Module:
    """Build the model `settings` names with the compact vocabulary, fp32 on CPU, LoRA and checkpointing applied.

    Random initialisation draws from torch's global generator: seed it first for a repeatable model.
    """
    name = settings.model_name
    if name == TINY:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(tiny_config(settings.attn_implementation), dtype=torch.float32)
    elif (Path(name) / VOCAB_FILE).is_file() and not settings.random_init:
        model = load_saved_model(name, attn_implementation=settings.attn_implementation)
    elif settings.random_init:
        model = _random_init_model(settings)
    else:
        model = _pretrained_model(settings)
    return prepare_for_training(model, settings)


def prepare_for_training(model: nn.Module, settings: ModelSettings) -> nn.Module:
    """Apply gradient checkpointing and LoRA (which keeps the compact embedding and output rows trainable)."""
    if settings.gradient_checkpointing or settings.long_batch_checkpointing:
        # Non-reentrant torch.utils.checkpoint (transformers' default), which also works with frozen inputs (LoRA).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if not settings.gradient_checkpointing:
            set_checkpointing(checkpointable_layers(model), False)
    if settings.lora_rank > 0:
        model = _apply_lora(model, settings.lora_rank, settings.lora_alpha)
    return model


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers whose activations can be recomputed in the backward pass (prepared by
    activation_checkpointing_enable), through any DDP or LoRA wrapper."""
    return [m for m in decoder_layers(model) if getattr(m, "_gradient_checkpointing_func", None) is not None]


def set_checkpointing(layers: list[nn.Module], enabled: bool) -> None:
    """Turn recomputation on or off for the next forward (transformers reads the flag at every call)."""
    for layer in layers:
        layer.gradient_checkpointing = enabled


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (transformers' GradientCheckpointingLayer), through any DDP or LoRA wrapper."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: nn.Module) -> int:
    """--compile: torch.compile each decoder block in place (regional compilation); returns how many.

    A batch-size-1 step of a 0.5B model is bound by Python and kernel launches on a GPU, not by its
    matmuls; compiling fuses each block's norms, rotary embedding, activation and residual adds into a few
    kernels and runs forward and backward without Python per op. The blocks share one compiled graph
    (compiled once, not 24 times), shapes are dynamic from the start (ARC lengths change every batch), and
    `Module.compile` keeps parameter names, so checkpoints are unchanged. Generation runs the blocks
    uncompiled (eager_decoder_layers): a growing KV cache would only recompile."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


@contextlib.contextmanager
def eager_decoder_layers(model: nn.Module):
    """Run compiled decoder blocks uncompiled inside the block (they stay compiled for training)."""
    # Module.compile stores the compiled call in _compiled_call_impl, which Module.__call__ prefers.
    saved = [(layer, layer._compiled_call_impl) for layer in decoder_layers(model)
             if getattr(layer, "_compiled_call_impl", None) is not None]
    for layer, _ in saved:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, compiled in saved:
            layer._compiled_call_impl = compiled


def _config_for_random_init(settings: ModelSettings):
    from transformers import AutoConfig
    name = settings.model_name
    bundled = bundled_configs()
    if name in bundled:
        values = json.loads(bundled[name].read_text())
        return AutoConfig.for_model(**values)
    try:
        return _from_folder_cache_or_hub(
            name, lambda source, local_only: AutoConfig.from_pretrained(
                source, trust_remote_code=settings.trust_remote_code, local_files_only=local_only))
    except UserError as exc:
        raise UserError(f"--random-init: no bundled config for {name!r} and it could not be loaded "
                        f"({exc}); bundled: {', '.join(bundled)}; or give a local folder with a config.json, "
                        f"or --model-name tiny") from None


def _random_init_model(settings: ModelSettings) -> nn.Module:
    from transformers import AutoModelForCausalLM
    config = _config_for_random_init(settings)
    _set_compact_config(config)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            attn_implementation=settings.attn_implementation,
                                            trust_remote_code=settings.trust_remote_code)


def _pretrained_model(settings: ModelSettings) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = settings.model_name

    def load(source: str, local_only: bool):
        kwargs = {"trust_remote_code": settings.trust_remote_code, "local_files_only": local_only}
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # use_safetensors: a pickled pytorch_model.bin could run code while it loads; refuse it instead.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                     attn_implementation=settings.attn_implementation, **kwargs)
        return model, tokenizer

    try:
        if Path(name).is_dir():
            check_weight_files(Path(name))
        model, tokenizer = _from_folder_cache_or_hub(name, load)
    except UserError as exc:
        raise UserError(f"could not load model {name!r}: {exc}; offline alternatives: --random-init (bundled "
                        f"configs: {', '.join(bundled_configs())}), a local checkpoint folder, or --model-name "
                        f"tiny") from None
    return compact_vocabulary(model, tokenizer)


HUB_CHECK_TIMEOUT_S = 10.0


def _hub_offline() -> bool:
    return any(os.environ.get(var, "0") not in ("", "0") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_folder_cache_or_hub(name: str, load):
    """`load(source, local_only)` from a local folder or the Hugging Face cache first; the hub only when neither
    has it, and only after one quick request says the hub answers and has the model.

    Without this, a mistyped id or a machine with no network spent ~47 s in huggingface_hub's retries before
    failing (measured offline on this project's machine; ~57 s reported elsewhere); the check fails in well
    under a second. A cached model is loaded from its snapshot folder, not by id: by id, even with
    local_files_only, transformers 5.24 still asks the hub for an adapter_config.json (~30 s of retries offline).
    Raises UserError with the reason (no advice: the callers add what to do)."""
    from safetensors import SafetensorError
    problems = (OSError, ValueError, SafetensorError)
    if Path(name).is_dir():
        try:
            return load(name, True)
        except problems as exc:
            raise UserError(f"the folder {name} could not be loaded ({_first_line(exc)})") from None
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local or "/" in name and Path(name).parent.is_dir():  # a hub id is "owner/name"
        raise UserError(f"no such folder {name}")
    snapshot = _cached_snapshot(name)
    where = f"it is not in the local Hugging Face cache ({_hub_cache_dir()})"
    if snapshot is not None:
        try:
            return load(str(snapshot), True)
        except problems as exc:  # e.g. only the config is cached (a --random-init run fetches just that)
            where = f"its copy in the local Hugging Face cache ({snapshot}) could not be loaded ({_first_line(exc)})"
    if _hub_offline():
        raise UserError(f"{where} and HF_HUB_OFFLINE is set")
    hub_problem = _hub_problem(name)
    if hub_problem:
        raise UserError(f"{where} and {hub_problem}")
    try:
        return load(name, False)
    except problems as exc:
        raise UserError(_first_line(exc)) from None


def _hub_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _cached_snapshot(name: str) -> Path | None:
    """The cache folder of the model's main revision, when the cache holds at least its config."""
    from huggingface_hub import try_to_load_from_cache
    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _hub_problem(name: str) -> str | None:
    """Why the hub cannot give `name` (unreachable, or no such model), from one request; None when it can."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, RepositoryNotFoundError
    try:
        huggingface_hub.model_info(name, timeout=HUB_CHECK_TIMEOUT_S)
    except HFValidationError as exc:
        return f"it is not a valid model id ({_first_line(exc)})"
    except RepositoryNotFoundError:
        return (f"the hub has no model {name!r} (mistyped? a private or gated model needs `hf auth login`)")
    except HfHubHTTPError:
        return None  # the hub answered: let the download report its own error
    except Exception as exc:  # network errors come from the HTTP client huggingface_hub bundles
        return (f"the hub at {constants.ENDPOINT} cannot be reached ({_first_line(exc)}); where there is "
                f"network, `hf download {name}` puts it in the cache")
    return None


@contextlib.contextmanager
def _quiet_progress():
    """No per-shard progress bars from transformers: the scripts print their own progress lines."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------ compact vocabulary

def symbol_token_ids(tokenizer, config) -> list[list[int]]:
    """For each compact symbol, the pretrained token ids whose embeddings initialise it.

    Digits, the newline and the I/O markers are spelled through the tokenizer (a spelling that splits into
    several tokens uses the mean of their rows). bos/eos/pad come from the tokenizer's special tokens,
    falling back to the model config's ids (Qwen's tokenizer has no bos token; its config does) and then
    to eos, so every symbol gets a pretrained row.
    """
    ids: list[list[int]] = []
    for symbol in range(data.VOCAB_SIZE):
        if symbol in SPELLINGS:
            pieces = tokenizer.encode(SPELLINGS[symbol], add_special_tokens=False)
            if not pieces:
                raise UserError(f"the model's tokenizer cannot spell {SPELLINGS[symbol]!r}")
            ids.append(list(pieces))
    eos = _first_id(tokenizer.eos_token_id, config.eos_token_id)
    bos = _first_id(tokenizer.bos_token_id, config.bos_token_id, eos)
    pad = _first_id(tokenizer.pad_token_id, getattr(config, "pad_token_id", None), eos)
    special = {data.BOS: bos, data.EOS: eos, data.PAD: pad}
    for symbol in (data.BOS, data.EOS, data.PAD):
        if special[symbol] is None:
            raise UserError("the model's tokenizer and config name no eos token to initialise the end symbol from")
        ids.append([special[symbol]])
    assert len(ids) == data.VOCAB_SIZE
    return ids


def _first_id(*candidates: Any) -> int | None:
    for value in candidates:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _gather_rows(weight: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    return torch.stack([weight[row].mean(dim=0) for row in ids]).detach().clone()


def compact_vocabulary(model: nn.Module, tokenizer) -> nn.Module:
    """Cut the embedding and output layer to the 16 symbols, each row copied from its pretrained token(s).

    Tied models keep one shared matrix; untied ones slice the output layer's own rows. The config's
    vocab_size and special ids become the compact ones so the saved folder describes itself.
    """
    ids = symbol_token_ids(tokenizer, model.config)
    old_in = model.get_input_embeddings()
    old_out = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or old_out.weight is old_in.weight
    new_in = nn.Embedding(data.VOCAB_SIZE, old_in.embedding_dim, dtype=old_in.weight.dtype)
    new_in.weight.data.copy_(_gather_rows(old_in.weight, ids))
    new_out = nn.Linear(old_out.in_features, data.VOCAB_SIZE, bias=old_out.bias is not None,
                        dtype=old_out.weight.dtype)
    if tied:
        new_out.weight = new_in.weight
    else:
        new_out.weight.data.copy_(_gather_rows(old_out.weight, ids))
    if old_out.bias is not None:
        new_out.bias.data.copy_(torch.stack([old_out.bias[row].mean() for row in ids]))
    model.set_input_embeddings(new_in)
    model.set_output_embeddings(new_out)
    _set_compact_config(model.config)
    generation = getattr(model, "generation_config", None)
    if generation is not None:  # the pretrained ids (Qwen's eos 151645) would never stop model.generate
        generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = data.BOS, data.EOS, data.PAD
    model.config.arc_source_token_ids = ids  # saved in config.json: where each row came from
    return model


def _set_compact_config(config) -> None:
    config.vocab_size = data.VOCAB_SIZE
    config.bos_token_id, config.eos_token_id, config.pad_token_id = data.BOS, data.EOS, data.PAD
    generation = getattr(config, "get_text_config", lambda: config)()
    generation.vocab_size = data.VOCAB_SIZE


# --------------------------------------------------------------------------------------------------- LoRA

def _apply_lora(model: nn.Module, rank: int, alpha: float | None) -> nn.Module:
    """Wrap with peft LoRA on every attention and MLP projection; the (tiny) compact embedding and output
    rows stay fully trainable because they were re-initialised for this task."""
    from peft import LoraConfig, get_peft_model
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise UserError(f"--lora-rank: the model has none of the projections {', '.join(LORA_TARGETS)}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    # Un-freezing (rather than peft's modules_to_save) keeps a tied embedding/output matrix tied.
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_output_embeddings().weight.requires_grad_(True)
    return model


def is_lora(model: nn.Module) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "peft_config")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every LoRA update folded into its base weight, on CPU.

    Built on the side: the live model (and the optimizer's view of it) is left untouched.
    """
    if not is_lora(model):
        return _to_cpu_shared(model.state_dict())
    from peft.tuners.lora import LoraLayer
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters
                        if adapter in module.lora_A)
            deltas[f"{name}.weight"] = delta
    merged: dict[str, torch.Tensor] = {}
    for key, value in model.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        value = value.detach()
        if plain in deltas:
            value = value + deltas[plain].to(value.dtype)
        merged[plain] = value
    return _to_cpu_shared(merged)


def _to_cpu_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy to CPU once per storage, so a tied embedding/output matrix stays one tensor for save_pretrained."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if ptr not in copies:
            copies[ptr] = value.detach().cpu()
        out[key] = copies[ptr]
    return out


# --------------------------------------------------------------------------------------- saving / loading

# The token of each compact id in the saved tokenizer: arc_dataset's symbols, the row end written as the
# byte-level tokenizer's newline ("Ċ").
TOKEN_TEXTS: tuple[str, ...] = tuple("Ċ" if i == data.ROW_END else symbol for i, symbol in enumerate(data.SYMBOLS))


def arc_tokenizer(model_max_length: int | None = None):
    """A Hugging Face tokenizer for the compact vocabulary, saved in every model folder for users and tools.

    One token per character, with the model's ids: the digits are the colours (ids 0-9), a newline ends a
    row (10), "I" / "O" start an input / output grid, and "<bos>", "<eos>", "<pad>" are its special tokens;
    spaces and any other character are dropped ("0 1\n" encodes as "01\n"). Decoding joins tokens with
    nothing between them, so `decode(ids, skip_special_tokens=True)` of a generated grid is its text, one row
    per line. Training does not use it: arc_dataset's vectorised encoder builds the same ids from the grids.

    It is Qwen2Tokenizer (a PreTrainedTokenizerFast) over a 16-entry vocabulary with no merges, which is a
    word-level lookup of single characters. Not a plain `tokenizers` WordLevel model: transformers 5's
    AutoTokenizer rebuilds the tokenizer of every qwen2 folder as Qwen2Tokenizer's byte-level pipeline,
    which turned a WordLevel model's "\n" into an unknown "Ċ" and dropped every row end (seen with 5.24).
    """
    from transformers import Qwen2Tokenizer
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return Qwen2Tokenizer(vocab={text: i for i, text in enumerate(TOKEN_TEXTS)}, merges=[], unk_token=None,
                          bos_token=TOKEN_TEXTS[data.BOS], eos_token=TOKEN_TEXTS[data.EOS],
                          pad_token=TOKEN_TEXTS[data.PAD],
                          padding_side="left", **extra)  # left: batched generation continues each row


def save_model(model: nn.Module, path: str | os.PathLike, run_settings: dict[str, Any]) -> Path:
    """Write a self-describing folder atomically: weights + config (save_pretrained), the compact tokenizer,
    the vocabulary and the run settings. The folder appears complete or not at all (temp dir beside it,
    then os.replace), with a normal folder's permissions; a write the disk refuses (full, read-only) is one
    UserError line with the space needed and free, and leaves no temporary and any older model in place."""
    target = Path(path)
    base = model.get_base_model() if is_lora(model) else model
    state = merged_state_dict(model)
    needed = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    with disk_errors("the final model", target.parent, needed_bytes=needed):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(f".{target.name}.tmp-", target.parent)
        try:
            with _quiet_progress():
                base.save_pretrained(tmp, state_dict=state)
                arc_tokenizer(getattr(base.config, "max_position_embeddings", None)).save_pretrained(tmp)
            vocabulary = {"symbols": list(data.SYMBOLS), "vocab_size": data.VOCAB_SIZE,
                          "ids": {"row_end": data.ROW_END, "input": data.INPUT, "output": data.OUTPUT,
                                  "bos": data.BOS, "eos": data.EOS, "pad": data.PAD},
                          "lora": "merged into the weights" if is_lora(model) else None}
            (tmp / VOCAB_FILE).write_text(json.dumps(vocabulary, indent=2) + "\n")
            (tmp / SETTINGS_FILE).write_text(json.dumps(run_settings, indent=2, sort_keys=True, default=str) + "\n")
            give_normal_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600 would stay after the rename
            replace_directory(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def load_saved_model(path: str | os.PathLike, attn_implementation: str = "sdpa") -> nn.Module:
    """Load a folder written by `save_model` (fp32, CPU), compact vocabulary included, no tokenizer needed.

    A damaged folder (bad vocabulary file, empty or cut-short weights, pickled weights only) is a UserError
    naming the file; pickled `.bin` weights are never unpickled."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    folder = Path(path)
    vocab_path = folder / VOCAB_FILE
    if not vocab_path.is_file():
        raise UserError(f"{folder}: not a saved ARC model (no {VOCAB_FILE}); give a folder written by save_model")
    _check_vocabulary(vocab_path)
    check_weight_files(folder)
    try:
        with _quiet_progress():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                        local_files_only=True,
                                                        attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{folder}: the saved model could not be loaded ({_first_line(exc)})") from None


def _check_vocabulary(vocab_path: Path) -> None:
    try:
        vocabulary = json.loads(vocab_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{vocab_path}: not a readable vocabulary file ({_first_line(exc)}); the saved model "
                        f"folder is damaged: save the model again") from None
    symbols = vocabulary.get("symbols") if isinstance(vocabulary, dict) else None
    if symbols != list(data.SYMBOLS):
        raise UserError(f"{vocab_path}: vocabulary {symbols} differs from this code's {list(data.SYMBOLS)}")


def check_weight_files(folder: Path) -> None:
    """Refuse a folder whose weights are pickled only, or whose safetensors files are empty or cut short, with
    one line naming the file (safe_open reads only each file's header and checks it against the file size)."""
    from safetensors import SafetensorError, safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index}: not a readable safetensors index ({_first_line(exc)})") from None
    else:
        files = [folder / "model.safetensors"]
    for file in files:
        if not file.is_file():
            pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in folder.glob(pattern))
            if pickled:
                raise UserError(f"{folder / pickled[0]}: pickled weights are not loaded (unpickling can run "
                                f"code) and {file.name} is missing; where you trust the file, load it once "
                                f"and save_pretrained() it again (that writes safetensors)")
            raise UserError(f"{file}: missing; the model folder has no weights")
        try:
            with safe_open(file, "pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{file}: not a complete safetensors file ({_first_line(exc)}); it is empty or was "
                            f"cut short: save or download the model again") from None


def load_run_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The run settings stored beside a saved model."""
    return json.loads((Path(path) / SETTINGS_FILE).read_text())


# ---------------------------------------------------------------------------------------- forward inputs

def attention_implementation(model: nn.Module) -> str:
    """The attention kernel the model was built with ('sdpa', 'eager', ...): it decides the mask's form."""
    return getattr(_config(model), "_attn_implementation", None) or "sdpa"


def attention_layer_types(model: nn.Module) -> frozenset[str]:
    """The kinds of attention layer the model has ('full_attention', 'sliding_attention'), one mask each;
    empty for a model whose config does not list them (it may not take prepared masks)."""
    return frozenset(getattr(_config(model), "layer_types", None) or ())


def _config(model: nn.Module):
    return getattr(unwrap_model(model), "config", None)


def packed_attention_mask(segment_ids: torch.Tensor, attn_implementation: str = "sdpa",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [B, 1, T, T] block-diagonal causal mask: each token sees only earlier tokens of its own sample.

    Padding (segment 0) attends to earlier padding only, so no row is fully masked (that gives NaN in SDPA).
    SDPA takes a boolean mask (True = attend); eager attention adds the mask to its scores, so it gets
    0 / most-negative floats instead.
    """
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def model_inputs(batch: data.Batch, attn_implementation: str = "sdpa",
                 layer_types: frozenset[str] = frozenset({"full_attention"})) -> dict[str, Any]:
    """The keyword arguments for `model(...)` that keep every sample's attention inside itself.

    Packed rows (segment_ids set) get their restarting position_ids and a block-diagonal causal mask; padded
    rows the same mask built from their attention_mask (padding is segment 0). The mask goes in already
    prepared (`{"full_attention": mask}`), because transformers, left to build it, reads a device value back
    on every forward to check for packing or padding: a GPU stall per step. Rows with neither get no mask at
    all, so SDPA runs its causal flash kernel. Models with other or unlisted layer kinds (sliding windows)
    and eager attention without a mask keep transformers' own mask building.
    """
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    packed = batch.segment_ids is not None
    if packed:
        kwargs["position_ids"] = batch.position_ids  # unpacked rows: the default 0..T-1 is right
    if attn_implementation.startswith("flash"):  # finds packed samples from position_ids, padding from the 2-D mask
        if not packed and batch.attention_mask is not None:
            kwargs["attention_mask"] = batch.attention_mask
        return kwargs
    segments = batch.segment_ids if packed else batch.attention_mask  # padding is segment 0
    mask = None if segments is None else packed_attention_mask(segments, attn_implementation)
    if layer_types == {"full_attention"} and (mask is not None or attn_implementation != "eager"):
        kwargs["attention_mask"] = {"full_attention": mask}  # prepared: transformers builds and reads nothing
    elif mask is not None:
        kwargs["attention_mask"] = mask if packed else batch.attention_mask
    return kwargs


# ----------------------------------------------------------------------------------------------- metrics

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, a tied embedding/output matrix counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def flops_per_token(model: nn.Module, seq_len: float) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (nanoGPT's estimate after PaLM, Appendix B).

    N: every parameter in the forward path, frozen ones included (6 = 2 forward + 4 backward per weight;
    with LoRA the frozen weights' gradients are skipped, so this over-counts by up to a third). The
    attention term: L layers, H query heads of size Q, attending over T tokens (the mean sample length
    for packed rows); it counts the full T x T score matrix, as PaLM does, not the causal half.
    """
    config = model.config
    total, _ = count_parameters(model)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * total + 12.0 * layers * heads * head_dim * float(seq_len)


# --------------------------------------------------------------------------------------------- generation

GENERATABLE = torch.zeros(data.VOCAB_SIZE, dtype=torch.bool)
GENERATABLE[:10] = True
GENERATABLE[data.ROW_END] = True
GENERATABLE[data.EOS] = True


class GridGrammar:
    """Follows generated tokens and says when they can no longer become a grid (1..30 x 1..30, equal rows).

    An untrained or confused model rarely emits EOS; without this check every such test input would
    decode all 931 tokens, which dominates evaluation time."""

    def __init__(self) -> None:
        self.width: int | None = None  # fixed by the first row end
        self.cells = 0                 # cells in the current row
        self.rows = 0                  # complete rows

    def accepts(self, token: int) -> bool:
        """Feed one token; False once the sequence cannot be completed into a valid grid."""
        if token == data.EOS:
            return self.rows > 0 and self.cells == 0
        if token == data.ROW_END:
            if self.cells == 0 or (self.width is not None and self.cells != self.width):
                return False
            self.width, self.cells, self.rows = self.cells, 0, self.rows + 1
            return self.rows <= 30
        self.cells += 1
        return self.cells <= (self.width or 30)


@torch.no_grad()
def generate_token_batch(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                         precision=None, exact_new_tokens: Sequence[int] | None = None, *,
                         should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """Greedy decoding of several prompts at once with one KV cache; only colours, row ends and EOS can be
    produced. Each row stops on its own, after EOS or once its output can no longer be a grid.

    `exact_new_tokens` (for timing evaluation, run_costs.py): row r generates exactly that many tokens
    (within max_new_tokens), EOS and the grid rules ignored, as a trained model that writes the known answer
    would; an untrained one stops at the wrong place.

    A decode step is launch-bound on a GPU (one token per row through every layer), so 8 rows cost little
    more than 1. Prompts are padded on the left, with the mask and positions that make each row decode as
    it would alone. `should_stop()` (a deadline) is asked before each decode step; once true, decoding ends
    and the rows still running are returned as they are (no EOS: not a grid)."""
    device = next(model.parameters()).device
    rows = len(prompts)
    lengths = torch.tensor([int(p.numel()) for p in prompts])
    pads = lengths.max() - lengths
    ids = torch.full((rows, int(lengths.max())), data.PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, int(pads[row]):] = prompt.reshape(-1).cpu()
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": True}
    padded = bool(pads.any())
    if padded:
        mask = (torch.arange(ids.shape[1])[None, :] >= pads[:, None]).long().to(device)
        inputs.update(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        next_positions = lengths.to(device)[:, None]
    max_new_tokens = min(max_new_tokens, MAX_GRID_TOKENS)
    exact = None if exact_new_tokens is None else [min(int(n), max_new_tokens) for n in exact_new_tokens]
    blocked = ~GENERATABLE.to(device)
    dtype = getattr(precision, "autocast_dtype", None)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    grammars = [GridGrammar() for _ in range(rows)]
    active = [True] * rows if exact is None else [n > 0 for n in exact]
    was_training = model.training
    model.eval()
    try:
        with eager_decoder_layers(model), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(**inputs)
            for _ in range(max_new_tokens):
                chosen = out.logits[:, -1, :data.VOCAB_SIZE].float().masked_fill(blocked, -math.inf).argmax(-1)
                for row, token in enumerate(chosen.tolist()):  # host sync: needed to know which rows stop
                    if active[row]:
                        tokens[row].append(token)
                        # Done, or the output can no longer be a grid: stop instead of running to the cap.
                        active[row] = (token != data.EOS and grammars[row].accepts(token) if exact is None
                                       else len(tokens[row]) < exact[row])
                if not any(active) or (should_stop is not None and should_stop()):
                    break
                inputs = {"input_ids": chosen[:, None], "cache": out.cache, "use_cache": True}
                if padded:
                    mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                    inputs.update(attention_mask=mask, position_ids=next_positions)
                    next_positions = next_positions + 1
                out = model(**inputs)
    finally:
        model.train(was_training)
    return tokens


def generate_tokens(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, precision=None) -> list[int]:
    """Greedy decoding of one prompt (see generate_token_batch)."""
    return generate_token_batch(model, [prompt_ids], max_new_tokens, precision)[0]


def tokens_to_grid(tokens: Sequence[int]) -> np.ndarray | None:
    """The grid that generated tokens spell, or None if malformed (no EOS, ragged rows, ...)."""
    if not tokens or tokens[-1] != data.EOS:
        return None
    try:
        return data.decode_grid(list(tokens))
    except data.DecodeError:
        return None


def generate_grids(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int = MAX_GRID_TOKENS,
                   precision=None, **kwargs: Any) -> list[np.ndarray | None]:
    """Greedy-decode the output grids of several prompts at once (see generate_token_batch; keyword
    arguments such as should_stop go to it)."""
    return [tokens_to_grid(t) for t in generate_token_batch(model, prompts, max_new_tokens, precision, **kwargs)]


def generate_grid(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int = MAX_GRID_TOKENS,
                  precision=None) -> np.ndarray | None:
    """Greedy-decode the output grid for a prompt ending in the query's OUTPUT token; None if malformed
    (no EOS within max_new_tokens, ragged rows, ...)."""
    return tokens_to_grid(generate_tokens(model, prompt_ids, max_new_tokens, precision))


# ---------------------------------------------------------------------------------------------- scoring

SCORE_TOKENS_PER_FORWARD = 32768  # rows x padded length per forward pass of sequence_log_probs


@torch.no_grad()
def sequence_log_probs(model: nn.Module, prompts: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                       precision=None, max_tokens: int = SCORE_TOKENS_PER_FORWARD) -> list[float]:
    """Teacher-forced log-probability of each target (a grid's tokens and EOS) after its prompt: the sum over
    the target's tokens of log p(token | everything before it), over the model's full 16-symbol output.

    Used to rank candidate grids by their summed log-probability over augmented views (the ARChitects'
    product of probabilities). One forward pass per chunk of sequences, shortest first, rows padded on the
    right: with causal attention a real token never sees the padding after it, so no mask is needed and
    each row scores as it would alone."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = next(model.parameters()).device
    sequences = [torch.cat([p.reshape(-1).cpu(), t.reshape(-1).cpu()]).long() for p, t in zip(prompts, targets)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    dtype = getattr(precision, "autocast_dtype", None)
    was_training = model.training
    model.eval()
    try:
        with eager_decoder_layers(model), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            start = 0
            while start < len(order):
                end = start + 1  # at least one row; then as many as fit max_tokens at the longest's length
                while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= max_tokens:
                    end += 1
                chunk = order[start:end]
                width = len(sequences[chunk[-1]])
                ids = torch.full((len(chunk), width), data.PAD, dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(sequences[i])] = sequences[i]
                logits = model(input_ids=ids.to(device), use_cache=False).logits[..., :data.VOCAB_SIZE]
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                sums = []
                for row, i in enumerate(chunk):
                    first, length = int(prompts[i].numel()), int(targets[i].numel())
                    picked = log_probs[row, first - 1:first - 1 + length].gather(
                        -1, ids[row, first:first + length, None].to(device))
                    sums.append(picked.sum())
                for i, value in zip(chunk, torch.stack(sums).tolist()):  # host sync: once per forward pass
                    scores[i] = value
                start = end
    finally:
        model.train(was_training)
    return scores
