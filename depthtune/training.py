"""A compact fine-tuning loop: dynamic padding over length-grouped batches,
frozen-prefix caching, AdamW + linear warmup/decay, gradient accumulation and
clipping, early stopping, atomic resumable checkpoints.

Why not transformers.Trainer: caching the frozen prefix needs control of the
forward pass, and the loop is ~300 lines (see bench/ for the measured speed).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from depthtune.config import TrainConfig, VariantSpec, to_dict
from depthtune.errors import DepthtuneError, ModelError
from depthtune.metric_modules import quick_scores

# ----------------------------------------------------------------------------- data


@dataclass
class Examples:
    """A tokenized split held as Python lists (fast to slice into batches)."""
    input_ids: list
    labels: list
    token_type_ids: Optional[list] = None

    @classmethod
    def from_dataset(cls, ds) -> "Examples":
        # Materialise the Arrow columns once. `ds["input_ids"]` is a lazy Column in datasets 4+:
        # indexing it decodes one row at a time (~25 us each), and sorting 1,000 texts by length
        # through it cost 25 s per validation pass before this.
        def column(name):
            return ds.data.column(name).to_pylist()
        return cls(input_ids=column("input_ids"), labels=column("labels"),
                   token_type_ids=column("token_type_ids") if "token_type_ids" in ds.column_names else None)

    def __len__(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def lengths(self) -> list:  # computed once: sorting and batching read it per example
        return [len(x) for x in self.input_ids]


def length_grouped_batches(lengths: list, batch_size: int, seed: int, epoch: int,
                           group_factor: int = 50) -> list[list[int]]:
    """Shuffle, cut into mega-batches of 50 batches, sort each by length, split, shuffle batch order.

    Padding per batch then costs little (neighbours have similar lengths) while the
    order stays random. Depends only on (seed, epoch): a resumed run sees the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * group_factor
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ex: Examples, index: list[int], pad_id: int) -> dict:
    """Pad to the longest sequence in this batch (never to max_length)."""
    longest = max(len(ex.input_ids[i]) for i in index)
    ids = torch.full((len(index), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), longest), dtype=torch.long)
    types = torch.zeros((len(index), longest), dtype=torch.long) if ex.token_type_ids is not None else None
    for row, i in enumerate(index):
        n = len(ex.input_ids[i])
        ids[row, :n] = torch.tensor(ex.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(ex.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ex.labels[i] for i in index])}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


# ----------------------------------------------------------------------------- frozen prefix


def frozen_prefix_layers(spec: VariantSpec, num_layers: int) -> int:
    """How many bottom encoder layers (plus the embeddings) are frozen: train_top variants only."""
    if spec.train_top is None:
        return 0
    return num_layers - spec.train_top


def supports_split_forward(model: nn.Module) -> bool:
    base = getattr(model, "base_model", None)
    return (getattr(model.config, "model_type", None) in ("bert", "roberta")
            and hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"))


def _bidirectional_mask(model, hidden, attention_mask):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.base_model.config, inputs_embeds=hidden,
                                     attention_mask=attention_mask)


def prefix_forward(model, batch: dict, k: int) -> torch.Tensor:
    """Embeddings + encoder layers [0, k): the frozen part (run in eval mode, no autograd)."""
    base = model.base_model
    h = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    mask = _bidirectional_mask(model, h, batch["attention_mask"])
    for layer in base.encoder.layer[:k]:
        h = layer(h, mask)
    return h


