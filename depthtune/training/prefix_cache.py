"""The frozen prefix of a train_top variant (embeddings + bottom blocks), run once and cached.

A train_top=k' variant of an L-block model freezes the embeddings and blocks [0, k), k = L - k'.
Their outputs never change, so they are computed once per example (`PrefixCache`) and every
training step runs only blocks [k, L) and the head (`top_forward`).

Two kinds of model split this way:
- encoders (bert, roberta): embeddings -> layers -> pooler/[CLS] -> classifier, bidirectional mask;
- decoders (llama, qwen2, qwen3, mistral, gpt2): token embeddings (+ gpt2's learned positions) ->
  blocks -> final norm -> `score` at the last non-pad token, causal mask (sliding-window where the
  model's own forward uses one) and, for the rotary families, the same rotary position embeddings.
  A decoder's hidden state at position p depends only on tokens <= p, so a text's prefix outputs
  are the same alone or right-padded in any batch: they cache per text like an encoder's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from depthtune.data.batching import Examples, autocast, collate
from depthtune.config import TrainConfig, VariantSpec
from depthtune.model.families import Family, family_of
from depthtune.progress import QUIET_FOR_S, Progress
from depthtune.training.data_parallel import dist_info



def frozen_prefix_layers(spec: VariantSpec, num_layers: int) -> int:
    """How many bottom layers/blocks (plus the embeddings) are frozen and cacheable: the kind says
    (`Method.cached_prefix_layers`; train_top and probe variants)."""
    return spec.method.cached_prefix_layers(spec.options, num_layers)


def family(model: nn.Module) -> Family:
    return family_of(getattr(model.config, "model_type", None))


def is_decoder(model: nn.Module) -> bool:
    return family(model).decoder


def supports_split_forward(model: nn.Module) -> bool:
    """True when prefix_forward/top_forward can run this model in two halves (the family's `prefix_cache`)."""
    row, base = family(model), getattr(model, "base_model", None)
    if not row.prefix_cache:
        return False
    if not row.decoder:
        return hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")
    return decoder_blocks(base) is not None and (isinstance(getattr(model, "score", None), nn.Linear)
                                                 or is_causal_lm(model))


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder with its language-model head (task causal_lm): every position's logits are trained."""
    return is_decoder(model) and isinstance(getattr(model, "lm_head", None), nn.Linear)


# ----------------------------------------------------------------------------- encoders


def _bidirectional_mask(model, hidden, attention_mask):
    from transformers.masking_utils import create_bidirectional_mask  # ~1 s import: only when a cache is used

    return create_bidirectional_mask(config=model.base_model.config, inputs_embeds=hidden,
                                     attention_mask=attention_mask)


def encoder_prefix_forward(model, batch: dict, k: int) -> torch.Tensor:
    base = model.base_model
    h = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    mask = _bidirectional_mask(model, h, batch["attention_mask"])
    for layer in base.encoder.layer[:k]:
        h = layer(h, mask)
    return h


def encoder_top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    base = model.base_model
    mask = _bidirectional_mask(model, hidden, attention_mask)
    for layer in base.encoder.layer[k:]:
        hidden = layer(hidden, mask)
    if family(model).first_token_head:
        return model.classifier(hidden)  # RobertaClassificationHead reads the <s> token itself
    pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


# ----------------------------------------------------------------------------- decoders


def decoder_blocks(base) -> Optional[nn.ModuleList]:
    """The block list of a decoder's base model (the family's `blocks`: `h` for gpt2, `layers` for the llama-like)."""
    blocks = getattr(base, family_of(base.config.model_type).blocks or "layers", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def decoder_embedding_modules(base) -> list[nn.Module]:
    """What runs before block 0: rotary families' embed_tokens; gpt2's word + position tables and its dropout."""
    if family_of(base.config.model_type).rotary:
        return [base.embed_tokens]
    return [base.wte, base.wpe, base.drop]


def mask_kinds(config) -> list[str]:
    """The attention pattern of each block, chosen as the model's own forward chooses it (transformers 5):
    qwen2/qwen3 per block from config.layer_types (sliding on some blocks when use_sliding_window),
    mistral sliding on every block when config.sliding_window is set (its default is 4,096),
    llama and gpt2 plain causal."""
    n, attention = config.num_hidden_layers, family_of(config.model_type).attention
    if attention == "per_layer" and getattr(config, "layer_types", None):
        return list(config.layer_types)
    if attention == "sliding" and getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def decoder_masks(config, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  kinds: set) -> dict:
    """{kind: mask} for the attention kinds used: causal AND padding, built by transformers' public mask
    builders from the same arguments the model's forward passes them (no past key values)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # ~1 s import

    build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {kind: build[kind](config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids) for kind in kinds}


@dataclass
class BlockInputs:
    """What decoder blocks take besides the hidden states, built once for a run of blocks."""
    position_ids: torch.Tensor  # [1, T]: 0..T-1 in every row
    masks: list  # one attention mask per block of the run (causal or sliding-window, + padding)
    rotary: Optional[tuple]  # (cos, sin) of the rotary families; None for gpt2 (positions added at the embeddings)


def block_inputs(model, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> BlockInputs:
    """Positions, masks and rotary tables for blocks [start, stop), as the base model's forward builds them.

    Positions are 0..T-1 in every row, as the uncached forward numbers them (no position_ids given):
    right padding leaves each text's real tokens at 0..len-1 either way. The rotary tables are
    computed once for all blocks, as the model does.
    """
    config = model.base_model.config
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    kinds = mask_kinds(config)[start:stop]
    by_kind = decoder_masks(config, hidden, attention_mask, position_ids, set(kinds))
    rotary = model.base_model.rotary_emb(hidden, position_ids) if family_of(config.model_type).rotary else None
    return BlockInputs(position_ids=position_ids, masks=[by_kind[kind] for kind in kinds], rotary=rotary)


def run_block(block, hidden: torch.Tensor, inputs: BlockInputs, mask) -> torch.Tensor:
    """One decoder block, called as the base model calls it."""
    if inputs.rotary is None:  # GPT2Block
        return block(hidden, attention_mask=mask, position_ids=inputs.position_ids)
    return block(hidden, attention_mask=mask, position_ids=inputs.position_ids, position_embeddings=inputs.rotary)


def run_block_pooled(block, hidden: torch.Tensor, inputs: BlockInputs, mask, last: torch.Tensor) -> torch.Tensor:
    """The top's last block where only each row's pooled token is read -> [B, H].

    The block's own arithmetic (pre-norm, the same in all five families' forwards):
        h = x + attention(norm_1(x))         every position: the pooled token attends to all before it
        out = h + mlp(norm_2(h))             per position: only the pooled rows are needed
    so the MLP runs on B tokens instead of B x T: in a Llama block of H 256, I 688, 2 of 4 heads for
    k/v, the MLP is 3 x 256 x 688 = 528k of 724k weights (attention 2 x 256 x 256 + 2 x 256 x 128),
    ~3/4 of the last block's forward and backward saved, with the same numbers at the pooled token.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if inputs.rotary is None:  # GPT2Block: ln_1, attn, ln_2, mlp
        attn, _ = block.attn(block.ln_1(hidden), attention_mask=mask)
        h = (hidden + attn)[rows, last]
        return h + block.mlp(block.ln_2(h))
    attn, _ = block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=mask,
                              position_ids=inputs.position_ids, position_embeddings=inputs.rotary)
    h = (hidden + attn)[rows, last]
    return h + block.mlp(block.post_attention_layernorm(h))


