"""DVC stage `finetune@<variant>`: train one depth variant, save it, record what it cost.

    python -m stages.finetune --variant top2 [--params params.yaml]

Reads params `model`, `variants.<variant>`, `train`, `evaluation.metric`, `tracking`;
inputs data/tokenized, data/prepared/labels.json, audit/<variant>.json.
Writes models/<variant>/ (a standard Hugging Face folder, LoRA merged, true depth),
metrics/train/<variant>.json and plots/loss/<variant>.csv. Checkpoints go to
checkpoints/<variant>/ while training (resumed after a kill) and are removed on success.

Fault injection (reliability tests only): DEPTHTUNE_FAULT_KILL_AT_STEP=[<variant>:]N makes the
process SIGKILL itself right after optimizer step N (before that step's checkpoint).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from depthtune import runtime
from depthtune.config import effective_train, load_variant_args, to_dict
from depthtune.errors import ConfigError, DataError, ModelError
from depthtune.files import atomic_dir, read_json, run_main, write_json_atomic, write_text_atomic
from depthtune.memory import PeakMemory
from depthtune.provenance import provenance, tree_fingerprint
from depthtune.sources import load_tokenizer
from depthtune import tracking
from depthtune.training import Examples, fingerprint_of, init_distributed, latest_checkpoint, train
from depthtune.variants import build_variant, merge_lora


def load_tokenized(path: Path):
    from datasets import load_from_disk

    if not path.exists():
        raise DataError(f"{path}: tokenized data not found (run `dvc repro tokenization` first)")
    try:
        return load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: unreadable tokenized dataset ({str(exc).splitlines()[0][:120]})") from None


def check_vocab(ds, vocab_size: int, path: Path) -> None:
    top = max((max(ids) for ids in ds["input_ids"] if ids), default=0)
    if top >= vocab_size:
        raise DataError(f"{path}: token id {top} is outside the model's vocabulary of {vocab_size}; "
                        "the data was tokenized for another model (re-run the tokenization stage)")


def save_model(model, tokenizer, out_dir: Path, *, variant: str, spec, labels: list, audit: dict, base: str) -> None:
    """Standard HF folder: safetensors weights, config with labels and true depth, tokenizer."""
    model = merge_lora(model)
    model.config.id2label = {i: n for i, n in enumerate(labels)}
    model.config.label2id = {n: i for i, n in enumerate(labels)}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "depthtune.json").write_text(json.dumps({
            "variant": variant, "spec": to_dict(spec), "labels": labels, "base_model": base,
            "audit_trainable_params": audit["trainable_params"], "audit_total_params": audit["total_params"],
        }, indent=2) + "\n")


def flat_params(name, spec, cfg, params) -> dict:
    """What MLflow shows as params: the variant and its effective training config (< 100 keys)."""
    flat = {"variant": name, "model.source": params.model.source, "data.source": params.data.source,
            "data.max_train_samples": params.data.max_train_samples}
    flat.update({f"spec.{k}": v for k, v in to_dict(spec).items() if k != "train"})
    flat.update({f"train.{k}": v for k, v in to_dict(cfg).items()})
    return flat


FAULT_KILL_ENV = "DEPTHTUNE_FAULT_KILL_AT_STEP"


def fault_kill_hook(variant: str):
    """`on_step` callback for DEPTHTUNE_FAULT_KILL_AT_STEP=[<variant>:]N: SIGKILL right after step N (tests)."""
    spec = os.environ.get(FAULT_KILL_ENV, "").strip()
    if not spec:
        return None
    target, _, step = spec.rpartition(":")
    if target and target != variant:
        return None
    if not step.isdigit() or int(step) < 1:
        raise ConfigError(f"{FAULT_KILL_ENV}={spec!r}: expected [<variant>:]<step >= 1>")
    kill_at = int(step)

    def on_step(step_done: int, epoch: int) -> None:
        if step_done == kill_at:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def main(argv=None) -> None:
    params, name = load_variant_args(argv, __doc__)
    spec = params.variants[name]
    cfg = effective_train(params, spec)
    device = runtime.pick_device(cfg.device)
    runtime.set_threads(cfg.num_threads)
    rank, world = init_distributed(device)  # torchrun --nproc_per_node N: data parallel, rank 0 writes
    runtime.seed_everything(cfg.seed)

    tok_dir, labels_path, audit_path = Path("data/tokenized"), Path("data/prepared/labels.json"), Path(f"audit/{name}.json")
    labels = read_json(labels_path)["names"]
    audit = read_json(audit_path)
    ds = load_tokenized(tok_dir)
    tokenizer = load_tokenizer(params.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    run_id = None
    if rank == 0:  # one MLflow run per variant, re-attached when a killed run resumes
        ck = latest_checkpoint(Path("checkpoints") / name)
        resume_id = json.loads((ck / "meta.json").read_text()).get("mlflow_run_id") if ck else None
        run_id = tracking.variant_run_id(params.tracking, name, resume_run_id=resume_id)
    train_ex, val_ex = Examples.from_dataset(ds["train"]), Examples.from_dataset(ds["validation"])

    # Peak memory counts from here: model, gradients, optimizer, activations, prefix cache
    # (imports, MLflow and the data above are outside, as in the audit's estimate).
    t_wall = time.perf_counter()
    with PeakMemory(device) as mem:
        built = build_variant(params.model, spec, len(labels), device="cpu", path=f"variants.{name}", seed=cfg.seed)
        # Invariant: the model we train is the model the audit counted.
        if built.trainable_params != audit["trainable_params"] or built.total_params != audit["total_params"]:
            raise ModelError(f"variants.{name}: built model has {built.trainable_params:,} trainable / "
                             f"{built.total_params:,} total parameters but audit/{name}.json says "
                             f"{audit['trainable_params']:,} / {audit['total_params']:,} (re-run the audit stage)")
        print(f"finetune {name}: {spec.describe()}, {built.trainable_params:,} of {built.total_params:,} "
              f"parameters trainable ({100 * built.trainable_params / built.total_params:.2f}%), device {device}")
        check_vocab(ds["train"], built.config.vocab_size, tok_dir)
        if built.config.num_labels != len(labels):
            raise ModelError(f"variants.{name}: model has {built.config.num_labels} labels, data has {len(labels)}")
        fingerprint = fingerprint_of(name, to_dict(spec), to_dict(cfg), params.model.source,
                                     tree_fingerprint(tok_dir / "train"), labels)
        outcome = train(model=built.model, spec=spec, num_layers=built.num_layers,
                        train_ex=train_ex, val_ex=val_ex,
                        cfg=cfg, metric=params.evaluation.metric, device=device, pad_id=pad_id,
                        num_labels=len(labels), checkpoint_dir=Path("checkpoints") / name, fingerprint=fingerprint,
                        extra_meta={"mlflow_run_id": run_id}, on_step=fault_kill_hook(name))
    wall = time.perf_counter() - t_wall
    if rank != 0:
        return  # only rank 0 writes outputs

    est = audit.get("estimates_typical", audit["estimates"])["memory_bytes"]["total"]
    result = {
        "schema": "depthtune.train/1", "variant": name, "description": spec.describe(), "device": device,
        "total_params": built.total_params, "trainable_params": built.trainable_params,
        "depth": built.num_layers, "wall_time_s": round(wall, 3), "train_time_s": round(outcome.train_time_s, 3),
        "samples_per_s": outcome.samples / outcome.train_time_s if outcome.train_time_s else 0.0,
        "tokens_per_s": outcome.real_tokens / outcome.train_time_s if outcome.train_time_s else 0.0,
        "steps": outcome.steps, "epochs_run": outcome.epochs_run, "best_epoch": outcome.best_epoch,
        "best_step": outcome.best_step, "best_val": outcome.best_val, "stopped_early": outcome.stopped_early,
        "world_size": outcome.world_size, "per_device_batch_size": cfg.batch_size // outcome.world_size,
        "cached_prefix_layers": outcome.cached_prefix_layers, "cache_bytes": outcome.cache_bytes,
        "peak_memory_bytes": mem.peak_growth, "peak_memory_kind": mem.kind, "estimated_memory_bytes": est,
        "memory_ratio": mem.peak_growth / est if est else None,
        "loss_curve": outcome.loss_curve, "val_curve": outcome.val_curve, "resumed_from_step": outcome.resumed_from_step,
        "mlflow_run_id": run_id, "config": to_dict(cfg), **provenance(),
    }
    save_model(built.model, tokenizer, Path("models") / name, variant=name, spec=spec, labels=labels, audit=audit,
               base=params.model.source)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    for row in outcome.loss_curve:
        w.writerow([row["step"], f"{row['loss']:.6f}"])
    write_text_atomic(Path("plots/loss") / f"{name}.csv", buf.getvalue())
    result["tracking"] = tracking.log_variant_training(
        params.tracking, name, audit_result=audit, train_result=result, model_dir=Path("models") / name,
        params_flat=flat_params(name, spec, cfg, params), resolved_config=to_dict(params), run_id=run_id)
    result["mlflow_run_id"] = result["tracking"].get("run_id") or run_id  # the store may have come back
    write_json_atomic(Path("metrics/train") / f"{name}.json", result)
    shutil.rmtree(Path("checkpoints") / name, ignore_errors=True)  # done: nothing left to resume
    print(f"finetune {name}: {outcome.steps} steps in {outcome.train_time_s:.1f} s "
          f"({result['samples_per_s']:.1f} samples/s, {result['tokens_per_s']:.0f} tokens/s), "
          f"best val {params.evaluation.metric} {outcome.best_val.get(params.evaluation.metric, float('nan')):.4f} "
          f"at epoch {outcome.best_epoch}; peak memory {mem.peak_growth / 2**20:.0f} MiB vs estimate {est / 2**20:.0f} MiB")


if __name__ == "__main__":
    run_main(main)
