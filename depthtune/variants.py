"""The one variant builder: (model source, variant spec, labels, device) -> model.

The audit (on the meta device), the fine-tune stage and the saved model all go
through `build_variant`, so the audited trainable count and the trained count
cannot drift apart. Freezing happens in exactly one place, `set_trainable`,
a loop over `named_parameters()`.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError
from torch import nn

from depthtune.config import ModelConfig, ScratchArch, VariantSpec, check_variant_against_model, to_dict
from depthtune.errors import ConfigError, ModelError, first_line
from depthtune.runtime import seed_everything
from depthtune import sources

# ----------------------------------------------------------------------------- parameter names

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


# ----------------------------------------------------------------------------- configs


def num_layers_of(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ModelError(f"cannot tell how many layers a {type(config).__name__} has")


def set_num_layers(config, k: int) -> None:
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if hasattr(config, attr):
            setattr(config, attr, k)
            return
    raise ModelError(f"cannot truncate a {type(config).__name__}: no layer-count attribute")


def scratch_config(arch: ScratchArch):
    from transformers import AutoConfig

    kw = to_dict(arch)
    model_type = kw.pop("model_type")
    if model_type == "distilbert":
        kw = {"vocab_size": kw["vocab_size"], "dim": kw["hidden_size"], "n_layers": kw["num_hidden_layers"],
              "n_heads": kw["num_attention_heads"], "hidden_dim": kw["intermediate_size"],
              "max_position_embeddings": kw["max_position_embeddings"]}
    if model_type != "distilbert" and kw["hidden_size"] % kw["num_attention_heads"]:
        raise ConfigError(f"model.scratch.hidden_size: {kw['hidden_size']} is not divisible by "
                          f"num_attention_heads {kw['num_attention_heads']}")
    return AutoConfig.for_model(model_type, **kw)


def load_base_config(model: ModelConfig):
    """The model's config (no weights), from params."""
    from transformers import AutoConfig

    if model.source == "scratch":
        return scratch_config(model.scratch)
    src = sources.resolve_source(model.source)
    sources.check_remote_code(src, model.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(src, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.source: cannot load a config from {src} ({first_line(exc)})") from None


def variant_config(base_config, spec: VariantSpec, num_labels: int, path: str = "variant"):
    """Copy of the base config with the variant's depth and the label count applied."""
    cfg = base_config.__class__.from_dict(base_config.to_dict())
    check_variant_against_model(spec, num_layers_of(cfg), path)
    if spec.depth is not None:
        set_num_layers(cfg, spec.depth)
    if num_labels:
        cfg.num_labels = num_labels
    if getattr(cfg, "pad_token_id", None) is None and getattr(cfg, "eos_token_id", None) is not None:
        cfg.pad_token_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
    return cfg


# ----------------------------------------------------------------------------- trainability


def is_trainable(name: str, spec: VariantSpec, num_layers: int) -> bool:
    """The freezing rule of every variant kind, for one parameter name."""
    fine = classify_param(name)
    coarse = coarse_bucket(fine)
    if spec.lora is not None:
        return coarse == "head" or "adapter" in fine
    if spec.bitfit:
        return coarse == "head" or name.endswith(".bias")
    if spec.train_top is not None:
        if coarse in ("head", "pooler", "final_norm"):
            return True
        idx = layer_index(name)
        return idx is not None and idx >= num_layers - spec.train_top
    return True  # full fine-tuning (pretrained or scratch)


def set_trainable(model: nn.Module, spec: VariantSpec, num_layers: int) -> int:
    """The one freezing function: sets requires_grad on every parameter, returns the trainable count."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, spec, num_layers))
        count += p.numel() if p.requires_grad else 0
    return count


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable); named_parameters() yields tied weights once, buffers excluded."""
    total = trainable = 0
    for _, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


# ----------------------------------------------------------------------------- LoRA


def linear_module_names(model: nn.Module) -> list[str]:
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(model: nn.Module, spec: VariantSpec, path: str = "variant") -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    available = linear_module_names(model)
    missing = [t for t in lora.targets if t not in available]
    if missing:
        raise ConfigError(f"{path}.lora.targets: {missing} match no module; linear modules are: {', '.join(available)}")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                     layers_to_transform=list(lora.layers) if lora.layers is not None else None,
                     fan_in_fan_out=type(model).__name__.startswith("GPT2"))
    return get_peft_model(model, cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: a plain transformers model comes back."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# ----------------------------------------------------------------------------- the builder


@dataclass
class BuiltVariant:
    model: nn.Module
    config: object  # the variant's transformers config (true depth, labels)
    num_layers: int  # encoder layers kept
    total_params: int
    trainable_params: int


def build_variant(model_cfg: ModelConfig, spec: VariantSpec, num_labels: int, device: str = "cpu",
                  base_config=None, path: str = "variant", seed: int = 0) -> BuiltVariant:
    """Build the variant with exactly the intended parameters trainable.

    device="meta" builds the structure without weights (the audit); otherwise
    pretrained weights are loaded from safetensors (or random init for scratch).
    num_labels=0 builds the bare encoder (AutoModel); N builds a sequence classifier.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    base_config = base_config if base_config is not None else load_base_config(model_cfg)
    cfg = variant_config(base_config, spec, num_labels, path)
    auto = AutoModelForSequenceClassification if num_labels else AutoModel
    scratch = model_cfg.source == "scratch" or spec.init == "scratch"
    try:
        if device == "meta" or scratch:
            seed_everything(seed)  # the random init (scratch) is the seed's
            ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
            with ctx:
                model = auto.from_config(cfg, trust_remote_code=model_cfg.trust_remote_code)
        else:
            src = sources.resolve_source(model_cfg.source)
            sources.check_weights_format(src, model_cfg.allow_pickle)
            seed_everything(seed)  # the new head's init is the seed's
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # truncation reports the dropped layers as UNEXPECTED keys
            try:
                model = auto.from_pretrained(src, config=cfg, revision=model_cfg.revision,
                                             use_safetensors=not model_cfg.allow_pickle,
                                             trust_remote_code=model_cfg.trust_remote_code)
            finally:
                hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        # SafetensorError / UnpicklingError: a corrupted or truncated weights file
        raise ModelError(f"{path}: cannot build the model from {model_cfg.source} ({first_line(exc, 300)})") from None
    if spec.lora is not None:
        model = add_lora(model, spec, path)
    k = num_layers_of(cfg)
    trainable = set_trainable(model, spec, k)
    total, counted = count_params(model)
    assert counted == trainable
    if device not in ("meta", "cpu"):
        model = model.to(device)
    return BuiltVariant(model=model, config=cfg, num_layers=k, total_params=total, trainable_params=trainable)
