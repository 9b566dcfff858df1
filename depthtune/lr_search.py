"""train.lr_search: each variant's learning rate chosen on the validation split, cheaply.

The candidates are the variant's configured lr times each factor of `train.lr_search.factors`
(default 0.25, 0.5, 1, 2, 4: a log-spaced grid around the per-variant default). For each one the
model goes back to its initial weights and trains `steps` optimizer steps with the normal loop
(depthtune.training: same seed, same batches, warmup + linear decay over those steps, no
checkpoints, no evaluation on the way), then the validation split is scored once. The best
validation metric wins; a tie goes to the configured lr when it is tied, else to the smaller lr.

Only the validation split is ever scored: search_lr takes no test data.

Cost: len(factors) x steps optimizer steps + one validation pass per candidate, e.g. 5 x 60 = 300
steps against the 250 of the default run's 2 epochs of 2,000 texts. For train_top variants the
frozen prefix is cached once and every candidate reuses it (it does not depend on the lr): only
the top layers run, so the probe's search costs a few seconds.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

from torch import nn

from depthtune.batching import Examples
from depthtune.checkpoints import load_trainable_state, trainable_state
from depthtune.config import TrainConfig, VariantSpec
from depthtune.prefix_cache import set_train_mode
from depthtune.runtime import seed_everything
from depthtune.training import (BestWeights, TrainState, prefix_caches, run_epoch, score_validation, setup,
                                steps_per_epoch)


def candidate_lrs(lr: float, factors) -> list[float]:
    """lr x each factor, smallest first (10 significant digits: 8e-5 x 0.25 prints as 2e-05)."""
    return sorted(float(f"{lr * f:.10g}") for f in factors)


def search_budget(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps per candidate: lr_search.steps, but never more than the real run would take."""
    return min(cfg.lr_search.steps, steps_per_epoch(num_examples, cfg) * cfg.epochs)


def pick_lr(candidates: list[dict], key: str, configured: float | None = None) -> float:
    """The lr with the best `key`; on a tie the configured lr when it is among the tied, else the smaller.

    Why the configured lr first: a short search often cannot tell candidates apart (measured on the
    default data: depth3's five candidates all sat at the majority class, 0.578, after 60 steps, and
    "the smaller lr" then chose 2e-5, which collapsed in the real run: 0.578 test accuracy instead of
    0.724 at its configured 8e-5). A tie is no evidence against the per-variant default.
    """
    top = max(c[key] for c in candidates)
    tied = sorted(c["lr"] for c in candidates if c[key] == top)
    return configured if configured in tied else tied[0]


def train_candidate(model: nn.Module, lr: float, steps: int, *, spec: VariantSpec, num_layers: int,
                    train_ex: Examples, val_ex: Examples, cfg: TrainConfig, metric: str, device: str,
                    pad_id: int, num_labels: int, caches: tuple, eval_batch_size: int) -> dict:
    """Train `model` in place for `steps` optimizer steps at `lr` (no checkpoints); its validation scores."""
    # enough epochs to hold the budget; setup(max_steps=...) stops the loop there and fits the schedule to it
    epochs = math.ceil(steps / steps_per_epoch(len(train_ex), cfg))
    run_cfg = dataclasses.replace(cfg, lr=lr, epochs=epochs, eval_every=0, patience=0, checkpoint_every=0)
    seed_everything(cfg.seed)  # every candidate sees the same dropout masks and batches
    run = setup(model=model, spec=spec, num_layers=num_layers, train_ex=train_ex, val_ex=val_ex, cfg=run_cfg,
                metric=metric, device=device, pad_id=pad_id, num_labels=num_labels, checkpoint_dir=None,
                log=lambda _: None, eval_batch_size=eval_batch_size, caches=caches, max_steps=steps)
    state, best = TrainState(), BestWeights(None)  # best is never read: no evaluation inside the loop
    set_train_mode(model, run.frozen)
    while state.step < steps:
        run_epoch(run, state, best)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    run.optimizer.zero_grad(set_to_none=True)
    return score_validation(run)


def search_lr(build_model: Callable[[], nn.Module], *, spec: VariantSpec, num_layers: int, train_ex: Examples,
              val_ex: Examples, cfg: TrainConfig, metric: str, device: str, pad_id: int, num_labels: int,
              log: Callable[[str], None] = print, caches: Optional[tuple] = None,
              eval_batch_size: int = 64) -> dict:
    """Train each candidate lr for the budget from the same initial weights; pick the best on validation.

    build_model() is called once; its trainable weights are copied and put back before each
    candidate and at the end, so the caller may train the same model object next and get exactly
    what a fresh one would give. `caches`: the frozen prefix's pair from training.prefix_caches()
    (built here when None). Returns {"metric", "candidates": [{"lr", "val_<metric>", "steps",
    "seconds"}] (smallest lr first), "chosen_lr", "at_edge" (the smallest or largest won), "seconds"}.
    """
    t0 = time.perf_counter()
    model = build_model()
    if caches is None:
        caches = prefix_caches(model, spec, num_layers, train_ex, val_ex, cfg, device=device, pad_id=pad_id, log=log)
    initial = trainable_state(model)
    steps, key = search_budget(cfg, len(train_ex)), f"val_{metric}"
    candidates = []
    for lr in candidate_lrs(cfg.lr, cfg.lr_search.factors):
        t = time.perf_counter()
        load_trainable_state(model, initial)
        scores = train_candidate(model, lr, steps, spec=spec, num_layers=num_layers, train_ex=train_ex,
                                 val_ex=val_ex, cfg=cfg, metric=metric, device=device, pad_id=pad_id,
                                 num_labels=num_labels, caches=caches, eval_batch_size=eval_batch_size)
        seconds = time.perf_counter() - t
        candidates.append({"lr": lr, key: scores[metric], "steps": steps, "seconds": round(seconds, 3)})
        log(f"lr search: lr {lr:.3g}: val {metric} {scores[metric]:.4f} after {steps} steps ({seconds:.1f} s)")
    load_trainable_state(model, initial)  # back to where every candidate started: the caller trains it next
    model.eval()
    chosen = pick_lr(candidates, key, configured=cfg.lr)
    # the smallest or largest candidate won: the best lr may lie outside the grid
    at_edge = len(candidates) > 1 and chosen in (candidates[0]["lr"], candidates[-1]["lr"])
    seconds = time.perf_counter() - t0
    log(f"lr search: chose lr {chosen:.3g} of {len(candidates)} candidates (configured {cfg.lr:.3g}) "
        f"on validation {metric} in {seconds:.1f} s"
        + ("; it is at the edge of the grid: consider wider train.lr_search.factors" if at_edge else ""))
    return {"metric": metric, "candidates": candidates, "chosen_lr": chosen, "at_edge": at_edge,
            "seconds": round(seconds, 3)}
