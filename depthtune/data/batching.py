"""Tokenized examples in memory, length-grouped batches, dynamic padding, batched prediction."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class Examples:
    """A tokenized split held as Python lists (fast to slice into batches)."""
    input_ids: list
    labels: list
    token_type_ids: Optional[list] = None
    n_bytes: Optional[list] = None  # UTF-8 bytes of each text's tokenized part (bits per byte)
    loss_start: Optional[list] = None  # causal_lm with prompts: first position whose token is trained on

    @classmethod
    def from_dataset(cls, ds) -> "Examples":
        # Materialise the Arrow columns once. `ds["input_ids"]` is a lazy Column in datasets 4+:
        # indexing it decodes one row at a time (~25 us each), and sorting 1,000 texts by length
        # through it cost 25 s per validation pass before this.
        def column(name):
            return ds.data.column(name).to_pylist()
        def optional(name):
            return column(name) if name in ds.column_names else None
        return cls(input_ids=column("input_ids"), labels=column("labels"), token_type_ids=optional("token_type_ids"),
                   n_bytes=optional("n_bytes"), loss_start=optional("loss_start"))

    def __len__(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def lengths(self) -> list:  # computed once: sorting and batching read it per example
        return [len(x) for x in self.input_ids]


def length_grouped_batches(lengths: list, batch_size: int, seed: int, epoch: int,
                           group_factor: int = 50) -> list[list[int]]:
    """Shuffle, cut into mega-batches of 50 batches, sort each by length, split, shuffle batch order.

    Padding per batch then costs little (neighbours have similar lengths) while the
    order stays random. Depends only on (seed, epoch): a resumed run sees the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * group_factor
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ex: Examples, index: list[int], pad_id: int) -> dict:
    """Pad to the longest sequence in this batch (never to max_length)."""
    longest = max(len(ex.input_ids[i]) for i in index)
    ids = torch.full((len(index), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), longest), dtype=torch.long)
    types = torch.zeros((len(index), longest), dtype=torch.long) if ex.token_type_ids is not None else None
    for row, i in enumerate(index):
        n = len(ex.input_ids[i])
        ids[row, :n] = torch.tensor(ex.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(ex.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ex.labels[i] for i in index])}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def autocast(device: str, dtype: Optional[torch.dtype]):
    """Mixed precision when `dtype` is given (bf16 on GPUs), a no-op context otherwise."""
    return torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def predict_logits(model, ex: Examples, batch_size: int, device: str, pad_id: int,
                   autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Logits in the dataset's row order (batches sorted by length, then unsorted)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ex)), key=ex.lengths.__getitem__)
    out = np.zeros((len(ex), model.config.num_labels), dtype=np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(ex, idx, pad_id).items() if k != "labels"}
        with autocast(device, autocast_dtype):
            logits = model(**batch).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out
