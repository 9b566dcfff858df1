"""The parameter audit: exact counts per computational layer, a closed-form check,
and training memory / FLOPs estimates. Works on the meta device: no weights load.

    records = audit_variants(params, num_labels, typical_seq_len, cache_tokens)  # [AuditRecord]
    summary_markdown(records)                                                    # audit/summary.md

The audit stage (stages/audit.py) and `depthtune audit` (depthtune/cli.py) both call
`audit_specs` / `audit_variants`; finetune checks the model it trains against the record.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

from torch import nn

from depthtune import tasks
from depthtune.config import ModelConfig, Params, VariantSpec, to_dict
from depthtune.model.families import attr, family_of, is_tied
from depthtune.errors import DepthtuneError
from depthtune.model.layer_order import ordered_layer_names
from depthtune.training.precision import resolve_precision
from depthtune.records import AuditRecord, LabelSet, TokenReport
from depthtune.runtime import pick_device
from depthtune.evaluation.scoring_batch import scoring_batch_size
from depthtune.model.param_names import classify_param, coarse_bucket
from depthtune.model.variants import BuiltVariant, build_variant, load_base_config, num_layers_of

FP32 = 4  # bytes per fp32 element


class AuditMismatch(DepthtuneError):
    pass


# ----------------------------------------------------------------------------- counting


def bucket_counts(model: nn.Module) -> list[dict]:
    """Fine buckets in model order: [{name, total, trainable}].

    A parameter shared by two modules (a causal LM's lm_head tied to the input embeddings) is counted
    once, in the bucket of its first name; the second bucket gets a row {name, total 0, trainable 0,
    tied_to: <the first bucket>} so the audit shows the tie."""
    buckets: "OrderedDict[str, list[int]]" = OrderedDict()
    first_bucket: dict[int, str] = {}
    tied: "OrderedDict[str, str]" = OrderedDict()
    for name, p in model.named_parameters(remove_duplicate=False):
        bucket = classify_param(name)
        if id(p) in first_bucket:
            if first_bucket[id(p)] != bucket:
                tied.setdefault(bucket, first_bucket[id(p)])
            continue
        first_bucket[id(p)] = bucket
        b = buckets.setdefault(bucket, [0, 0])
        b[0] += p.numel()
        b[1] += p.numel() if p.requires_grad else 0
    rows = [{"name": k, "total": v[0], "trainable": v[1]} for k, v in buckets.items()]
    rows += [{"name": k, "total": 0, "trainable": 0, "tied_to": to} for k, to in tied.items() if k not in buckets]
    return rows


def coarse_counts(buckets: list[dict]) -> list[dict]:
    """Embeddings, layer.0 .. layer.k-1 (adapters included), pooler, final_norm, head (`tied_to` kept)."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for b in buckets:
        c = coarse_bucket(b["name"])
        row = out.setdefault(c, {"name": c, "total": 0, "trainable": 0, "adapter": 0})
        row["total"] += b["total"]
        row["trainable"] += b["trainable"]
        if b["name"].endswith("adapter"):
            row["adapter"] += b["total"]
        if "tied_to" in b:
            row["tied_to"] = b["tied_to"]
    return list(out.values())


# ----------------------------------------------------------------------------- closed form


def closed_form_total(cfg, num_labels: int, task: str = "classification") -> Optional[tuple[int, str]]:
    """Total parameters from the config alone (no model built), or None for a family without a closed form
    (depthtune.model.families: each row's `closed_form`).

    task classification: num_labels=0 the bare model as AutoModel builds it; N AutoModelForSequenceClassification.
    task causal_lm (decoders): AutoModelForCausalLM, the lm_head V*H counted only when untied.
    """
    form = family_of(cfg.model_type).closed_form
    row = tasks.get(task)
    return None if form is None else form(cfg, row.num_labels(num_labels), row.lm_head)


def closed_form_adapters(model: nn.Module) -> int:
    """LoRA adds r*(in+out) per adapted linear module: A is r x in, B is out x r."""
    total = 0
    for _, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "r") and hasattr(mod, "in_features"):
            for key, r in mod.r.items():
                if key in mod.lora_A:
                    total += r * (mod.in_features + mod.out_features)
    return total


# ----------------------------------------------------------------------------- estimates


def sdpa_block(cfg) -> bool:
    """Pre-RMSNorm (Llama-layout) blocks run fused SDPA without dropout: no S x S attention probabilities kept."""
    return family_of(cfg.model_type).block == "pre_rms"