def top_forward(model, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Encoder layers [k, L), pooler and head on given hidden states -> logits."""
    base = model.base_model
    mask = _bidirectional_mask(model, hidden, attention_mask)
    for layer in base.encoder.layer[k:]:
        hidden = layer(hidden, mask)
    if model.config.model_type == "roberta":
        return model.classifier(hidden)  # RobertaClassificationHead reads the <s> token itself
    pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


class PrefixCache:
    """Outputs of the frozen prefix for every example, computed once.

    Stored unpadded as one [total_tokens, H] fp32 tensor plus offsets:
    2,000 texts * ~30 tokens * 384 * 4 B = ~92 MB. Above `disk_threshold` bytes
    the tensor lives in a memory-mapped file instead of RAM.
    """

    def __init__(self, model, ex: Examples, k: int, device: str, batch_size: int, pad_id: int,
                 disk_dir: Optional[Path] = None, disk_threshold: int = 2 << 30):
        lengths = ex.lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        H = model.config.hidden_size
        nbytes = int(self.offsets[-1]) * H * 4
        if disk_dir is not None and nbytes > disk_threshold:
            disk_dir.mkdir(parents=True, exist_ok=True)
            path = disk_dir / "prefix_cache.f32"
            self.store = torch.from_file(str(path), shared=True, size=int(self.offsets[-1]) * H,
                                         dtype=torch.float32).view(-1, H)
        else:
            self.store = torch.empty((int(self.offsets[-1]), H), dtype=torch.float32)
        order = sorted(range(len(ex)), key=lambda i: lengths[i])  # similar lengths together: little padding
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                batch = {k2: v.to(device) for k2, v in collate(ex, idx, pad_id).items()}
                h = prefix_forward(model, batch, k).float().cpu()
                for row, i in enumerate(idx):
                    self.store[self.offsets[i]:self.offsets[i + 1]] = h[row, :lengths[i]]
        self.nbytes = nbytes

    def batch(self, index: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [int(self.offsets[i + 1] - self.offsets[i]) for i in index]
        H = self.store.shape[1]
        hidden = torch.zeros((len(index), max(lens), H), dtype=torch.float32)
        mask = torch.zeros((len(index), max(lens)), dtype=torch.long)
        for row, i in enumerate(index):
            hidden[row, :lens[row]] = self.store[self.offsets[i]:self.offsets[i + 1]]
            mask[row, :lens[row]] = 1
        return hidden.to(device), mask.to(device)


def set_train_mode(model: nn.Module, k: int) -> None:
    """Train mode for the trainable part; the frozen prefix runs without dropout (eval)."""
    model.train()
    if k > 0 and supports_split_forward(model):
        base = model.base_model
        base.embeddings.eval()
        for layer in base.encoder.layer[:k]:
            layer.eval()


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, never biases or norm gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ----------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_logits(model, ex: Examples, batch_size: int, device: str, pad_id: int,
                   autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Logits in the dataset's row order (batches sorted by length, then unsorted)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ex)), key=ex.lengths.__getitem__)
    out = np.zeros((len(ex), model.config.num_labels), dtype=np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(ex, idx, pad_id).items() if k != "labels"}
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def predict_cached(model, cache: PrefixCache, k: int, n: int, batch_size: int, device: str,
                   autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Logits from cached prefix outputs: only the trainable top runs."""
    was_training = model.training
    model.eval()
    out = np.zeros((n, model.config.num_labels), dtype=np.float32)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        hidden, mask = cache.batch(idx, device)
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out[idx] = top_forward(model, hidden, mask, k).float().cpu().numpy()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- checkpoints


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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
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
        rng = _rng_state()
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
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DepthtuneError(f"{final}: cannot write the checkpoint ({reason}); "
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
        if all((ck / f).exists() for f in ("trainable.safetensors", "best.safetensors", "optim.pt", "meta.json")):
            return ck
    return None


def load_checkpoint(ck: Path, *, model, optimizer, scheduler, fingerprint: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((ck / "meta.json").read_text())
        if meta.get("fingerprint") != fingerprint:
            raise ModelError(f"{ck}: checkpoint is from a different variant, config or dataset "
                             f"(fingerprint {meta.get('fingerprint', '?')[:12]} != {fingerprint[:12]}); "
                             "delete it to start over")
        load_trainable_state(model, load_file(str(ck / "trainable.safetensors")))
        best_state = load_file(str(ck / "best.safetensors"))
        opt = torch.load(ck / "optim.pt", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # a corrupted file: refuse clearly rather than train on garbage
        raise ModelError(f"{ck}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    import ast
    np_state = meta.pop("rng_numpy")
    _set_rng_state({"torch": opt["rng_torch"], "cuda": opt["rng_cuda"],
                    "python": ast.literal_eval(meta.pop("rng_python")),
                    "numpy": (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])})
    return meta, best_state


def fingerprint_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- data parallel


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Under `torchrun --nproc_per_node N`: gloo on the CPU, NCCL on GPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def all_reduce_grads(model: nn.Module, world: int) -> None:
    """Average gradients over ranks: one flat all-reduce (the same sum DDP's buckets compute)."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def params_in_sync(model: nn.Module) -> bool:
    """Every rank holds bit-identical trainable weights (checked once, after training)."""
    import torch.distributed as dist

    rank, world = dist_info()
    if world == 1:
        return True
    total = torch.tensor([float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad],
                         dtype=torch.float64)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainOutcome:
    steps: int
    epochs_run: int
    best_epoch: int
    best_step: int
    best_val: dict
    stopped_early: bool
    train_time_s: float
    samples: int  # examples processed (incl. repeats over epochs)
    real_tokens: int  # non-pad tokens processed
    loss_curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)
    resumed_from_step: Optional[int] = None
    cached_prefix_layers: int = 0
    cache_bytes: int = 0
    world_size: int = 1


def train(*, model: nn.Module, spec: VariantSpec, num_layers: int, train_ex: Examples, val_ex: Examples,
          cfg: TrainConfig, metric: str, device: str, pad_id: int, num_labels: int,
          checkpoint_dir: Optional[Path] = None, fingerprint: str = "", extra_meta: Optional[dict] = None,
          on_step: Optional[Callable[[int, int], None]] = None, log: Callable[[str], None] = print,
          eval_batch_size: int = 64) -> TrainOutcome:
    """Train in place; at the end the model holds the best validation checkpoint's weights."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model.to(device)
    rank, world = dist_info()
    autocast = torch.bfloat16 if device == "cuda" else None
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    k = frozen_prefix_layers(spec, num_layers)
    use_cache = cfg.cache_frozen_prefix and k > 0 and supports_split_forward(model)
    cache = val_cache = None
    if use_cache:
        t0 = time.perf_counter()
        model.eval()
        cache = PrefixCache(model, train_ex, k, device, batch_size=64, pad_id=pad_id,
                            disk_dir=checkpoint_dir / f"cache-rank{rank}" if checkpoint_dir else None)
        val_cache = PrefixCache(model, val_ex, k, device, batch_size=64, pad_id=pad_id)
        log(f"cached frozen prefix (embeddings + {k} layers) for {len(train_ex)} + {len(val_ex)} texts: "
            f"{(cache.nbytes + val_cache.nbytes) / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")

    batches_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total_steps)
    # fused AdamW on the CPU too: measured here on MiniLM's 22.7M parameters, one step took
    # 0.25 s fused vs 4.5 s foreach (the multi-tensor path makes several passes over memory)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "best_epoch": -1, "best_step": 0,
             "best_val": {}, "bad_evals": 0, "loss_curve": [], "val_curve": [], "samples": 0, "real_tokens": 0,
             "stopped_early": False, "fingerprint": fingerprint, "train_time_s": 0.0}
    state.update(extra_meta or {})
    # The best weights so far. An evaluation always replaces them (best starts at -1), so when one is
    # certain to run, the starting copy is never read: skip it (trainable params x 4 B, 87 MiB for
    # MiniLM full fine-tuning, held until the first evaluation). A checkpoint written before the first
    # evaluation stores the current weights as `best`; a resume replaces them at its first evaluation too.
    evaluation_certain = cfg.epochs >= 1 and (not cfg.eval_every or total_steps >= cfg.eval_every)
    best_state = None if evaluation_certain else trainable_state(model)
    resumed = None
    if checkpoint_dir is not None:
        ck = latest_checkpoint(checkpoint_dir)
        if ck is not None:
            meta, best_state = load_checkpoint(ck, model=model, optimizer=optimizer, scheduler=scheduler,
                                               fingerprint=fingerprint)
            state.update(meta)
            resumed = state["step"]
            log(f"resumed from {ck.name} (step {state['step']}, epoch {state['epoch']})")

    if world > 1 and cfg.batch_size % world:
        raise ModelError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} processes; "
                         "the global batch must split evenly")

    def checkpoint():
        if checkpoint_dir is not None and rank == 0:  # only rank 0 writes
            save_checkpoint(checkpoint_dir, state["step"], model=model, optimizer=optimizer, scheduler=scheduler,
                            meta=state, best_state=best_state if best_state is not None else trainable_state(model),
                            keep=cfg.keep_checkpoints)

    def evaluate_now() -> bool:
        """Validation; returns True when early stopping should end training."""
        nonlocal best_state
        t_eval = time.perf_counter()
        if cache is not None:
            logits = predict_cached(model, val_cache, k, len(val_ex), eval_batch_size, device, autocast)
        else:
            logits = predict_logits(model, val_ex, eval_batch_size, device, pad_id, autocast)
        scores = quick_scores(logits.argmax(-1).tolist(), val_ex.labels, num_labels)
        state["val_curve"].append({"step": state["step"], "epoch": state["epoch"], **scores})
        log(f"  step {state['step']:5d} epoch {state['epoch']}: val accuracy {scores['accuracy']:.4f} "
            f"macro-F1 {scores['macro_f1']:.4f}")
        if scores[metric] > state["best"]:
            state.update(best=scores[metric], best_epoch=state["epoch"], best_step=state["step"], best_val=scores,
                         bad_evals=0)
            if best_state is None:
                best_state = trainable_state(model)
            else:  # in place: no second copy alive while the new one is made
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if p.requires_grad:
                            best_state[n].copy_(p)
        else:
            state["bad_evals"] += 1
        set_train_mode(model, k)
        state["eval_time_s"] = state.get("eval_time_s", 0.0) + time.perf_counter() - t_eval
        return cfg.patience > 0 and state["bad_evals"] >= cfg.patience

    set_train_mode(model, k)
    t_start = time.perf_counter()
    stop = False
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"]
        batches = length_grouped_batches(train_ex.lengths, cfg.batch_size, cfg.seed, epoch)
        running, micro = 0.0, 0
        for bi in range(state["batch_in_epoch"], len(batches)):
            # the global batch is unchanged: each of the N processes takes every N-th example of it
            index = batches[bi][rank::world] if world > 1 else batches[bi]
            if cache is not None:
                hidden, mask = cache.batch(index, device)
                labels = torch.tensor([train_ex.labels[i] for i in index], device=device)
                with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                    logits = top_forward(model, hidden, mask, k)
                real = int(mask.sum())
            else:
                batch = {kk: v.to(device) for kk, v in collate(train_ex, index, pad_id).items()}
                labels = batch.pop("labels")
                with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                    logits = model(**batch).logits
                real = int(batch["attention_mask"].sum())
            loss = nn.functional.cross_entropy(logits.float(), labels)
            (loss / cfg.grad_accum).backward()
            running += loss.item()
            micro += 1
            state["samples"] += len(index) * world
            state["real_tokens"] += real * world
            last = bi == len(batches) - 1
            if micro == cfg.grad_accum or last:
                if world > 1:
                    all_reduce_grads(model, world)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch_in_epoch"] = bi + 1
                state["loss_curve"].append({"step": state["step"], "epoch": epoch, "loss": running / micro,
                                            "lr": scheduler.get_last_lr()[0]})
                running, micro = 0.0, 0
                if on_step is not None:
                    on_step(state["step"], epoch)
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    stop = evaluate_now()
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and not last:
                    state["train_time_s"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    checkpoint()
                if stop:
                    break
        if not stop:
            state["epoch"] = epoch + 1
            state["batch_in_epoch"] = 0
            if not cfg.eval_every:
                stop = evaluate_now()
        state["stopped_early"] = stop
        state["train_time_s"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        checkpoint()
    if best_state is not None:  # None only if no evaluation ran although one was certain (cannot happen)
        load_trainable_state(model, best_state)
    model.eval()
    if not params_in_sync(model):
        raise ModelError("data-parallel ranks ended with different weights (gradient all-reduce failed)")
    return TrainOutcome(steps=state["step"], epochs_run=state["epoch"], best_epoch=state["best_epoch"],
                        best_step=state["best_step"], best_val=state["best_val"], stopped_early=state["stopped_early"],
                        train_time_s=state["train_time_s"] - state.get("eval_time_s", 0.0), samples=state["samples"], real_tokens=state["real_tokens"],
                        loss_curve=state["loss_curve"], val_curve=state["val_curve"], resumed_from_step=resumed,
                        cached_prefix_layers=k if cache is not None else 0,
                        cache_bytes=cache.nbytes if cache is not None else 0, world_size=world)


def describe_config(cfg: TrainConfig) -> dict:
    return to_dict(cfg)
