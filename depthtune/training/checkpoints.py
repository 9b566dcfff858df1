"""Resumable checkpoints of the trainable weights, optimizer, scheduler and RNG streams.

checkpoints/<variant>/checkpoint-<step>/ holds
  trainable.safetensors   the trainable parameters now (frozen ones are rebuilt from the base model)
  best.safetensors        the trainable parameters of the best validation so far
  optim.pt                optimizer + scheduler state, torch (CPU, CUDA) RNG states
  meta.json               the training state (step, epoch, curves, best, ...; see training.TrainState)
                          plus the Python and numpy RNG states
Each is written to a temp folder that is renamed into place: a kill mid-write leaves no
half checkpoint that could be resumed from.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from depthtune.errors import ConfigError, DepthtuneError, ModelError, first_line

FILES = ("trainable.safetensors", "best.safetensors", "optim.pt", "meta.json")
# [<target>:]N: SIGKILL right after optimizer step N (the reliability tests' kill; the target is a variant or
# "pretrain"; a bare N kills every fine-tuning variant)
FAULT_KILL_ENV = "DEPTHTUNE_FAULT_KILL_AT_STEP"
RNG_META_KEYS = ("rng_python", "rng_numpy")  # in meta.json beside the training state


def trainable_state(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing or len(state) != sum(1 for p in params.values() if p.requires_grad):
        raise ModelError(f"checkpoint does not match this variant's trainable parameters "
                         f"({len(state)} tensors vs {sum(1 for p in params.values() if p.requires_grad)}; "
                         f"e.g. unknown {missing[:2]})")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ModelError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, "
                                 f"the variant expects {tuple(params[n].shape)}")
            params[n].copy_(t)


def rng_state() -> dict:
    """Every RNG stream training draws from: torch (CPU and CUDA), Python's random, numpy."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, meta: dict, best_state: dict,
                    keep: int) -> Path:
    """Write checkpoint-<step>/ atomically (temp dir + rename), then prune old ones."""
    from safetensors.torch import save_file

    final = root / f"checkpoint-{step:08d}"
    tmp = root / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()},
                  str(tmp / "trainable.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(tmp / "best.safetensors"))
        rng = rng_state()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng_torch": rng["torch"], "rng_cuda": rng["cuda"]}, tmp / "optim.pt")
        meta = dict(meta, rng_python=repr(rng["python"]), rng_numpy=[rng["numpy"][0], rng["numpy"][1].tolist(),
                                                                       *rng["numpy"][2:]])
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:  # disk full, quota, a file where the folder belongs: one line, older checkpoints kept
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
            raise DepthtuneError(f"{final}: cannot write the checkpoint ({first_line(exc)}); "
                                 "earlier checkpoints are kept") from None
        raise
    for old in sorted(root.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint (temp dirs of a killed write are ignored and removed)."""
    if not root.exists():
        return None
    for tmp in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for ck in sorted(root.glob("checkpoint-*"), reverse=True):
        if all((ck / f).exists() for f in FILES):
            return ck
    return None


def _unreadable(ck: Path, exc: Exception) -> ModelError:
    return ModelError(f"{ck}: unreadable checkpoint ({type(exc).__name__}: {first_line(exc, 120)})")


def _read_meta(ck: Path) -> dict:
    try:
        meta = json.loads((ck / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
    except Exception as exc:  # a truncated or garbled file
        raise _unreadable(ck, exc) from None
    return meta


def checkpoint_meta(ck: Path) -> dict:
    """The training state saved in checkpoint `ck` (step, epoch, curves, best, ... and the caller's
    extra keys such as mlflow_run_id), without the RNG states. ModelError when unreadable."""
    meta = _read_meta(ck)
    for key in RNG_META_KEYS:
        meta.pop(key, None)
    return meta


def load_checkpoint(ck: Path, *, model, optimizer, scheduler, fingerprint: str) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG streams from `ck`.

    Returns (the training state as checkpoint_meta gives it, the best weights so far). Refuses a
    checkpoint of another variant/config/dataset (fingerprint) or a damaged one: ModelError.
    """
    from safetensors.torch import load_file

    meta = _read_meta(ck)
    if meta.get("fingerprint") != fingerprint:
        raise ModelError(f"{ck}: checkpoint is from a different variant, config or dataset "
                         f"(fingerprint {str(meta.get('fingerprint', '?'))[:12]} != {fingerprint[:12]}); "
                         "delete it to start over")
    try:
        load_trainable_state(model, load_file(str(ck / "trainable.safetensors")))
        best_state = load_file(str(ck / "best.safetensors"))
        opt = torch.load(ck / "optim.pt", weights_only=True)
        np_state = meta.pop("rng_numpy")
        rng = {"torch": opt["rng_torch"], "cuda": opt["rng_cuda"], "python": ast.literal_eval(meta.pop("rng_python")),
               "numpy": (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])}
    except ModelError:
        raise
    except Exception as exc:  # a corrupted file: refuse clearly rather than train on garbage
        raise _unreadable(ck, exc) from None
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(rng)
    return meta, best_state


def resume_latest(root: Optional[Path], *, model, optimizer, scheduler, fingerprint: str):
    """The one resume path (fine-tuning and pretraining): the newest checkpoint under `root` restored into
    model, optimizer, scheduler and RNG streams -> (its meta, its best weights, its name); None when there is none."""
    ck = latest_checkpoint(root) if root is not None else None
    if ck is None:
        return None
    meta, best = load_checkpoint(ck, model=model, optimizer=optimizer, scheduler=scheduler, fingerprint=fingerprint)
    return meta, best, ck.name


def fault_kill_hook(target: str, *, named_only: bool = False) -> Optional[Callable[[int, int], None]]:
    """`on_step` callback for DEPTHTUNE_FAULT_KILL_AT_STEP=[<target>:]N: SIGKILL right after step N (tests).
    named_only: a bare N does not apply (pretraining is killed only when named: `pretrain:N`)."""
    spec = os.environ.get(FAULT_KILL_ENV, "").strip()
    if not spec:
        return None
    named, _, step = spec.rpartition(":")
    if (named and named != target) or (named_only and not named):
        return None
    if not step.isdigit() or int(step) < 1:
        raise ConfigError(f"{FAULT_KILL_ENV}={spec!r}: expected [<variant>:]<step >= 1>")
    kill_at = int(step)

    def on_step(step_done: int, epoch: int = 0) -> None:
        if step_done == kill_at:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def fingerprint_of(*parts) -> str:
    """train(fingerprint=...): what a checkpoint must match to be resumed (variant, config, data: JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
