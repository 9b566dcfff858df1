"""What a variant costs to train, from its config and its parameter buckets alone (no weights, no data): memory
per term and process peak, FLOPs per token of a step, by family block layout and precision. The audit records it
(depthtune.planning.audit), the planner searches batch sizes with it, step_time turns its FLOPs into seconds.

    estimate(cfg, buckets, total, trainable, batch_size, seq_len, cache_tokens, **estimate_settings(spec, ...))
"""
from __future__ import annotations

from typing import Optional

from depthtune import tasks
from depthtune.config import VariantSpec
from depthtune.evaluation.scoring_batch import scoring_batch_size
from depthtune.model.families import attr, family_of, is_tied
from depthtune.model.variants import num_layers_of

FP32 = 4  # bytes per fp32 element


def estimate_settings(spec: VariantSpec, model_source: str, *, task: str, precision: str,
                      gradient_checkpointing: bool) -> dict:
    """estimate()'s keyword arguments that the variant's kind decides: the activations its frozen matmuls keep
    (`Method.frozen_matmuls`) and whether it starts from pretrained weights. The audit and the planner both call
    it, so `depthtune plan` and the audit record give one memory figure for every kind."""
    return {"task": task, "precision": precision, "gradient_checkpointing": gradient_checkpointing,
            "lora": spec.method.frozen_matmuls(spec.options),
            "pretrained": model_source != "scratch" and spec.method.pretrained}


def sdpa_block(cfg) -> bool:
    """Pre-RMSNorm (Llama-layout) blocks run fused SDPA without dropout: no S x S attention probabilities kept."""
    return family_of(cfg.model_type).block == "pre_rms"


def dims(cfg) -> dict:
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
    d = dims(cfg)
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
    d = dims(cfg)
    attn = 0 if sdpa_block(cfg) else 3 * d["A"] * seq_len
    return int(tokens * (2 * d["I"] + 4 * d["H"] + attn) * (FP32 if precision == "fp32" else 2))


def activation_bytes(cfg, low: Optional[int], n_bp: int, batch_size: int, seq_len: int, *, task: str,
                     precision: str, gradient_checkpointing: bool, any_trainable: bool,
                     lora: Optional[tuple[int, int]] = None) -> int:
    """Activations kept for backward at the start of backward (their peak), with the head's."""
    d = dims(cfg)
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
    d = dims(cfg)
    d_attn = 0 if sdpa_block(cfg) else d["A"] * seq_len
    return int(tokens * (2 * d["I"] + d["H"] + d_attn) * FP32)


def lm_scoring_bytes(cfg, seq_len: int) -> int:
    """Validation of a causal LM (lm_scoring.score_texts): the logits of one scoring batch, the batch
    capped so they hold <= MAX_LOGIT_FLOATS, three times over: the logits, cross_entropy's contiguous
    copy of their transpose and its log-softmax (measured: a 4-layer Llama, V 8,000, at 64 x 128,
    3.3 x 248 MiB over the weights and optimizer states)."""
    V = dims(cfg)["V"]
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
    d = dims(cfg)
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
    d = dims(cfg)
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
