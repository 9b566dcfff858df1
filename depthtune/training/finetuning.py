"""Fine-tune one depth variant: build it, train it, save it, describe what it cost (a TrainRecord).

The finetune stage (stages/finetune.py) parses its paths and calls these in order:

    built = build_checked(params, name, audit, labels)                # the audit's counts, asserted
    outcome, cfg, lr_search = train_variant(built, ...)               # train.lr_search or plain training
    record = train_record(...)                                        # metrics/train/<variant>.json
    save_model(built.model, tokenizer, out_dir, ...)                  # models/<variant>/ (LoRA merged)

Fault injection (reliability tests only): DEPTHTUNE_FAULT_KILL_AT_STEP=[<variant>:]N makes the
process SIGKILL itself right after optimizer step N (before that step's checkpoint).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from depthtune import tasks
from depthtune.config import Params, VariantSpec, to_dict
from depthtune.errors import ModelError
from depthtune.files import atomic_dir
from depthtune.training.checkpoints import checkpoint_meta, latest_checkpoint
from depthtune.training.lr_search import search_and_train
from depthtune.records import AuditRecord, TrainRecord
from depthtune.planning.step_time import after_training
from depthtune.training.loop import train
from depthtune.training.prefix_cache import prefix_caches
from depthtune.model.variants import BuiltVariant, build_variant



def build_checked(params: Params, name: str, audit: AuditRecord, labels: list, seed: int) -> BuiltVariant:
    """Build the variant with real weights and assert it is the model the audit counted."""
    spec = params.variants[name]
    built = build_variant(params.model, spec, len(labels), device="cpu", path=f"variants.{name}", seed=seed,
                          task=params.task)
    if built.trainable_params != audit.trainable_params or built.total_params != audit.total_params:
        raise ModelError(f"variants.{name}: built model has {built.trainable_params:,} trainable / "
                         f"{built.total_params:,} total parameters but the audit says "
                         f"{audit.trainable_params:,} / {audit.total_params:,} (re-run the audit stage)")
    if tasks.get(params.task).labelled and built.config.num_labels != len(labels):
        raise ModelError(f"variants.{name}: model has {built.config.num_labels} labels, data has {len(labels)}")
    return built


def train_variant(built: BuiltVariant, *, spec: VariantSpec, cfg, train_ex, val_ex, metric: str, device: str,
                  pad_id: int, num_labels: int, checkpoint_dir: Optional[Path],
                  fingerprint_for: Callable[[object], str], extra_meta: dict, on_step=None,
                  log: Callable[[str], None] = print, task: str = "classification"):
    """Train the built variant in place: (outcome, the train config it trained with, the lr search's result or None).

    train.lr_search off: depthtune.training.loop.train at the configured lr (resuming a checkpoint if any).
    On: depthtune.training.lr_search.search_and_train (the frozen prefix cached once for every candidate); the
    winner's checkpoints carry the search's result, so a stage resumed after a kill skips the search
    and resumes the winner at its lr. `fingerprint_for(cfg)`: what a checkpoint of that config must match.
    """
    resumed = searched_lr(checkpoint_dir) if cfg.lr_search.enabled else None
    common = dict(spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, metric=metric,
                  device=device, pad_id=pad_id, num_labels=num_labels, checkpoint_dir=checkpoint_dir, log=log,
                  on_step=on_step)
    if cfg.lr_search.enabled and resumed is None:
        caches = prefix_caches(built.model, spec, built.num_layers, train_ex, val_ex, cfg, device=device,
                               pad_id=pad_id, checkpoint_dir=checkpoint_dir, log=log)
        outcome, cfg, result = search_and_train(built.model, cfg=cfg, caches=caches, fingerprint_for=fingerprint_for,
                                                extra_meta=extra_meta, **common)
        return outcome, cfg, result
    if resumed is not None:
        cfg = dataclasses.replace(cfg, lr=resumed["chosen_lr"])
        extra_meta = {**extra_meta, "lr_search": resumed}
    outcome = train(model=built.model, cfg=cfg, fingerprint=fingerprint_for(cfg), extra_meta=extra_meta, task=task,
                    **common)
    return outcome, cfg, resumed


def seed_summary(seed: int, outcome, metric: str) -> dict:
    """One seed's run in the train record's `seed_runs`."""
    return {"seed": seed, "steps": outcome.steps, "epochs_run": outcome.epochs_run,
            f"best_val_{metric}": outcome.best_val.get(metric), "not_converged": outcome.not_converged,
            "train_time_s": round(outcome.train_time_s, 3)}


def train_other_seeds(params: Params, name: str, audit: AuditRecord, labels: list, *, spec: VariantSpec, cfg,
                      train_ex, val_ex, device: str, pad_id: int, tokenizer, out_dir: Optional[Path],
                      checkpoint_dir: Path, fingerprint_for: Callable[[object], str],
                      log: Callable[[str], None] = print) -> list[dict]:
    """train.seeds = N > 1: the variant trained again with seeds seed+1 .. seed+N-1, one summary each.

    Same data, same lr (cfg.lr: the searched one when the search ran; it is not searched again, so
    the spread is that of training randomness: head initialisation, dropout, batch order). Each
    model goes to out_dir/seed-<s>/ (evaluated on the test split by the evaluation stage);
    out_dir/seeds.json lists them. With N = 1 out_dir holds only seeds.json (DVC tracks the folder).
    out_dir None: train, write nothing (the other ranks of a data-parallel run).
    """
    metric, runs = params.evaluation.metric, []
    with (atomic_dir(out_dir) if out_dir is not None else contextlib.nullcontext(None)) as tmp:
        for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
            c = dataclasses.replace(cfg, seed=seed, lr_search=dataclasses.replace(cfg.lr_search, enabled=False))
            built = build_checked(params, name, audit, labels, seed=seed)
            log(f"finetune {name}: seed {seed} ({seed - cfg.seed + 1} of {cfg.seeds}) at lr {c.lr:.3g}")
            outcome = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex,
                            val_ex=val_ex, cfg=c, metric=metric, device=device, pad_id=pad_id,
                            num_labels=len(labels), checkpoint_dir=checkpoint_dir / f"seed-{seed}",
                            fingerprint=fingerprint_for(c), log=lambda _: None, task=params.task)
            if tmp is not None:
                save_model(built.model, tokenizer, tmp / f"seed-{seed}", variant=name, spec=spec, labels=labels,
                           audit=audit, base=params.model.source, seed=seed, task=params.task)
            runs.append(seed_summary(seed, outcome, metric))
            log(f"finetune {name}: seed {seed}: best val {metric} {outcome.best_val.get(metric, float('nan')):.4f} "
                f"after {outcome.steps} steps")
        if tmp is not None:
            (tmp / "seeds.json").write_text(json.dumps({"variant": name, "lr": cfg.lr, "runs": runs}, indent=2) + "\n")
    return runs


def searched_lr(checkpoint_dir: Optional[Path]) -> Optional[dict]:
    """The lr search's result stored in the newest checkpoint (a resumed run), or None."""
    ck = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    return checkpoint_meta(ck).get("lr_search") if ck is not None else None


def train_record(*, name: str, spec: VariantSpec, cfg, metric: str, device: str, built: BuiltVariant, outcome,
                 wall_s: float, peak_bytes: int, peak_kind: str, audit: AuditRecord, run_id: Optional[str],
                 provenance: dict, lr_search: Optional[dict] = None, seed_runs: Optional[list] = None,
                 peak_reserved: int = 0, prediction: Optional[dict] = None) -> TrainRecord:
    """What training this variant did and cost; samples/s and tokens/s over the optimizer loop only;
    `prediction` (step_time.before_training) gets the measured time set against it."""
    est = audit.memory_estimate()
    timing = dict(prediction or {})
    if prediction:
        timing.update(after_training(prediction, steps=outcome.steps,
                                     train_time_s=outcome.train_time_s, trainable=built.trainable_params,
                                     variant=name))
    per_s = (lambda n: n / outcome.train_time_s) if outcome.train_time_s else (lambda n: 0.0)
    return TrainRecord(
        variant=name, description=spec.describe(), device=device, total_params=built.total_params,
        trainable_params=built.trainable_params, depth=built.num_layers, wall_time_s=round(wall_s, 3),
        train_time_s=round(outcome.train_time_s, 3), samples_per_s=per_s(outcome.samples),
        tokens_per_s=per_s(outcome.real_tokens), steps=outcome.steps, epochs_run=outcome.epochs_run,
        best_epoch=outcome.best_epoch, best_step=outcome.best_step, best_val=outcome.best_val,
        stopped_early=outcome.stopped_early, not_converged=outcome.not_converged, convergence=outcome.convergence,
        rise=outcome.rise, chance=outcome.chance, near_chance=outcome.near_chance,
        convergence_note=convergence_note(name, outcome, cfg, metric), extensions=outcome.extensions,
        budget_epochs=outcome.budget_epochs, horizon_steps=outcome.horizon_steps,
        world_size=outcome.world_size,
        per_device_batch_size=cfg.batch_size // outcome.world_size,
        cached_prefix_layers=outcome.cached_prefix_layers, cache_bytes=outcome.cache_bytes,
        peak_memory_bytes=peak_bytes, peak_memory_kind=peak_kind, estimated_memory_bytes=est,
        memory_ratio=peak_bytes / est if est else None, peak_reserved_bytes=peak_reserved,
        time_prediction=timing, loss_curve=outcome.loss_curve,
        val_curve=outcome.val_curve, resumed_from_step=outcome.resumed_from_step, mlflow_run_id=run_id,
        config=to_dict(cfg), lr_search=lr_search, seed_runs=seed_runs or [],
        versions=provenance["versions"], git_sha=provenance["git_sha"])


def convergence_note(name: str, outcome, cfg, metric: str) -> str:
    """What to change for a variant that is not converged or near chance ("" otherwise)."""
    notes = []
    rise = outcome.rise
    if outcome.not_converged:
        shown = ("too few validations to show a plateau" if rise is None else
                 f"validation {metric} {rise['before']:.4f} -> {rise['within']:.4f} over its last {rise['window']} "
                 f"validations, p={rise['p']:.2g}")
        notes.append(f"not converged: still rising after {outcome.budget_epochs} epochs ({shown}); raise "
                     f"train.convergence.max_epochs (now {cfg.max_epochs}) or variants.{name}.train.lr "
                     f"(now {cfg.lr:.3g})")
    if outcome.near_chance:
        notes.append(f"near chance: best validation {metric} {outcome.best_val.get(metric, float('nan')):.4f} against "
                     f"{outcome.chance:.4f} for the majority label; it learned next to nothing at lr {cfg.lr:.3g} "
                     f"(try variants.{name}.train.lr, or train.lr_search)")
        if not outcome.not_converged:
            notes[-1] = notes[-1].replace("near chance:", "near chance (converged by " + outcome.convergence + "):")
    return "; ".join(notes)


def save_model(model, tokenizer, out_dir: Path, *, variant: str, spec: VariantSpec, labels: list,
               audit: AuditRecord, base: str, seed: Optional[int] = None, task: str = "classification") -> None:
    """Standard HF folder: safetensors weights, config with labels (a labelled task) and true depth, tokenizer."""
    model = spec.method.finish(model)  # LoRA: the adapters merged into the weights
    if tasks.get(task).labelled:
        model.config.id2label = {i: n for i, n in enumerate(labels)}
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    else:
        labels = []  # a causal LM has no labels (the prepared data's one pseudo-class is not the model's)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "depthtune.json").write_text(json.dumps({
            "variant": variant, "task": task, "spec": to_dict(spec), "labels": labels, "base_model": base,
            "seed": seed,
            "audit_trainable_params": audit.trainable_params, "audit_total_params": audit.total_params,
        }, indent=2) + "\n")


def flat_params(name: str, spec: VariantSpec, cfg, params: Params) -> dict:
    """What MLflow shows as params: the variant and its effective training config (< 100 keys)."""
    flat = {"variant": name, "model.source": params.model.source, "data.source": params.data.source,
            "data.max_train_samples": params.data.max_train_samples}
    flat.update({f"spec.{k}": v for k, v in to_dict(spec).items() if k != "train"})
    for k, v in to_dict(cfg).items():  # train.lr = the lr trained with (the chosen one after a search)
        if isinstance(v, dict):  # train.lr_search.enabled, .factors, .steps
            flat.update({f"train.{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[f"train.{k}"] = v
    return flat