def _dims(cfg) -> dict:
    H = attr(cfg, "hidden_size", "dim", "n_embd")
    A = attr(cfg, "num_attention_heads", "n_heads", "n_head")
    hd = attr(cfg, "head_dim", default=H // A)
    return {
        "H": H,
        "I": attr(cfg, "intermediate_size", "hidden_dim", "n_inner") or 4 * H,
        "A": A,
        "L": num_layers_of(cfg),
        "V": attr(cfg, "vocab_size"),
        "q": A * hd,  # query width: heads x head_dim (= H unless head_dim says otherwise, qwen3)
        "kv": attr(cfg, "num_key_value_heads", default=A) * hd,  # grouped-query attention: fewer k/v heads
    }


def lowest_trainable_layer(buckets: list[dict]) -> Optional[int]:
    """-1 when the embeddings train; the index of the lowest layer with a trainable
    parameter; None when only the top (pooler/head/final norm) trains."""
    lowest = None
    for b in buckets:
        if not b["trainable"]:
            continue
        if b["name"].startswith("embeddings"):
            return -1
        if b["name"].startswith("layer."):
            idx = int(b["name"].split(".")[1])
            lowest = idx if lowest is None else min(lowest, idx)
    return lowest


def block_activation_bytes(cfg, precision: str, seq_len: int, lora: Optional[tuple[int, int]] = None) -> float:
    """Bytes autograd keeps per token for one block that backward passes through.

    Llama family (llama, mistral, qwen2, qwen3: pre-RMSNorm, GQA, SwiGLU, SDPA, no dropout), elements:
      2 RMSNorms x (input x, x*rstd, w*x*rstd = the next matmuls' input)       6H
      attention: q, k, v after rotary (SDPA's inputs), SDPA out (= o_proj in)  2q + 2kv   (q = nh*hd, kv = nkv*hd)
      SwiGLU: gate, silu(gate), up, silu(gate)*up (down_proj's input)          4I
      SDPA (flash / memory-efficient) keeps a logsumexp per head and token, no S x S matrix; no dropout mask
      (+ 4 bytes each, every precision: 2 RMSNorm rstd and nh logsumexp per token)
      qwen3's q_norm/k_norm: their input and x*rstd, 2(q + kv), and an rstd per head (bytes as RMSNorm's)
      bytes: fp32 4 * all; bf16 weights: RMSNorm upcasts its input (4H per norm) and keeps x*rstd and
      its output in bf16 (2H + 2H), the rest 2 each; bf16 autocast: RMSNorm runs in fp32 (4H + 4H) and
      the matmul's bf16 copy of its output is what is kept (2H), the fp32 cos/sin promote q and k to
      fp32 after rotary (4q + 4kv kept), the rest bf16 (2 each). Checked against the tensors autograd
      saves (torch 2.13, transformers 5, llama/qwen2/qwen3/mistral, 4 heads, 2 k/v heads): exact in all three
      precisions (tests/test_audit.py), the autocast weight copies apart (counted per step in `estimate`).
    GPT-2 (pre-LayerNorm, gelu_new, dropout 0.1), elements, measured with the same saved-tensor count:
      10H (LayerNorm inputs, c_attn out, attention out, c_proj in, dropout masks) + 5I (c_fc out, gelu_new's
      tanh-approximation intermediates, c_proj in) + 3*A*S (attention dropout sends SDPA down its math path:
      probabilities, mask and dropped probabilities)
    Encoders (BERT family, post-LayerNorm, GELU, dropout), elements:
      10.5H + 2I + 3*A*S: inputs of q/k/v/out and the ffn, residual + LayerNorm inputs, dropout masks
      (1 byte each), ffn pre/post-GELU (2I), softmax probs, its dropout mask and dropped probs, the
      expanded mask (3*A*S). Measured with saved_tensors_hooks (MiniLM-L6, S=78): 9,920 per layer
      against 9,912 from the formula.
      LoRA on an encoder (lora = (r, targets)): the frozen base matmuls keep no input (grads w.r.t.
      their weights are not needed): - 2.5H - I; each adapter keeps its dropout mask, the dropped
      input and lora_A's output: + targets * (1.25H + r). Measured (r 8, query+value): 8,398 vs 8,392.
      BitFit freezes every matmul weight too (biases and LayerNorms train): lora = (0, 0), - 2.5H - I.
      GPT-2 and encoders in bf16: 2 bytes each; bf16 autocast: the residual stream and LayerNorm inputs
      (4H) fp32, the rest bf16.
    """
    d = _dims(cfg)
    H, I, A, q, kv = d["H"], d["I"], d["A"], d["q"], d["kv"]
    family = family_of(cfg.model_type)
    if family.block == "pre_rms":
        rest = 2 * q + 2 * kv + 4 * I  # attention + SwiGLU
        small = 4 * (2 + A)  # fp32 in every precision: each RMSNorm's rstd (1 per token) and SDPA's logsumexp per head
        if family.qk_norm:  # q_norm, k_norm (RMSNorm per head): fp32 input + x*rstd (bf16 in bf16 / autocast) + rstd
            kv_heads = kv // (q // A)
            small += (8 if precision == "fp32" else 6) * (q + kv) + 4 * (A + kv_heads)
        if precision == "fp32":
            return 4 * (6 * H + rest) + small
        if precision == "bf16":  # per norm: fp32 input 4H + bf16 x*rstd 2H + bf16 output 2H
            return 2 * (4 * H + 2 * H + 2 * H) + 2 * rest + small
        # autocast, per norm: fp32 input 4H + fp32 x*rstd 4H + the matmul's bf16 copy 2H; fp32 rotary q, k
        return 2 * (4 * H + 4 * H + 2 * H) + 4 * (q + kv) + 2 * rest + small
    if family.block == "pre_ln":
        elements = 10 * H + 5 * I + 3 * A * seq_len
    else:
        elements = 10.5 * H + 2 * I + 3 * A * seq_len
        if lora:
            r, targets = lora
            elements += -2.5 * H - I + targets * (1.25 * H + r)
    if precision == "fp32":
        return 4 * elements
    if precision == "bf16":
        return 2 * elements
    return 4 * 4 * H + 2 * (elements - 4 * H)  # autocast: residual + LayerNorm inputs fp32, the rest bf16


def layer_index(b: dict) -> Optional[int]:
    """The block index of a `layer.<i>.<part>` bucket; None for embeddings, pooler, head, final norm."""
    return int(b["name"].split(".")[1]) if b["name"].startswith("layer.") else None


def is_matmul(b: dict) -> bool:
    """2-D weights that do matmuls: everything but embeddings and norms."""
    return not b["name"].startswith("embeddings") and not b["name"].endswith("norm")


def matmul_params(buckets: list[dict], low: Optional[int], tied_head: int) -> tuple[int, int, int]:
    """(M, M_bp, M_train): matmul weights in all, in the span backward passes through, trainable.
    tied_head = V*H when a causal LM's lm_head is the embedding matrix: it still does a V x H matmul
    per token (not counted under `head`, whose weight is the embeddings'); trainable when they train."""
    M = sum(b["total"] for b in buckets if is_matmul(b)) + tied_head
    M_train = sum(b["trainable"] for b in buckets if is_matmul(b)) + (tied_head if low == -1 else 0)
    M_bp = tied_head if low is not None else 0
    for b in buckets:
        if not is_matmul(b):
            continue
        if b["name"].startswith("layer."):
            idx = int(b["name"].split(".")[1])
            if low is not None and idx >= max(low, 0):
                M_bp += b["total"]
        elif b["trainable"] or low is not None:  # pooler / head sit above every layer
            M_bp += b["total"]
    return M, M_bp, M_train


EVAL_BATCH = 64  # training.setup's eval_batch_size and the prefix cache's batch


def backward_temporary_bytes(cfg, tokens: int, seq_len: int, precision: str) -> int:
    """One block's backward temporaries: the grads of its FFN pre/post-activation (2I) and of the
    residual stream and attention outputs (~4H) per token, and for attention that materializes
    probabilities (encoders, GPT-2) their grad, the softmax backward's and the dropout's (3*A*S)."""
    d = _dims(cfg)
    attn = 0 if sdpa_block(cfg) else 3 * d["A"] * seq_len
    return int(tokens * (2 * d["I"] + 4 * d["H"] + attn) * (FP32 if precision == "fp32" else 2))


def activation_bytes(cfg, low: Optional[int], n_bp: int, batch_size: int, seq_len: int, *, task: str,
                     precision: str, gradient_checkpointing: bool, any_trainable: bool,
                     lora: Optional[tuple[int, int]] = None) -> int:
    """Activations kept for backward at the start of backward (their peak), with the head's."""
    d = _dims(cfg)
    H, V = d["H"], d["V"]
    tokens = batch_size * seq_len
    per_block = block_activation_bytes(cfg, precision, seq_len, lora if not sdpa_block(cfg) else None)
    if gradient_checkpointing and n_bp:
        # each backpropagated block keeps only its input, B*S*H (fp32 residual stream, bf16 with bf16
        # weights), and one block's full activations exist at a time while backward recomputes it
        residual = 2 if precision == "bf16" else 4
        acts = tokens * (n_bp * H * residual + per_block)
    else:
        acts = tokens * n_bp * per_block
    # embeddings output when they train (2H/token) and the pooler/classifier head: B * 2H, all in fp32 bytes
    acts += tokens * (2 * H if low == -1 else 0) * FP32 + batch_size * 2 * H * FP32
    if tasks.get(task).per_position and any_trainable:
        # the LM head's logits, B*S*V, in fp32 for the loss in every precision. depthtune's token_nll
        # (cross_entropy over logits[:, :-1] transposed): the logits (4 B) and the log-softmax of a
        # contiguous copy (4 B) stay until backward, which then holds the log-softmax's grad, its input's
        # and the logits' grad scattered into full-size zeros (12 B) with them: 20 B per token per
        # vocabulary entry (measured: causal-LM example, full at 16 x 61, 1,000 MiB; 12 B left 228 MiB out)
        acts += tokens * V * 5 * FP32
    return int(acts)


def forward_buffer_bytes(cfg, tokens: int, seq_len: int) -> int:
    """One layer's no-grad forward at its peak, fp32: the FFN's pre- and post-activation (2I), the
    residual stream (H) and the attention scores or probabilities (A*S, encoders and GPT-2) per token
    (fitted: a 4-layer BERT, H 256, at 64 x 128, 2,840 floats per token measured, this gives 2,816)."""
    d = _dims(cfg)
    d_attn = 0 if sdpa_block(cfg) else d["A"] * seq_len
    return int(tokens * (2 * d["I"] + d["H"] + d_attn) * FP32)


def lm_scoring_bytes(cfg, seq_len: int) -> int:
    """Validation of a causal LM (lm_scoring.score_texts): the logits of one scoring batch, the batch
    capped so they hold <= MAX_LOGIT_FLOATS, three times over: the logits, cross_entropy's contiguous
    copy of their transpose and its log-softmax (measured: a 4-layer Llama, V 8,000, at 64 x 128,
    3.3 x 248 MiB over the weights and optimizer states)."""
    V = _dims(cfg)["V"]
    return int(3 * scoring_batch_size(V, seq_len, EVAL_BATCH) * seq_len * V * FP32)


def process_peaks(cfg, parts: dict, *, batch_size: int, seq_len: int, precision: str, backprop_layers: int,
                  pretrained: bool, task: str = "classification") -> dict:
    """Every memory term and the three peaks of a finetune process; total = the largest peak.
    `parts` (memory_parts): weights, gradients, adamw_states, activations, autocast_weight_copies, prefix_cache,
    best_weights.

      training_peak   = weights + max(grads, backward temporaries, forward buffers) + AdamW states + activations
                        + autocast weight copies + prefix cache + best weights
      build_peak      = weights (transformers 5 builds on the meta device and maps the checkpoint)
      evaluation_peak = weights + AdamW + best + prefix cache + EVAL_BATCH*S*(2I + H + A*S)*4 (no-grad
                        forwards; a causal LM's scoring: 3 x its logits when larger, lm_scoring_bytes)
    """
    weights, grads, adamw, cache, best = (parts[k] for k in ("weights", "gradients", "adamw_states",
                                                             "prefix_cache", "best_weights"))
    # backward: the parameters' grads grow while a block's own temporaries (grads of its FFN and attention
    # tensors) come and go; the peak holds the larger of the two on top of the activations (measured,
    # MiniLM-L6 at 16 x 78, trimmed heap: full/depth3 +37 MiB over weights + AdamW + best + activations,
    # where grads are 86/66 MiB; LoRA, grads ~0: +35 MiB = one block's temporaries). With nothing to
    # backpropagate and no prefix cache (a probe run on the whole model), the step's transient is the
    # layers' no-grad forward at the training batch instead
    temporaries = backward_temporary_bytes(cfg, batch_size * seq_len, seq_len, precision) if backprop_layers else 0
    forward = forward_buffer_bytes(cfg, batch_size * seq_len, seq_len) if not backprop_layers and not cache else 0
    grads_or_temps = max(grads, temporaries, forward)
    training = sum(parts.values()) - grads + grads_or_temps
    # building: the weights once. transformers 5 builds on the meta device and maps the safetensors
    # checkpoint, so a pretrained build holds 1x too (measured MiniLM-L6, fresh process: 11 MiB after the
    # build, 87 MiB once every weight is read, for 87 MiB of weights; transformers 4's random init + copy
    # held 2x). The step peak comes later, so the process peak is the larger of the two
    build = weights
    # validation (and the prefix cache's build): no-grad forwards at the evaluation batch (64), on top of
    # what lives then: weights, AdamW states, best weights, the prefix cache (no grads, no activations);
    # a causal LM's scoring holds its logits instead (lm_scoring_bytes, when larger). It sets the total
    # when the step peak is small (a probe: weights + cache + this)
    eval_buffers = forward_buffer_bytes(cfg, EVAL_BATCH * seq_len, seq_len)
    if tasks.get(task).per_position:
        eval_buffers = max(eval_buffers, lm_scoring_bytes(cfg, seq_len))
    evaluation = weights + adamw + best + cache + eval_buffers
    return {**parts, "backward_temporaries": temporaries, "forward_buffers": forward,
            "evaluation_buffers": eval_buffers, "training_peak": training, "build_peak": build,
            "evaluation_peak": evaluation, "total": max(training, build, evaluation)}


def estimate(cfg, buckets: list[dict], total: int, trainable: int, batch_size: int, seq_len: int,
             cache_tokens: int = 0, *, task: str = "classification", precision: str = "fp32",
             gradient_checkpointing: bool = False, lora: Optional[tuple[int, int]] = None,
             pretrained: bool = True) -> dict:
    """Training memory (bytes, memory_parts and process_peaks) and FLOPs per token (flops_per_token), with the
    formulas spelled out there.

    memory = max(training_peak, build_peak, evaluation_peak)
      seq_len: for the step peak, the LONGEST batch: batching.length_grouped_batches sorts each
        mega-batch by length, so the longest examples share a batch padded to the longest one
        (read_token_stats gives the train split's max, not its p95; mean-length batches cost less)
      not counted: the allocator's free blocks (CUDA's cache, glibc's arenas: +30-90% on the CPU under
        glibc's dynamic mmap threshold). depthtune.training.memory measures allocated bytes apart from them
        (they are its "reserved" figure): the estimate is of allocated bytes, on both devices
    """
    flops = flops_per_token(cfg, buckets, seq_len, cache_tokens, task=task,
                            gradient_checkpointing=gradient_checkpointing)
    low, n_bp = flops.pop("low"), flops.pop("n_bp")
    wb = 2 if precision == "bf16" else FP32
    parts = memory_parts(cfg, buckets, total, trainable, batch_size, seq_len, cache_tokens, low=low, n_bp=n_bp,
                         task=task, precision=precision, gradient_checkpointing=gradient_checkpointing, lora=lora)
    return {
        "memory_bytes": process_peaks(cfg, parts, batch_size=batch_size, seq_len=seq_len, precision=precision,
                                      backprop_layers=n_bp, pretrained=pretrained, task=task),
        "flops_per_token": flops,
        "assumptions": {"batch_size": batch_size, "seq_len": seq_len, "task": task, "precision": precision,
                        "gradient_checkpointing": gradient_checkpointing, "weights_bytes_per_param": wb,
                        "optimizer": f"AdamW, states {'bf16' if wb == 2 else 'fp32'}",
                        "backprop_layers": n_bp, "lowest_trainable_layer": low},
    }


def flops_per_token(cfg, buckets: list[dict], seq_len: int, cache_tokens: int, *, task: str,
                    gradient_checkpointing: bool) -> dict:
    """FLOPs per token of a training step (S = seq_len), with the backpropagated span (low, n_bp) it rests on.

      forward  = 2 * M + 4*S*H*L               (M = matmul weights outside the embeddings, a tied lm_head's
                                                 V*H included; 4SH per layer for QK^T and AV)
      backward = 2 * M_bp + 8*S*H*n_bp + 2 * M_trainable
                  (grads w.r.t. activations through the backpropagated span,
                   grads w.r.t. weights only for trainable matmul weights)
      checkpointing adds one more forward of the backpropagated blocks: + 2 * M_bp(blocks) + 4*S*H*n_bp
      step = what one optimizer step computes per token, as dense + per_position * S: the same sums with
        a cached frozen prefix's layers left out of the forward (prefix_cache runs them once, before
        training); depthtune.planning.step_time turns it into seconds
    """
    d = _dims(cfg)
    H, L = d["H"], d["L"]
    low = lowest_trainable_layer(buckets)
    n_bp = 0 if low is None else L - max(low, 0)
    tied_head = d["V"] * H if tasks.get(task).lm_head and is_tied(cfg) else 0
    M, M_bp, M_train = matmul_params(buckets, low, tied_head)
    fwd = 2 * M + 4 * seq_len * H * L
    bwd = 2 * M_bp + 8 * seq_len * H * n_bp + 2 * M_train
    # one optimizer step per token = dense + per_position * S; a cached frozen prefix (train_top) is not run
    cached = (L if low is None else max(low, 0)) if cache_tokens else 0
    M_step = M - sum(b["total"] for b in buckets if is_matmul(b) and layer_index(b) is not None
                     and layer_index(b) < cached)
    step = {"dense": 2 * M_step + 2 * M_bp + 2 * M_train, "per_position": 4 * H * (L - cached) + 8 * H * n_bp,
            "per_sequence": 0, "cached_layers": cached}
    if tasks.get(task).labelled and not family_of(cfg.model_type).decoder:
        first_token_heads(step, buckets, low)
    if gradient_checkpointing and n_bp:
        M_blocks = sum(b["total"] for b in buckets if is_matmul(b) and layer_index(b) is not None
                       and layer_index(b) >= max(low, 0))
        bwd += 2 * M_blocks + 4 * seq_len * H * n_bp  # the recompute: one more forward of those blocks
        step["dense"] += 2 * M_blocks
        step["per_position"] += 4 * H * n_bp
    return {"forward": int(fwd), "backward": int(bwd), "train": int(fwd + bwd), "step": step, "low": low,
            "n_bp": n_bp}


def first_token_heads(step: dict, buckets: list[dict], low: Optional[int]) -> None:
    """An encoder's pooler and head read one token per text ([CLS]), not every token: moved from the per-token
    `dense` term to `per_sequence` (a probe's whole step; a decoder's score head runs on every position, as
    transformers computes it)."""
    tops = [b for b in buckets if b["name"] in ("pooler", "head")]  # pooler below head
    top, top_train = sum(b["total"] for b in tops), sum(b["trainable"] for b in tops)
    # input gradients: through all of them when layers below train; else only above the lowest
    # trainable one (autograd computes no gradient for an input nothing below needs)
    lowest = next((i for i, b in enumerate(tops) if b["trainable"]), len(tops))
    top_bp = top if low is not None else sum(b["total"] for b in tops[lowest + 1:])
    top_in_dense = sum(b["total"] for b in tops if b["trainable"] or low is not None)  # as M_bp had it
    step["dense"] -= 2 * top + 2 * top_in_dense + 2 * top_train
    step["per_sequence"] = 2 * top + 2 * top_bp + 2 * top_train


def memory_parts(cfg, buckets: list[dict], total: int, trainable: int, batch_size: int, seq_len: int,
                 cache_tokens: int, *, low: Optional[int], n_bp: int, task: str, precision: str,
                 gradient_checkpointing: bool, lora: Optional[tuple[int, int]]) -> dict:
    """The terms process_peaks adds up (bytes).

      wb          = 2 for bf16 weights, else 4 (fp32 and bf16 autocast keep fp32 weights)
      weights     = total * wb                      (tied embeddings / lm_head counted once)
      grads       = trainable * wb                  (grads have the params' dtype)
      adamw       = trainable * 2 * wb              (exp_avg + exp_avg_sq: torch keeps them in the params' dtype)
      activations = B*S * n_bp * block_activation_bytes   (see there; per family and precision)
        n_bp = layers from the lowest trainable one to the top (frozen layers run without autograd and
        store nothing); with gradient checkpointing B*S * (n_bp * H * 4 + one block's activations);
        causal_lm adds the logits: B*S*V*20 (activation_bytes)
      autocast weight copies = 2 * M_bp             (bf16 copy of every matmul weight backward needs;
                                                     checkpointing: only the trainable ones, 2 * M_train,
                                                     autocast's cache of the weights that require grad)
      prefix cache = cache_tokens * H * 4       (frozen-prefix outputs kept for every
                                                 train + validation token, train_top variants)
      best weights = trainable * wb             (training.BestWeights' copy, alive from the first validation on:
                                                 measured +1x trainable bytes on the step peak, MiniLM full 86 MiB)
    """
    d = _dims(cfg)
    tied_head = d["V"] * d["H"] if tasks.get(task).lm_head and is_tied(cfg) else 0
    _, M_bp, M_train = matmul_params(buckets, low, tied_head)
    wb = 2 if precision == "bf16" else FP32
    activations = activation_bytes(cfg, low, n_bp, batch_size, seq_len, task=task, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, any_trainable=trainable > 0,
                                   lora=lora)
    copies = 0
    if precision == "bf16-autocast":
        copies = 2 * (M_train if gradient_checkpointing else M_bp)
    return {"weights": total * wb, "gradients": trainable * wb, "adamw_states": trainable * 2 * wb,
            "activations": activations, "autocast_weight_copies": copies, "prefix_cache": cache_tokens * d["H"] * FP32,
            "best_weights": trainable * wb}


# ----------------------------------------------------------------------------- the audit


def estimate_settings(spec: VariantSpec, model_source: str, *, task: str, precision: str,
                      gradient_checkpointing: bool) -> dict:
    """estimate()'s keyword arguments that the variant's kind decides: the activations its frozen matmuls keep
    (`Method.frozen_matmuls`) and whether it starts from pretrained weights. The audit and the planner both call
    it, so `depthtune plan` and the audit record give one memory figure for every kind."""
    return {"task": task, "precision": precision, "gradient_checkpointing": gradient_checkpointing,
            "lora": spec.method.frozen_matmuls(spec.options),
            "pretrained": model_source != "scratch" and spec.method.pretrained}


def audit_built(built: BuiltVariant, *, variant_name: str, spec: VariantSpec, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, check: bool = True,
                cache_tokens: int = 0, task: str = "classification", precision: str = "fp32",
                gradient_checkpointing: bool = False, model_source: str = "") -> AuditRecord:
    """Count a built variant (meta device is enough), check the closed form, estimate its cost.

    check=True raises AuditMismatch when counted != closed form; typical_seq_len adds the
    estimates at the typical batch shape (the tokenized train split's p95 length). precision is
    the resolved one (fp32 | bf16-autocast | bf16, depthtune.training.precision.resolve_precision).
    """
    model, cfg = built.model, built.config
    buckets = bucket_counts(model)
    total = sum(b["total"] for b in buckets)
    trainable = sum(b["trainable"] for b in buckets)
    adapters = sum(b["total"] for b in buckets if b["name"].endswith("adapter"))
    cf = closed_form_total(cfg, num_labels, task=task)
    closed = None
    if cf is not None:
        base, formula = cf
        expected = base + closed_form_adapters(model)
        closed = {"total": expected, "formula": formula, "adapters": adapters, "matches": expected == total}
        if check and expected != total:
            raise AuditMismatch(f"variant {variant_name}: counted {total:,} parameters but the closed form from "
                                f"the config gives {expected:,} ({formula})")
    # only kinds with a cacheable frozen prefix (train_top, probe) keep its outputs
    cache_tokens = cache_tokens if spec.method.cached_prefix_layers(spec.options, built.num_layers) else 0
    settings = estimate_settings(spec, model_source, task=task, precision=precision,
                                 gradient_checkpointing=gradient_checkpointing)
    typical = None
    if typical_seq_len:
        typical = estimate(cfg, buckets, total, trainable, batch_size, typical_seq_len, cache_tokens, **settings)
    architecture = {"model_type": cfg.model_type, "num_layers": built.num_layers, "hidden_size": _dims(cfg)["H"],
                    "num_labels": tasks.get(task).num_labels(num_labels)}
    if tasks.get(task).lm_head:
        architecture["task"] = task
        architecture["tied_lm_head"] = is_tied(cfg)
    return AuditRecord(
        variant=variant_name,
        spec=to_dict(spec),
        description=spec.describe(),
        architecture=architecture,
        total_params=total,
        trainable_params=trainable,
        trainable_fraction=trainable / total if total else 0.0,
        adapter_params=adapters,
        closed_form=closed,
        layers=coarse_counts(buckets),
        buckets=buckets,
        estimates=estimate(cfg, buckets, total, trainable, batch_size, seq_len, cache_tokens, **settings),
        estimates_typical=typical,
    )


def audit_specs(model_cfg: ModelConfig, base_config, specs: Iterable[tuple[str, VariantSpec]], *, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, cache_tokens: int = 0,
                where: str = "variants.{name}", task: str = "classification", precision: str = "fp32",
                gradient_checkpointing: bool = False) -> list[AuditRecord]:
    """Audit each (name, spec) of one model on the meta device; `where` names a spec in errors."""
    records = []
    for name, spec in specs:
        built = build_variant(model_cfg, spec, num_labels, device="meta", base_config=base_config,
                              path=where.format(name=name), task=task)
        records.append(audit_built(built, variant_name=name, spec=spec, num_labels=num_labels,
                                   batch_size=batch_size, seq_len=seq_len, typical_seq_len=typical_seq_len,
                                   cache_tokens=cache_tokens, task=task, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, model_source=model_cfg.source))
    return records


def planned_precision(params: Params) -> str:
    """The precision finetune will train in: train.precision resolved for the device it will use
    (auto: bf16 autocast on cuda, fp32 on the CPU). An explicit `train.device: cuda` counts as cuda
    even where the audit runs without one (the audit plans; finetune refuses a missing GPU)."""
    device = params.train.device if params.train.device != "auto" else pick_device("auto")
    return resolve_precision(params.train.precision, device)


def audit_variants(params: Params, num_labels: int, typical_seq_len: Optional[int] = None,
                   cache_tokens: int = 0, precision: Optional[str] = None) -> list[AuditRecord]:
    """Every variant of params.yaml, in params order, at the training batch shape
    (train.batch_size x train.max_length), for params.task and train.gradient_checkpointing.
    precision: the resolved one (None: planned_precision(params)). cache_tokens counts only when
    the frozen prefix is cached."""
    return audit_specs(params.model, load_base_config(params.model), params.variants.items(),
                       num_labels=num_labels, batch_size=params.train.batch_size,
                       seq_len=params.train.max_length, typical_seq_len=typical_seq_len,
                       cache_tokens=cache_tokens if params.train.cache_frozen_prefix else 0, task=params.task,
                       precision=precision or planned_precision(params),
                       gradient_checkpointing=params.train.gradient_checkpointing)


# ----------------------------------------------------------------------------- inputs of the audit stage


def read_num_labels(labels_path: Path) -> int:
    """The label count from the prepare stage's labels.json; 2 when it does not exist yet (a quick audit)."""
    if not labels_path.exists():
        return 2
    return len(LabelSet.read(labels_path).names)


def read_token_stats(report_path: Path) -> tuple[Optional[int], int]:
    """(the longest train example's token length, tokens in train + validation) from the tokenization
    report; (None, 0) when it does not exist yet. The longest length sets the batch shape of the
    estimates that are compared with the measured peak: length-grouped batching puts the longest
    examples into one batch, padded to the longest (a p95 shape under-counts that step's activations);
    the token count sizes the frozen-prefix cache."""
    if not report_path.exists():
        return None, 0
    report = TokenReport.read(report_path)
    return report.longest("train") or report.p95("train"), report.tokens("train", "validation")  # old reports: p95


# ----------------------------------------------------------------------------- summary


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(records: list[AuditRecord]) -> str:
    """One row per variant: counts, the closed-form check, memory and FLOPs estimates."""
    def shape(e: dict) -> str:
        return f"{e['assumptions']['batch_size']} x {e['assumptions']['seq_len']}"

    lines = ["| variant | spec | layers | total params | trainable | trainable % | closed form | "
             "est. train memory (batch x tokens) | at max_length | fwd GFLOPs/token | train GFLOPs/token |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in records:
        check = "n/a" if r.closed_form is None else ("ok" if r.closed_form["matches"] else "MISMATCH")
        flops = r.estimates["flops_per_token"]
        used = r.estimates_typical or r.estimates  # AuditRecord.memory_estimate(): the figure every report shows
        lines.append(f"| {r.variant} | {r.description} | {r.architecture['num_layers']} | "
                     f"{fmt_int(r.total_params)} | {fmt_int(r.trainable_params)} | "
                     f"{100 * r.trainable_fraction:.2f} | {check} | "
                     f"{fmt_bytes(r.memory_estimate())} ({shape(used)}) | "
                     f"{fmt_bytes(r.estimates['memory_bytes']['total'])} ({shape(r.estimates)}) | "
                     f"{flops['forward'] / 1e9:.3f} | {flops['train'] / 1e9:.3f} |")
    return "\n".join(lines)


def summary_markdown(records: list[AuditRecord]) -> str:
    """The variants table, then trainable / total parameters per layer, variants side by side."""
    lines = ["# Parameter audit", "", summary_table(records),
             "", "## Trainable parameters per layer", "",
             "| layer | " + " | ".join(r.variant for r in records) + " |",
             "|---|" + "---:|" * len(records)]
    for name in ordered_layer_names(records):
        cells = []
        for r in records:
            row = next((x for x in r.layers if x["name"] == name), None)
            if row is None:
                cells.append("—")
            elif "tied_to" in row:  # a tied lm_head: its weight is counted once, under the row it is tied to
                cells.append(f"tied to {row['tied_to']}")
            else:
                cells.append(f"{fmt_int(row['trainable'])} / {fmt_int(row['total'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shape = records[0].estimates["assumptions"] if records else {}
    ckpt = "gradient checkpointing" if shape.get("gradient_checkpointing") else "no gradient checkpointing"
    lines += ["", "Estimated training memory: at the batch size x the longest tokenized train text (length-grouped "
              "batches put the longest texts in one batch): the figure the finetune record, the comparison report, "
              "MLflow and `depthtune plan` show; *at max_length*: every text padded to train.max_length. "
              f"{shape.get('task', 'classification')}, precision {shape.get('precision', 'fp32')}, {ckpt}, "
              "AdamW; every term in audit/<variant>.json (`estimates.memory_bytes`), formulas in "
              "depthtune/planning/audit.py (`estimate`).", ""]
    return "\n".join(lines)
