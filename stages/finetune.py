"""DVC stage `finetune@<variant>`: train one depth variant, save it, record what it cost.

    python -m stages.finetune --variant top2 [--params params.yaml] [--tokenized data/tokenized]
        [--labels data/prepared/labels.json] [--audit audit/top2.json] [--model models/top2]
        [--metrics metrics/train/top2.json] [--loss-plot plots/loss/top2.csv]

Reads params `model`, `variants.<variant>`, `train`, `evaluation.metric`, `tracking`.
With `train.lr_search.enabled` the variant's learning rate is chosen on the validation split by
successive halving (depthtune.training.lr_search: one line per rung) and the winning run trains on.
Writes the model folder (a standard Hugging Face folder, LoRA merged, true depth), the
train record (depthtune.records.TrainRecord) and the loss curve CSV. Checkpoints go to
checkpoints/<variant>/ while training (resumed after a kill) and are removed on success.
Under `torchrun --nproc_per_node N` the ranks train data-parallel and rank 0 writes.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from depthtune import layout, runtime, stopwatch

from depthtune.training import finetuning

from depthtune.planning import step_time

from depthtune.tracking import log_runs as tracking
from depthtune.training.checkpoints import checkpoint_meta, fault_kill_hook, latest_checkpoint
from depthtune.data.batching import Examples
from depthtune.config import TrainConfig, VariantSpec, effective_train, load_params, to_dict, variant_of
from depthtune.training.data_parallel import init_distributed
from depthtune.files import write_text_atomic
from depthtune.training.memory import PeakMemory
from depthtune.training.precision import resolve_precision
from depthtune.provenance import provenance, tree_fingerprint
from depthtune.records import AuditRecord, LabelSet, TrainRecord, read_variant_record
from depthtune.model.sources import load_tokenizer
from depthtune.data.tokenized import check_vocab, load_tokenized
from depthtune.training.checkpoints import fingerprint_of
from depthtune.training.loop import loss_csv


@dataclass
class Job:
    """What the stage reads before anything trains."""
    name: str
    spec: VariantSpec
    cfg: TrainConfig  # the variant's train section (its own lr, else train.lr, else its kind's)
    device: str
    rank: int  # torchrun: data-parallel rank (0 writes); 0 otherwise
    labels: list
    audit: AuditRecord
    ds: object  # the tokenized splits
    tokenizer: object
    pad_id: int
    ck_dir: Path
    run_id: Optional[str]  # the variant's MLflow run (re-attached when a killed run resumes)
    train_ex: Examples
    val_ex: Examples
    fingerprint_for: Callable  # train config -> what a checkpoint of it must match to be resumed


def read_job(args, params) -> Job:
    name, spec = args.variant, variant_of(params, args.variant)
    cfg = effective_train(params, spec)
    device = runtime.pick_device(cfg.device)
    runtime.set_threads(cfg.num_threads)
    rank, _ = init_distributed(device)  # torchrun --nproc_per_node N: data parallel, rank 0 writes
    labels = LabelSet.read(args.labels).names
    audit = read_variant_record(AuditRecord, args.audit, name)
    ds = load_tokenized(args.tokenized)
    tokenizer = load_tokenizer(params.model)
    ck_dir = Path(layout.checkpoint_dir(name))
    run_id = None
    if rank == 0:  # one MLflow run per variant, re-attached when a killed run resumes
        ck = latest_checkpoint(ck_dir)
        with stopwatch.measure("mlflow"):
            run_id = tracking.variant_run_id(params.tracking, name,
                                             resume_run_id=checkpoint_meta(ck).get("mlflow_run_id") if ck else None)
    data_fp = tree_fingerprint(args.tokenized / "train")

    def fingerprint_for(c) -> str:
        return fingerprint_of(name, to_dict(spec), to_dict(c), params.model.source, data_fp, labels)

    return Job(name=name, spec=spec, cfg=cfg, device=device, rank=rank, labels=labels, audit=audit, ds=ds,
               tokenizer=tokenizer, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
               ck_dir=ck_dir, run_id=run_id, train_ex=Examples.from_dataset(ds["train"]),
               val_ex=Examples.from_dataset(ds["validation"]), fingerprint_for=fingerprint_for)


def predict_time(job: Job) -> dict:
    """The train time predicted before training (GEMM, optimizer and step floor timed now: ~0.5 s)."""
    cfg = job.cfg
    prediction = step_time.before_training(job.audit, job.train_ex, batch_size=cfg.batch_size, seed=cfg.seed,
                                           epochs=cfg.epochs, device=job.device,
                                           precision=resolve_precision(cfg.precision, job.device), kind=job.spec.kind)
    tp = prediction["throughput"]
    print(f"finetune {job.name}: predicted {prediction['train_s']:.1f} s for {cfg.epochs} epochs of "
          f"{prediction['steps_per_epoch']} steps ({1e3 * prediction['step_s']:.0f} ms/step; GEMM "
          f"{tp['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s x efficiency {tp['efficiency']:.2f}, "
          f"{tp['efficiency_source']})")
    return prediction


@dataclass
class Trained:
    built: object
    outcome: object
    cfg: TrainConfig  # the config it trained with (the lr search's winner's lr)
    lr_search: Optional[dict]
    seed_runs: list
    mem: PeakMemory
    wall_s: float


def train(job: Job, params, args) -> Trained:
    """Build the audited model, train it (and train.seeds' other seeds), measuring peak memory."""
    name, spec, metric = job.name, job.spec, params.evaluation.metric
    # Peak memory counts from here: model, gradients, optimizer, activations, prefix cache
    # (imports, MLflow and the data above are outside, as in the audit's estimate).
    t_wall = time.perf_counter()
    with PeakMemory(job.device) as mem:
        built = finetuning.build_checked(params, name, job.audit, job.labels, seed=job.cfg.seed)
        print(f"finetune {name}: {spec.describe()}, {built.trainable_params:,} of {built.total_params:,} "
              f"parameters trainable ({100 * built.trainable_params / built.total_params:.2f}%), device {job.device}")
        check_vocab(job.ds["train"], built.config.vocab_size, args.tokenized)
        outcome, cfg, lr_search = finetuning.train_variant(
            built, spec=spec, cfg=job.cfg, train_ex=job.train_ex, val_ex=job.val_ex, metric=metric,
            device=job.device, pad_id=job.pad_id, num_labels=len(job.labels), checkpoint_dir=job.ck_dir,
            fingerprint_for=job.fingerprint_for, extra_meta={"mlflow_run_id": job.run_id},
            on_step=fault_kill_hook(name), log=print, task=params.task)  # print: also the Prefect log
    # train.seeds > 1: the other seeds, at the same lr (every rank trains; rank 0 writes seed_models/<v>/)
    seed_runs = [finetuning.seed_summary(cfg.seed, outcome, metric)] if cfg.seeds > 1 else []
    seed_runs += finetuning.train_other_seeds(
        params, name, job.audit, job.labels, spec=spec, cfg=cfg, train_ex=job.train_ex, val_ex=job.val_ex,
        device=job.device, pad_id=job.pad_id, tokenizer=job.tokenizer,
        out_dir=args.seed_models if job.rank == 0 else None, checkpoint_dir=job.ck_dir,
        fingerprint_for=job.fingerprint_for, log=print)
    return Trained(built=built, outcome=outcome, cfg=cfg, lr_search=lr_search, seed_runs=seed_runs, mem=mem,
                   wall_s=time.perf_counter() - t_wall)


def write_outputs(job: Job, run: Trained, prediction: dict, params, args) -> TrainRecord:
    """The model folder, the loss curve, MLflow, then the train record; the checkpoints go."""
    name, spec, mem = job.name, job.spec, run.mem
    record = finetuning.train_record(name=name, spec=spec, cfg=run.cfg, metric=params.evaluation.metric,
                                     device=job.device, built=run.built, outcome=run.outcome, wall_s=run.wall_s,
                                     peak_bytes=mem.peak_growth, peak_kind=mem.kind, peak_reserved=mem.peak_reserved,
                                     prediction=prediction, audit=job.audit, run_id=job.run_id,
                                     provenance=provenance(), lr_search=run.lr_search, seed_runs=run.seed_runs)
    finetuning.save_model(run.built.model, job.tokenizer, args.model, variant=name, spec=spec, labels=job.labels,
                          audit=job.audit, base=params.model.source, seed=run.cfg.seed, task=params.task)
    write_text_atomic(args.loss_plot, loss_csv(run.outcome.loss_curve))
    with stopwatch.measure("mlflow"):
        logged = tracking.log_variant_training(
            params.tracking, name, audit_result=job.audit, train_result=record, model_dir=args.model,
            params_flat=finetuning.flat_params(name, spec, run.cfg, params), resolved_config=to_dict(params),
            run_id=job.run_id)
    record.tracking = logged
    record.mlflow_run_id = logged.get("run_id") or job.run_id  # the store may have come back
    record.write(args.metrics)
    shutil.rmtree(job.ck_dir, ignore_errors=True)  # done: nothing left to resume
    return record


def summary(job: Job, run: Trained, record: TrainRecord, metric: str, args) -> None:
    outcome, mem = run.outcome, run.mem
    best = outcome.best_val.get(metric, float("nan"))
    print(f"finetune {job.name}: {outcome.steps} steps in {outcome.train_time_s:.1f} s "
          f"({record.samples_per_s:.1f} samples/s, {record.tokens_per_s:.0f} tokens/s), "
          f"best val {metric} {best:.4f} at epoch {outcome.best_epoch:g}; peak memory "
          f"{mem.peak_growth / 2**20:.0f} MiB vs estimate {record.estimated_memory_bytes / 2**20:.0f} MiB "
          f"({mem.peak_reserved / 2**20:.0f} MiB reserved); time {outcome.train_time_s:.1f} s vs predicted "
          f"{record.time_prediction['predicted_s_for_steps_run']:.1f} s -> {args.model}/, {args.metrics}")
    if record.not_converged:
        print(f"warning: finetune {job.name}: {record.convergence_note}")


def main(argv=None) -> None:
    args = layout.parse_stage_args("finetune", argv, __doc__)
    params = load_params(args.params)
    job = read_job(args, params)
    prediction = predict_time(job)
    run = train(job, params, args)
    if job.rank != 0:
        return  # only rank 0 writes outputs
    record = write_outputs(job, run, prediction, params, args)
    summary(job, run, record, params.evaluation.metric, args)


if __name__ == "__main__":
    from depthtune.files import run_main

    runtime.configure_process()
    run_main(main)
