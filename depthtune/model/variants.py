"""The one variant builder: (model source, variant spec, labels, device) -> model.

The audit (on the meta device), the fine-tune stage and the saved model all go
through `build_variant`, so the audited trainable count and the trained count
cannot drift apart. Freezing happens in exactly one place, `set_trainable`,
a loop over `named_parameters()`.
"""
from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers import PreTrainedModel  # noqa: F401 -- imported here on purpose: see AUTO_CLASSES

from depthtune import tasks
from depthtune.config import ModelConfig, ScratchArch, VariantSpec, check_variant_against_model
from depthtune.model.families import DECODER_TYPES, config_kwargs, is_decoder
from depthtune.errors import ConfigError, ModelError, first_line
from depthtune.methods import Param
from depthtune.runtime import seed_everything
from depthtune.model import sources
from depthtune.model.param_names import classify_param, coarse_bucket, layer_index

# The model classes the builder builds, by the name a task gives (depthtune.tasks: `auto_class`). Imported with the
# builder, not while it builds, with PreTrainedModel (transformers.modeling_utils: ~100 MiB of heap with
# accelerate, PIL, scipy): that import then sits outside the finetune stage's peak-memory window, as every import
# does (tests/test_memory_estimate.py measures the window against the audit's estimate).
AUTO_CLASSES = {c.__name__: c for c in (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)}

# ----------------------------------------------------------------------------- configs


def num_layers_of(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ModelError(f"cannot tell how many layers a {type(config).__name__} has")


def set_num_layers(config, k: int) -> None:
    """Keep the first k blocks: the layer count, and every per-layer list with it (qwen2/qwen3's
    `layer_types`, full or sliding attention per layer: transformers refuses a config whose list
    and layer count differ, so a saved depth-k model would not load again)."""
    for per_layer in ("layer_types", "mlp_layer_types"):
        if isinstance(getattr(config, per_layer, None), list):
            setattr(config, per_layer, getattr(config, per_layer)[:k])
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if hasattr(config, attr):
            setattr(config, attr, k)
            return
    raise ModelError(f"cannot truncate a {type(config).__name__}: no layer-count attribute")


def scratch_config(arch: ScratchArch):
    """The family's transformers config for `model.source: scratch` (shapes already validated by ScratchArch;
    the names mapped by depthtune.model.families.config_kwargs)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(arch.model_type, **config_kwargs(arch))
    except ValueError as exc:  # a shape transformers refuses that ScratchArch let through
        raise ConfigError(f"model.scratch: {first_line(exc)}") from None


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


def variant_config(base_config, spec: VariantSpec, num_labels: int, path: str = "variant",
                   pad_token_id: Optional[int] = None):
    """Copy of the base config with the variant's depth, the label count and the batches' pad id applied.

    Decoders' sequence classifiers pool the logits of the last token that is not `config.pad_token_id`
    (transformers' GenericForSequenceClassification, GPT2ForSequenceClassification): it must be the id
    the batches are padded with, the tokenizer's (`pad_token_id`; None keeps the config's, else its eos).
    """
    cfg = base_config.__class__.from_dict(base_config.to_dict())
    check_variant_against_model(spec, num_layers_of(cfg), path)
    if spec.depth is not None:
        set_num_layers(cfg, spec.depth)
    if num_labels:
        cfg.num_labels = num_labels
    if pad_token_id is not None:
        cfg.pad_token_id = pad_token_id
    elif getattr(cfg, "pad_token_id", None) is None and getattr(cfg, "eos_token_id", None) is not None:
        cfg.pad_token_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
    return cfg


# ----------------------------------------------------------------------------- trainability


def param_of(name: str) -> Param:
    fine = classify_param(name)
    return Param(name=name, fine=fine, coarse=coarse_bucket(fine), layer=layer_index(name))


def set_trainable(model: nn.Module, spec: VariantSpec, num_layers: int, task: str = "classification") -> int:
    """The one freezing function: sets requires_grad on every parameter by the kind's rule (`Method.trains`),
    returns the trainable count."""
    method, row, count = spec.method, tasks.get(task), 0
    for name, p in model.named_parameters():
        p.requires_grad_(method.trains(param_of(name), spec.options, num_layers, row))
        count += p.numel() if p.requires_grad else 0
    return count


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable); named_parameters() yields tied weights once, buffers excluded."""
    total = trainable = 0
    for _, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


# ----------------------------------------------------------------------------- the builder


@dataclass
class BuiltVariant:
    model: nn.Module
    config: object  # the variant's transformers config (true depth, labels)
    num_layers: int  # blocks kept (encoder layers, decoder blocks)
    total_params: int
    trainable_params: int


def model_class(task: str, num_labels: int, model_type: str, path: str = "variant"):
    """The transformers auto class of the task (depthtune.tasks: `auto_class`): a sequence classifier, a causal
    LM; the bare model for a labelled task without labels (the audit's bare count)."""
    row = tasks.get(task)
    if row.needs_decoder and not is_decoder(model_type):
        raise ConfigError(f"{path}: task {row.name} needs a decoder ({', '.join(DECODER_TYPES)}); "
                          f"the model is a {model_type}")
    return AUTO_CLASSES[row.auto_class if num_labels or not row.labelled else "AutoModel"]


def build_variant(model_cfg: ModelConfig, spec: VariantSpec, num_labels: int, device: str = "cpu",
                  base_config=None, path: str = "variant", seed: int = 0,
                  task: str = "classification") -> BuiltVariant:
    """Build the variant with exactly the intended parameters trainable.

    device="meta" builds the structure without weights (the audit); otherwise
    pretrained weights are loaded from safetensors (or random init for scratch).
    task classification: num_labels=0 builds the bare model (AutoModel); N builds a sequence classifier
    (decoders: the head `score` reads the last non-pad token). task causal_lm: the decoder with its
    language-model head `lm_head` (tied to the input embeddings when the config says so; num_labels unused).
    Refused with a one-line ConfigError: a variant that would train only the head by accident
    (BitFit without biases, LoRA targets in no kept layer).
    """
    from transformers.utils import logging as hf_logging

    base_config = base_config if base_config is not None else load_base_config(model_cfg)
    # A decoder's classifier reads the last token that is not the pad id: it must be the tokenizer's,
    # the batches' (encoders read the first token: their config's pad id stays). The audit's meta build
    # needs no tokenizer (`depthtune audit --config` has none): the pad id changes no parameter count.
    decoder = is_decoder(getattr(base_config, "model_type", None))
    pad_id = sources.tokenizer_pad_id(model_cfg) if decoder and device != "meta" else None
    auto = model_class(task, num_labels, getattr(base_config, "model_type", None), path)
    cfg = variant_config(base_config, spec, tasks.get(task).num_labels(num_labels), path,
                         pad_token_id=pad_id)
    scratch = model_cfg.source == "scratch" or not spec.method.pretrained
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
    model = spec.method.prepare(model, spec.options, path)  # adapters (LoRA) before freezing
    k = num_layers_of(cfg)
    trainable = set_trainable(model, spec, k, task)
    spec.method.refuse_useless(model, spec.options, cfg.model_type, path)
    total, counted = count_params(model)
    assert counted == trainable
    if device not in ("meta", "cpu"):
        model = model.to(device)
    return BuiltVariant(model=model, config=cfg, num_layers=k, total_params=total, trainable_params=trainable)
