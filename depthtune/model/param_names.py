"""Parameter names -> the buckets every table uses (`layer.3.attention.q`, `embeddings.word`, `head`), for every
family's naming (BERT's `encoder.layer.3.attention.self.query`, Llama's `model.layers.3.self_attn.q_proj`, GPT-2's
`transformer.h.3.attn.c_attn`) and through peft's wrappers. Pure string work: the audit, the freezing rule of
each variant kind (depthtune.methods) and the report all read parameters through it."""
from __future__ import annotations

import re
from typing import Optional

# `...encoder.layer.3.`, `...transformer.layer.3.`, `...h.3.`, `...layers.3.`
LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
HEAD_NAMES = ("classifier", "score", "pre_classifier", "lm_head", "qa_outputs")


def canonical_name(name: str) -> str:
    """Strip peft wrappers so a LoRA model's base weights keep their plain names."""
    name = name.replace("base_model.model.", "", 1) if name.startswith("base_model.model.") else name
    return name.replace(".base_layer.", ".")


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.search(canonical_name(name))
    return int(m.group(1)) if m else None


def classify_param(name: str) -> str:
    """Parameter name -> fine bucket, e.g. `layer.3.attention.q`, `embeddings.word`, `head`."""
    n = canonical_name(name)
    idx = layer_index(n)
    leaf = n.rsplit(".", 1)[0]  # module path without .weight/.bias
    if ".lora_" in n or n.startswith("lora_"):
        return f"layer.{idx}.adapter" if idx is not None else "adapter"
    if idx is None:
        if "embed" in n or re.search(r"(^|\.)(wte|wpe)\.", n):
            kind = ("word" if re.search(r"word|wte|embed_tokens", n) else
                    "position" if re.search(r"position|wpe", n) else
                    "type" if "token_type" in n else
                    "norm" if re.search(r"norm", n, re.I) else "other")
            return f"embeddings.{kind}"
        if "pooler" in n:
            return "pooler"
        if any(re.search(rf"(^|\.){h}(\.|$)", leaf) for h in HEAD_NAMES):
            return "head"
        if re.search(r"norm|ln_f", n, re.I):
            return "final_norm"
        return "other"
    within = n[LAYER_RE.search(n).end():]
    if re.search(r"norm|ln_\d", within, re.I):
        return f"layer.{idx}.norm"
    if re.search(r"attention|attn", within):
        for key, pat in (("q", r"query|q_lin|q_proj"), ("k", r"key|k_lin|k_proj"), ("v", r"value|v_lin|v_proj"),
                         ("qkv", r"c_attn|qkv"), ("out", r"output|out_lin|o_proj|c_proj|out_proj|dense")):
            if re.search(pat, within):
                return f"layer.{idx}.attention.{key}"
        return f"layer.{idx}.attention.other"
    for key, pat in (("gate", r"gate_proj"), ("in", r"intermediate|lin1|c_fc|up_proj|fc1|wi"),
                     ("out", r"output|lin2|c_proj|down_proj|fc2|wo")):
        if re.search(pat, within):
            return f"layer.{idx}.ffn.{key}"
    return f"layer.{idx}.other"


def coarse_bucket(fine: str) -> str:
    """`layer.3.attention.q` -> `layer.3`; `embeddings.word` -> `embeddings`."""
    if fine.startswith("layer."):
        return ".".join(fine.split(".")[:2])
    return fine.split(".")[0]