def decoder_embed(model, batch: dict) -> torch.Tensor:
    """Token embeddings of a batch, as the base model's forward computes them before block 0."""
    base = model.base_model
    ids = batch["input_ids"]
    if family_of(base.config.model_type).rotary:
        return base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    h = base.wte(ids) + base.wpe(positions)
    if batch.get("token_type_ids") is not None:  # GPT2Model adds them as word embeddings (decoder tokenizers make none)
        h = h + base.wte(batch["token_type_ids"])
    return base.drop(h)


def decoder_prefix_forward(model, batch: dict, k: int) -> torch.Tensor:
    h = decoder_embed(model, batch)
    inputs = block_inputs(model, h, batch["attention_mask"], 0, k)
    for block, mask in zip(decoder_blocks(model.base_model)[:k], inputs.masks):
        h = run_block(block, h, inputs, mask)
    return h


def decoder_lm_top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """causal_lm: blocks [k, L), the final norm and `lm_head` at every position -> [B, T, vocab]."""
    blocks = decoder_blocks(model.base_model)
    L = len(blocks)
    if k < L:
        inputs = block_inputs(model, hidden, attention_mask, k, L)
        for block, mask in zip(blocks[k:], inputs.masks):
            hidden = run_block(block, hidden, inputs, mask)
    final_norm = getattr(model.base_model, family(model).final_norm)
    return model.lm_head(final_norm(hidden))


