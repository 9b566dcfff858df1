"""The frozen prefix of a train_top variant (embeddings + bottom layers), run once and cached.

A train_top=k' variant of an L-layer encoder freezes the embeddings and layers [0, k), k = L - k'.
Their outputs never change, so they are computed once per example (`PrefixCache`) and every
training step runs only layers [k, L), the pooler and the head (`top_forward`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from depthtune.batching import Examples, autocast, collate
from depthtune.config import VariantSpec


def frozen_prefix_layers(spec: VariantSpec, num_layers: int) -> int:
    """How many bottom encoder layers (plus the embeddings) are frozen: train_top variants only."""
    if spec.train_top is None:
        return 0
    return num_layers - spec.train_top


def supports_split_forward(model: nn.Module) -> bool:
    base = getattr(model, "base_model", None)
    return (getattr(model.config, "model_type", None) in ("bert", "roberta")
            and hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"))


def _bidirectional_mask(model, hidden, attention_mask):
    from transformers.masking_utils import create_bidirectional_mask  # ~1 s import: only when a cache is used

    return create_bidirectional_mask(config=model.base_model.config, inputs_embeds=hidden,
                                     attention_mask=attention_mask)


def prefix_forward(model, batch: dict, k: int) -> torch.Tensor:
    """Embeddings + encoder layers [0, k): the frozen part (run in eval mode, no autograd)."""
    base = model.base_model
    h = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    mask = _bidirectional_mask(model, h, batch["attention_mask"])
    for layer in base.encoder.layer[:k]:
        h = layer(h, mask)
    return h


def top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Encoder layers [k, L), pooler and head on given hidden states -> logits."""
    base = model.base_model
    mask = _bidirectional_mask(model, hidden, attention_mask)
    for layer in base.encoder.layer[k:]:
        hidden = layer(hidden, mask)
    if model.config.model_type == "roberta":
        return model.classifier(hidden)  # RobertaClassificationHead reads the <s> token itself
    pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


class PrefixCache:
    """Outputs of the frozen prefix for every example, computed once.

    Stored unpadded as one [total_tokens, H] fp32 tensor plus offsets:
    2,000 texts * ~30 tokens * 384 * 4 B = ~92 MB. Above `disk_threshold` bytes
    the tensor lives in a memory-mapped file instead of RAM.
    """

    def __init__(self, model, ex: Examples, k: int, device: str, batch_size: int, pad_id: int,
                 disk_dir: Optional[Path] = None, disk_threshold: int = 2 << 30):
        lengths = ex.lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        H = model.config.hidden_size
        nbytes = int(self.offsets[-1]) * H * 4
        if disk_dir is not None and nbytes > disk_threshold:
            disk_dir.mkdir(parents=True, exist_ok=True)
            path = disk_dir / "prefix_cache.f32"
            self.store = torch.from_file(str(path), shared=True, size=int(self.offsets[-1]) * H,
                                         dtype=torch.float32).view(-1, H)
        else:
            self.store = torch.empty((int(self.offsets[-1]), H), dtype=torch.float32)
        order = sorted(range(len(ex)), key=lambda i: lengths[i])  # similar lengths together: little padding
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                batch = {k2: v.to(device) for k2, v in collate(ex, idx, pad_id).items()}
                h = prefix_forward(model, batch, k).float().cpu()
                for row, i in enumerate(idx):
                    self.store[self.offsets[i]:self.offsets[i + 1]] = h[row, :lengths[i]]
        self.nbytes = nbytes

    def batch(self, index: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [int(self.offsets[i + 1] - self.offsets[i]) for i in index]
        H = self.store.shape[1]
        hidden = torch.zeros((len(index), max(lens), H), dtype=torch.float32)
        mask = torch.zeros((len(index), max(lens)), dtype=torch.long)
        for row, i in enumerate(index):
            hidden[row, :lens[row]] = self.store[self.offsets[i]:self.offsets[i + 1]]
            mask[row, :lens[row]] = 1
        return hidden.to(device), mask.to(device)


def set_train_mode(model: nn.Module, k: int) -> None:
    """Train mode for the trainable part; the frozen prefix runs without dropout (eval)."""
    model.train()
    if k > 0 and supports_split_forward(model):
        base = model.base_model
        base.embeddings.eval()
        for layer in base.encoder.layer[:k]:
            layer.eval()


@torch.no_grad()
def predict_cached(model, cache: PrefixCache, k: int, n: int, batch_size: int, device: str,
                   autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Logits from cached prefix outputs: only the trainable top runs."""
    was_training = model.training
    model.eval()
    out = np.zeros((n, model.config.num_labels), dtype=np.float32)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        hidden, mask = cache.batch(idx, device)
        with autocast(device, autocast_dtype):
            out[idx] = top_forward(model, hidden, mask, k).float().cpu().numpy()
    model.train(was_training)
    return out
