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

from depthtune.config import ModelConfig, Params, VariantSpec, to_dict
from depthtune.errors import DepthtuneError
from depthtune.layer_order import ordered_layer_names
from depthtune.records import AuditRecord, LabelSet, TokenReport
from depthtune.variants import (BuiltVariant, build_variant, classify_param, coarse_bucket, load_base_config,
                                num_layers_of)

FP32 = 4  # bytes per fp32 element


class AuditMismatch(DepthtuneError):
    pass


# ----------------------------------------------------------------------------- counting


def bucket_counts(model: nn.Module) -> list[dict]:
    """Fine buckets in model order: [{name, total, trainable}]."""
    buckets: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, p in model.named_parameters():
        b = buckets.setdefault(classify_param(name), [0, 0])
        b[0] += p.numel()
        b[1] += p.numel() if p.requires_grad else 0
    return [{"name": k, "total": v[0], "trainable": v[1]} for k, v in buckets.items()]


def coarse_counts(buckets: list[dict]) -> list[dict]:
    """Embeddings, layer.0 .. layer.k-1 (adapters included), pooler, final_norm, head."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for b in buckets:
        c = coarse_bucket(b["name"])
        row = out.setdefault(c, {"name": c, "total": 0, "trainable": 0, "adapter": 0})
        row["total"] += b["total"]
        row["trainable"] += b["trainable"]
        if b["name"].endswith("adapter"):
            row["adapter"] += b["total"]
    return list(out.values())


# ----------------------------------------------------------------------------- closed form


def _g(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def closed_form_total(cfg, num_labels: int) -> Optional[tuple[int, str]]:
    """Total parameters from the config alone (no model built), or None for unknown architectures.

    num_labels=0: the bare model as AutoModel builds it; N: AutoModelForSequenceClassification.
    """
    mt = cfg.model_type
    N = num_labels
    if mt in ("bert", "roberta"):
        V, H, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
        I, P, T = cfg.intermediate_size, cfg.max_position_embeddings, cfg.type_vocab_size
        emb = (V + P + T) * H + 2 * H  # word + position + type tables, LayerNorm (gain, bias)
        layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * 2 * H  # q,k,v,out; ffn in,out; 2 LayerNorms
        if N == 0:
            rest, what = H * H + H, "pooler H^2+H"
        elif mt == "bert":
            rest, what = (H * H + H) + (H * N + N), "pooler H^2+H + head H*N+N"
        else:  # RobertaClassificationHead: dense H->H, out_proj H->N; no pooler
            rest, what = (H * H + H) + (H * N + N), "head dense H^2+H + out_proj H*N+N"
        return emb + L * layer + rest, (f"(V+P+T)*H+2H + L*(4(H^2+H) + 2HI+I+H + 4H) + {what}; "
                                        f"V={V} P={P} T={T} H={H} I={I} L={L} N={N}")
    if mt == "distilbert":
        V, D, L, Hd, P = cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.max_position_embeddings
        emb = (V + P) * D + 2 * D
        layer = 4 * (D * D + D) + 2 * D + (D * Hd + Hd) + (Hd * D + D) + 2 * D
        rest = 0 if N == 0 else (D * D + D) + (D * N + N)  # pre_classifier + classifier
        return emb + L * layer + rest, f"(V+P)*D+2D + L*(4(D^2+D)+2D + 2D*Hd+Hd+D + 2D) + [D^2+D + D*N+N]; D={D} L={L}"
    if mt == "gpt2":
        V, D, L, P = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_positions
        I = cfg.n_inner or 4 * D
        emb = V * D + P * D
        layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * I + I) + (I * D + D)
        rest = 2 * D + (D * N if N else 0)  # ln_f + score (no bias)
        return emb + L * layer + rest, f"(V+P)*D + L*(4D + 3D^2+3D + D^2+D + 2DI+I+D) + 2D + D*N; D={D} I={I} L={L}"
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        V, H, L, I = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
        nh = cfg.num_attention_heads
        nkv = _g(cfg, "num_key_value_heads", default=nh)
        hd = _g(cfg, "head_dim", default=H // nh)
        attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
        if getattr(cfg, "attention_bias", False) or mt == "qwen2":
            attn += nh * hd + 2 * nkv * hd + (H if getattr(cfg, "attention_bias", False) else 0)
        if mt == "qwen3":
            attn += 2 * hd  # q_norm, k_norm
        mlp = 3 * H * I + ((2 * I + H) if getattr(cfg, "mlp_bias", False) else 0)
        layer = attn + mlp + 2 * H  # input + post-attention RMSNorm
        emb = V * H
        rest = H + (H * N if N else 0)  # final norm + score (no bias)
        return emb + L * layer + rest, (f"V*H + L*(H*nh*hd + 2H*nkv*hd + nh*hd*H + 3HI + 2H) + H + H*N; "
                                        f"V={V} H={H} L={L} I={I} nh={nh} nkv={nkv} hd={hd}")
    return None


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


def _dims(cfg) -> dict:
    return {
        "H": _g(cfg, "hidden_size", "dim", "n_embd"),
        "I": _g(cfg, "intermediate_size", "hidden_dim", "n_inner") or 4 * _g(cfg, "hidden_size", "dim", "n_embd"),
        "A": _g(cfg, "num_attention_heads", "n_heads", "n_head"),
        "L": num_layers_of(cfg),
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


def estimate(cfg, buckets: list[dict], total: int, trainable: int, batch_size: int, seq_len: int,
             bytes_per_weight: int = FP32, cache_tokens: int = 0) -> dict:
    """Training memory (bytes) and FLOPs per token, with the formulas spelled out.

    memory = weights + grads + AdamW states + activations + prefix cache
      weights     = total * bytes_per_weight
      grads       = trainable * 4
      adamw       = trainable * 8                   (exp_avg + exp_avg_sq, fp32)
      activations = B*S * n_bp * (8.5*H + 2*I + 1.25*A*S) * 4
        per token and layer that backward passes through: inputs of q/k/v/out and
        the ffn (~6H), residual + LayerNorm inputs (~2H), dropout masks (~0.5H),
        ffn pre/post-GELU (2I), softmax probs + dropout mask (1.25*A*S);
        n_bp = layers from the lowest trainable one to the top (frozen layers run
        without autograd and store nothing).
      prefix cache = cache_tokens * H * 4       (frozen-prefix outputs kept for every
                                                 train + validation token, train_top variants)
    flops/token (S = seq_len):
      forward  = 2 * M + 4*S*H*L               (M = matmul weights outside the embeddings;
                                                 4SH per layer for QK^T and AV)
      backward = 2 * M_bp + 8*S*H*n_bp + 2 * M_trainable
                  (grads w.r.t. activations through the backpropagated span,
                   grads w.r.t. weights only for trainable matmul weights)
    """
    d = _dims(cfg)
    H, I, A, L = d["H"], d["I"], d["A"], d["L"]
    low = lowest_trainable_layer(buckets)
    n_bp = 0 if low is None else L - max(low, 0)
    tokens = batch_size * seq_len
    per_token_layer = 8.5 * H + 2 * I + 1.25 * A * seq_len
    activations = int(tokens * n_bp * per_token_layer * FP32)
    # top of the network (pooler/head) + embeddings output when they train: small, counted as 2H/token
    activations += int(tokens * (2 * H if low == -1 else 0) * FP32) + int(batch_size * 2 * H * FP32)

    def is_matmul(b):  # 2-D weights that do matmuls: everything but embeddings and norms
        return not b["name"].startswith("embeddings") and not b["name"].endswith("norm")

    M = sum(b["total"] for b in buckets if is_matmul(b))
    M_train = sum(b["trainable"] for b in buckets if is_matmul(b))
    M_bp = 0
    for b in buckets:
        if not is_matmul(b):
            continue
        if b["name"].startswith("layer."):
            idx = int(b["name"].split(".")[1])
            if low is not None and idx >= max(low, 0):
                M_bp += b["total"]
        elif b["trainable"] or low is not None:  # pooler / head sit above every layer
            M_bp += b["total"]
    fwd = 2 * M + 4 * seq_len * H * L
    bwd = 2 * M_bp + 8 * seq_len * H * n_bp + 2 * M_train
    weights = total * bytes_per_weight
    grads = trainable * FP32
    adamw = trainable * 2 * FP32
    cache = cache_tokens * H * FP32
    return {
        "memory_bytes": {"weights": weights, "gradients": grads, "adamw_states": adamw,
                         "activations": activations, "prefix_cache": cache,
                         "total": weights + grads + adamw + activations + cache},
        "flops_per_token": {"forward": int(fwd), "backward": int(bwd), "train": int(fwd + bwd)},
        "assumptions": {"batch_size": batch_size, "seq_len": seq_len, "weights_bytes_per_param": bytes_per_weight,
                        "optimizer": "AdamW fp32", "backprop_layers": n_bp, "lowest_trainable_layer": low},
    }


# ----------------------------------------------------------------------------- the audit


def audit_built(built: BuiltVariant, *, variant_name: str, spec: VariantSpec, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, check: bool = True,
                cache_tokens: int = 0) -> AuditRecord:
    """Count a built variant (meta device is enough), check the closed form, estimate its cost.

    check=True raises AuditMismatch when counted != closed form; typical_seq_len adds the
    estimates at the typical batch shape (the tokenized train split's p95 length).
    """
    model, cfg = built.model, built.config
    buckets = bucket_counts(model)
    total = sum(b["total"] for b in buckets)
    trainable = sum(b["trainable"] for b in buckets)
    adapters = sum(b["total"] for b in buckets if b["name"].endswith("adapter"))
    cf = closed_form_total(cfg, num_labels)
    closed = None
    if cf is not None:
        base, formula = cf
        expected = base + closed_form_adapters(model)
        closed = {"total": expected, "formula": formula, "adapters": adapters, "matches": expected == total}
        if check and expected != total:
            raise AuditMismatch(f"variant {variant_name}: counted {total:,} parameters but the closed form from "
                                f"the config gives {expected:,} ({formula})")
    cache_tokens = cache_tokens if spec.train_top is not None else 0  # only train_top variants cache
    typical = None
    if typical_seq_len:
        typical = estimate(cfg, buckets, total, trainable, batch_size, typical_seq_len, cache_tokens=cache_tokens)
    return AuditRecord(
        variant=variant_name,
        spec=to_dict(spec),
        description=spec.describe(),
        architecture={"model_type": cfg.model_type, "num_layers": built.num_layers,
                      "hidden_size": _dims(cfg)["H"], "num_labels": num_labels},
        total_params=total,
        trainable_params=trainable,
        trainable_fraction=trainable / total if total else 0.0,
        adapter_params=adapters,
        closed_form=closed,
        layers=coarse_counts(buckets),
        buckets=buckets,
        estimates=estimate(cfg, buckets, total, trainable, batch_size, seq_len, cache_tokens=cache_tokens),
        estimates_typical=typical,
    )


def audit_specs(model_cfg: ModelConfig, base_config, specs: Iterable[tuple[str, VariantSpec]], *, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, cache_tokens: int = 0,
                where: str = "variants.{name}") -> list[AuditRecord]:
    """Audit each (name, spec) of one model on the meta device; `where` names a spec in errors."""
    records = []
    for name, spec in specs:
        built = build_variant(model_cfg, spec, num_labels, device="meta", base_config=base_config,
                              path=where.format(name=name))
        records.append(audit_built(built, variant_name=name, spec=spec, num_labels=num_labels,
                                   batch_size=batch_size, seq_len=seq_len, typical_seq_len=typical_seq_len,
                                   cache_tokens=cache_tokens))
    return records


def audit_variants(params: Params, num_labels: int, typical_seq_len: Optional[int] = None,
                   cache_tokens: int = 0) -> list[AuditRecord]:
    """Every variant of params.yaml, in params order, at the training batch shape
    (train.batch_size x train.max_length). cache_tokens counts only when the frozen prefix is cached."""
    return audit_specs(params.model, load_base_config(params.model), params.variants.items(),
                       num_labels=num_labels, batch_size=params.train.batch_size,
                       seq_len=params.train.max_length, typical_seq_len=typical_seq_len,
                       cache_tokens=cache_tokens if params.train.cache_frozen_prefix else 0)


# ----------------------------------------------------------------------------- inputs of the audit stage


def read_num_labels(labels_path: Path) -> int:
    """The label count from the prepare stage's labels.json; 2 when it does not exist yet (a quick audit)."""
    if not labels_path.exists():
        return 2
    return len(LabelSet.read(labels_path).names)


def read_token_stats(report_path: Path) -> tuple[Optional[int], int]:
    """(p95 token length of train, tokens in train + validation) from the tokenization report;
    (None, 0) when it does not exist yet. The p95 sets the typical batch shape of the estimates,
    the token count the size of the frozen-prefix cache."""
    if not report_path.exists():
        return None, 0
    report = TokenReport.read(report_path)
    return report.p95("train"), report.tokens("train", "validation")


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
    lines = ["| variant | spec | layers | total params | trainable | trainable % | closed form | "
             "est. train memory | fwd GFLOPs/token | train GFLOPs/token |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in records:
        check = "n/a" if r.closed_form is None else ("ok" if r.closed_form["matches"] else "MISMATCH")
        flops = r.estimates["flops_per_token"]
        lines.append(f"| {r.variant} | {r.description} | {r.architecture['num_layers']} | "
                     f"{fmt_int(r.total_params)} | {fmt_int(r.trainable_params)} | "
                     f"{100 * r.trainable_fraction:.2f} | {check} | "
                     f"{fmt_bytes(r.estimates['memory_bytes']['total'])} | "
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
            cells.append("—" if row is None else f"{fmt_int(row['trainable'])} / {fmt_int(row['total'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shape = records[0].estimates["assumptions"] if records else {}
    lines += ["", f"Estimates assume batch {shape.get('batch_size')} x {shape.get('seq_len')} tokens, fp32 weights, "
              "AdamW; formulas in depthtune/audit.py (`estimate`).", ""]
    return "\n".join(lines)
