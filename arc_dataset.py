"""ARC tasks to training samples: load, validate, build leave-one-out samples, tokenize, augment, batch.

(SEED FILE: the data helper owns and completes this module. The names below are the contract
other modules import; keep them.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from errors import UserError

# ---- Vocabulary: one token per cell, ids 0-9 are the colours themselves. ----
ROW_END = 10   # end of a grid row ("\n")
INPUT = 11     # starts an input grid
OUTPUT = 12    # starts an output grid
BOS = 13       # begins a sample
EOS = 14       # ends an output grid that is a target (what generation stops on)
PAD = 15       # padding; never a label
VOCAB_SIZE = 16
SYMBOLS: tuple[str, ...] = tuple("0123456789") + ("\\n", "I", "O", "<bos>", "<eos>", "<pad>")
IGNORE_INDEX = -100  # label value that the loss skips (the Hugging Face convention)


class DataError(UserError):
    """Bad data: the message names the file, task id, split and pair index and what is wrong."""


@dataclass(frozen=True)
class DataSettings:
    """Everything about the data pipeline that changes what a batch holds (and so the speed)."""
    max_length: int = 8192
    batch_size: int = 1
    tokens_per_batch: int | None = None
    augment: bool = True
    seed: int = 0


@dataclass
class Batch:
    """A batch ready for the model. Labels follow Hugging Face: aligned with input_ids, unshifted,
    IGNORE_INDEX where no loss is taken. `segment_ids` is set only for packed rows (1..k per sample,
    0 for padding) so attention can be kept inside each sample; `attention_mask` only when padded."""
    input_ids: torch.Tensor                   # [B, T] int64
    labels: torch.Tensor                      # [B, T] int64
    position_ids: torch.Tensor                # [B, T] int64, restarting at 0 for each sample
    attention_mask: torch.Tensor | None       # [B, T] int64, 1 real / 0 pad; None when nothing is padded
    segment_ids: torch.Tensor | None          # [B, T] int64 for packed rows, else None
    num_tokens: int                           # real (non-pad) tokens in the batch
    num_target_tokens: int                    # tokens that carry a label
    samples: list[tuple[str, int]]            # (task_id, pair index) of each sample, for logs and tests

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     move(self.attention_mask), move(self.segment_ids), self.num_tokens,
                     self.num_target_tokens, self.samples)
