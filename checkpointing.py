"""Training checkpoints: atomic writes, rotation, and everything an exact resume needs.

A checkpoint is a folder `<run>/checkpoints/step-<N>/` holding
  * `state.pt`   - tensors and plain values only (model, optimizer, scheduler, TrainStep/scaler state, RNG
                   states, loop position), read back with `torch.load(weights_only=True)` so loading a
                   checkpoint never runs pickled code;
  * `meta.json`  - what a person (or `--resume`) needs without torch: step, epoch, position in the epoch,
                   why it was written, the run's arguments, model config and vocabulary.
Both files are written into a temporary sibling folder that is renamed into place with `os.replace`, so a
crash, a full disk or a Ctrl-C mid-write never leaves half a checkpoint under a `step-*` name.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomic_io import replace_directory
from errors import UserError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
# atomic_io.RETIRED_PREFIX (".tmp-old-") starts with it, so a half-removed old checkpoint is swept too.


def checkpoint_name(step: int) -> str:
    """Folder name for a checkpoint taken after `step` optimizer steps (zero-padded so names sort)."""
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first. Temporary folders are never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete half-written checkpoint folders left by a run that was killed mid-save; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [child for child in directory.iterdir() if child.name.startswith(_TEMP_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                    keep: int) -> Path:
    """Write `state` and `meta` as checkpoint `step` in `directory` atomically; keep the newest `keep`.

    Raises UserError (with the path and what to do) when the disk refuses the write, after removing the
    partial temporary folder, so the previous checkpoints stay the latest ones.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    temporary = directory / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        torch.save(state, temporary / STATE_FILE)
        _write_json(temporary / META_FILE, {"format": FORMAT_VERSION, **meta})
        _fsync_path(temporary / STATE_FILE)
        _fsync_path(temporary)
        replace_directory(temporary, final)
        _fsync_path(directory)
    except OSError as err:
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {err.strerror or err}; free disk space, "
                        f"lower --keep-checkpoints or choose another --output-dir") from err
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: (state for torch objects, meta). Tensors come back on the CPU."""
    path = Path(path)
    state_file, meta_file = path / STATE_FILE, path / META_FILE
    if not state_file.is_file() or not meta_file.is_file():
        raise UserError(f"{path} is not a checkpoint (expected {STATE_FILE} and {META_FILE} in it)")
    try:
        meta = json.loads(meta_file.read_text())
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read ({reason}); resume from an older one in "
                        f"{path.parent}") from err
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {meta.get('format')!r}; this trainer reads "
                        f"format {FORMAT_VERSION}")
    return state, meta


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json alone (cheap: no tensors), e.g. to restore the run's arguments first."""
    meta_file = Path(path) / META_FILE
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} cannot be read ({meta_file.name}: {err}); resume from an older one "
                        f"in {Path(path).parent}") from err


def resolve_resume_path(spec: str | None, output_dir: Path | None, runs_root: Path) -> Path:
    """Find the checkpoint that `--resume [PATH]` means.

    PATH may be a checkpoint folder or a run folder (its newest checkpoint is taken). Without PATH the newest
    checkpoint of `--output-dir` is used, or, with no `--output-dir` either, of the newest run in `runs_root`.
    """
    if spec:
        path = Path(spec)
        if (path / STATE_FILE).is_file():
            return path
        for candidate in (path / CHECKPOINT_DIR, path):
            latest = latest_checkpoint(candidate)
            if latest is not None:
                return latest
        raise UserError(f"--resume {spec}: no checkpoint there (expected a run folder with "
                        f"{CHECKPOINT_DIR}/step-*/ or a step-* folder)")
    if output_dir is not None:
        latest = latest_checkpoint(Path(output_dir) / CHECKPOINT_DIR)
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}")
        return latest
    candidates = [latest_checkpoint(run / CHECKPOINT_DIR) for run in Path(runs_root).glob("*")
                  if run.is_dir()]
    candidates = [path for path in candidates if path is not None]
    if not candidates:
        raise UserError(f"--resume: no run with a checkpoint under {runs_root}/; give --resume PATH")
    return max(candidates, key=lambda path: (path / META_FILE).stat().st_mtime)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a resume needs: everything for full fine-tuning, only the trainable tensors for LoRA
    (the frozen base weights are reloaded from the model itself, which saves gigabytes per checkpoint)."""
    parameters = dict(model.named_parameters())
    trainable = {name for name, parameter in parameters.items() if parameter.requires_grad}
    state = model.state_dict()
    if len(trainable) == len(parameters):
        return state
    return {name: tensor for name, tensor in state.items() if name in trainable}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `model_state` saved; a mismatch (another model or LoRA rank) is a UserError."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(trainable - set(state))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit this model ({str(err).splitlines()[0]}); resume with "
                        f"the --model-name and --lora-rank the checkpoint was trained with") from err
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise UserError(f"checkpoint weights do not fit this model (e.g. {name!r} "
                        f"{'missing' if missing else 'unexpected'}); resume with the --model-name and "
                        f"--lora-rank the checkpoint was trained with")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only when this run has the same devices)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk so the rename that follows cannot outrun the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