def decoder_top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Blocks [k, L), the final norm and `score` at each row's last position -> [B, num_labels].

    The classifier reads the last token of each row's mask (the cache keeps each text up to the
    token the uncached classifier pools, see pooled_lengths). The last block's MLP, the final norm
    and `score` act on each position alone, so they run on the pooled rows only (run_block_pooled).
    """
    blocks = decoder_blocks(model.base_model)
    L = len(blocks)
    last = attention_mask.sum(dim=1) - 1
    if k < L:
        inputs = block_inputs(model, hidden, attention_mask, k, L)
        for block, mask in zip(blocks[k:L - 1], inputs.masks[:-1]):
            hidden = run_block(block, hidden, inputs, mask)
        pooled = run_block_pooled(blocks[L - 1], hidden, inputs, inputs.masks[-1], last)
    else:  # train_top 0, a probe: every block is in the cache
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    final_norm = getattr(model.base_model, family(model).final_norm)
    return model.score(final_norm(pooled))


def pooled_lengths(model, ex: Examples) -> list[int]:
    """Tokens of each text the cache keeps: all of them for encoders; for decoders up to and including
    the token the classifier pools, which *ForSequenceClassification finds as the rightmost token that
    is not the pad id (index 0 when every token is). A tokenizer padding with eos pads texts that end in
    eos: the classifier reads the token before, and tokens after the pooled one never reach it (causal)."""
    pad = model.config.pad_token_id
    if not is_decoder(model) or pad is None or is_causal_lm(model):  # a causal LM is trained at every position
        return list(ex.lengths)
    return [1 + max((j for j, t in enumerate(ids) if t != pad), default=0) for ids in ex.input_ids]


# ----------------------------------------------------------------------------- either kind


def prefix_forward(model, batch: dict, k: int) -> torch.Tensor:
    """Embeddings + layers/blocks [0, k): the frozen part (run in eval mode, no autograd)."""
    if is_decoder(model):
        return decoder_prefix_forward(model, batch, k)
    return encoder_prefix_forward(model, batch, k)


def top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Layers/blocks [k, L) and the head on given hidden states (right-padded, `attention_mask`) -> logits
    ([B, num_labels]; a causal LM's [B, T, vocab])."""
    hidden = hidden.to(next(model.parameters()).dtype)  # the cache is fp32; train.precision bf16 weights are not
    if is_causal_lm(model):
        return decoder_lm_top_forward(model, hidden, attention_mask, k)
    if is_decoder(model):
        return decoder_top_forward(model, hidden, attention_mask, k)
    return encoder_top_forward(model, hidden, attention_mask, k)


