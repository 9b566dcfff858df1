"""Numeric precision and gradient checkpointing of the model being trained.

    precision = resolve_precision(cfg.train.precision, device)   # "fp32" | "bf16-autocast" | "bf16"
    apply_precision(model, precision)                              # bf16: weights cast to bf16 (2 B/param)
    with torch.autocast(device, dtype=autocast_dtype(precision), enabled=autocast_dtype(precision) is not None):
        loss = model(**batch).loss
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)                       # after LoRA is added, before the optimizer

The three precisions, per parameter that trains (AdamW keeps exp_avg / exp_avg_sq in the param's dtype):
    fp32            weights 4 B, grads 4 B, AdamW 8 B     activations fp32
    bf16-autocast   weights 4 B, grads 4 B, AdamW 8 B     matmuls in bf16, their saved inputs mostly bf16
    bf16            weights 2 B, grads 2 B, AdamW 4 B     everything bf16 (no fp32 master copy: updates
                                                          smaller than ~1/256 of a weight round away)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from depthtune.errors import ConfigError, ModelError, first_line

PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def resolve_precision(setting: str, device: str) -> str:
    """train.precision -> the one used: auto is bf16 autocast on cuda (tensor cores, half the activation
    bytes, fp32 master weights), fp32 on the CPU (bf16 matmuls are no faster there on most CPUs)."""
    if setting == "auto":
        return "bf16-autocast" if device.startswith("cuda") else "fp32"
    if setting not in PRECISIONS:
        raise ConfigError(f"train.precision: {setting!r} is not one of auto, {', '.join(PRECISIONS)}")
    return setting


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype of torch.autocast for a resolved precision: bf16 for bf16-autocast, else None (no autocast;
    bf16 weights compute in bf16 by themselves)."""
    return torch.bfloat16 if precision == "bf16-autocast" else None


def apply_precision(model: nn.Module, precision: str) -> None:
    """bf16: cast every floating weight and buffer to bf16 in place (halves the weight bytes);
    fp32 and bf16-autocast keep fp32 weights."""
    if precision == "bf16":
        model.to(torch.bfloat16)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its public get_base_model), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them: a block keeps only its
    input (B*S*H) and one block's activations exist at a time during its recompute.

    transformers wraps each block class's forward (GradientCheckpointingLayer), so blocks called one by
    one (prefix_cache.top_forward) are checkpointed too, in training mode. Non-reentrant checkpointing
    needs no input that requires grad, so transformers' input-embedding hook is removed again: with it,
    the output of frozen embeddings would require grad and backward would run through frozen blocks.
    """
    inner = transformers_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        kind = getattr(getattr(inner, "config", None), "model_type", None) or type(inner).__name__
        raise ModelError(f"train.gradient_checkpointing: model type {kind} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5: the new name of the same call
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:  # an architecture whose modules carry no checkpointing flag
        kind = getattr(inner.config, "model_type", type(inner).__name__)
        raise ModelError(f"train.gradient_checkpointing: model type {kind} refused it ({first_line(exc)})") from None
    inner.disable_input_require_grads()