class PrefixCache:
    """Outputs of the frozen prefix for every example, computed once.

    Stored unpadded as one [total_tokens, H] fp32 tensor plus offsets:
    2,000 texts * ~30 tokens * 384 * 4 B = ~92 MB. Above `disk_threshold` bytes
    the tensor lives in a memory-mapped file instead of RAM. Decoders keep each text
    up to the token their classifier pools (pooled_lengths); encoders keep every token.
    """

    def __init__(self, model, ex: Examples, k: int, device: str, batch_size: int, pad_id: int,
                 disk_dir: Optional[Path] = None, disk_threshold: int = 2 << 30,
                 log: Optional[Callable[[str], None]] = None, delay_s: float = QUIET_FOR_S):
        lengths = pooled_lengths(model, ex)
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
        # a progress line when caching takes longer than a few seconds (log=None: silent)
        shown = Progress("caching frozen prefix", math.ceil(len(order) / batch_size), unit="batch",
                         log=log, delay_s=delay_s) if log is not None else None
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                batch = {k2: v.to(device) for k2, v in collate(ex, idx, pad_id).items()}
                h = prefix_forward(model, batch, k).float().cpu()
                for row, i in enumerate(idx):
                    self.store[self.offsets[i]:self.offsets[i + 1]] = h[row, :lengths[i]]
                if shown is not None:
                    shown.update(s // batch_size + 1)
        if shown is not None:
            shown.close()
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


def frozen_prefix_modules(model: nn.Module, k: int) -> list[nn.Module]:
    """The embeddings and the first k layers/blocks: what a train_top variant freezes ([] when unsplittable)."""
    if k <= 0 or not supports_split_forward(model):
        return []
    base = model.base_model
    if is_decoder(model):
        return decoder_embedding_modules(base) + list(decoder_blocks(base)[:k])
    return [base.embeddings] + list(base.encoder.layer[:k])


def set_train_mode(model: nn.Module, k: int) -> None:
    """Train mode for the trainable part; the frozen prefix runs without dropout (eval), cached or not."""
    model.train()
    for module in frozen_prefix_modules(model, k):
        module.eval()


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


def build_prefix_caches(model: nn.Module, train_ex: Examples, val_ex: Examples, k: int, *, device: str, pad_id: int,
                        rank: int, checkpoint_dir: Optional[Path], log: Callable[[str], None]):
    """The frozen prefix's outputs for the training and validation texts (eval mode: no dropout)."""
    t0 = time.perf_counter()
    model.eval()
    cache = PrefixCache(model, train_ex, k, device, batch_size=64, pad_id=pad_id,
                        disk_dir=checkpoint_dir / f"cache-rank{rank}" if checkpoint_dir else None,
                        log=log if rank == 0 else None)
    val_cache = PrefixCache(model, val_ex, k, device, batch_size=64, pad_id=pad_id)
    log(f"cached frozen prefix (embeddings + {k} layers) for {len(train_ex)} + {len(val_ex)} texts: "
        f"{(cache.nbytes + val_cache.nbytes) / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
    return cache, val_cache


def prefix_caches(model: nn.Module, spec: VariantSpec, num_layers: int, train_ex: Examples, val_ex: Examples,
                  cfg: TrainConfig, *, device: str, pad_id: int, checkpoint_dir: Optional[Path] = None,
                  log: Callable[[str], None] = print) -> tuple[Optional[PrefixCache], Optional[PrefixCache]]:
    """(train cache, validation cache) of a train_top variant's frozen prefix, or (None, None) when not cached.

    The prefix is frozen, so its outputs depend on neither the learning rate nor the step: one pair
    serves every lr-search candidate and the real training (setup(caches=...)).
    """
    model.to(device)
    k = frozen_prefix_layers(spec, num_layers)
    if not (cfg.cache_frozen_prefix and k > 0 and supports_split_forward(model)):
        return None, None
    rank, _ = dist_info()
    return build_prefix_caches(model, train_ex, val_ex, k, device=device, pad_id=pad_id, rank=rank,
                               checkpoint_dir=checkpoint_dir, log=log)
