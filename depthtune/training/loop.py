"""A compact fine-tuning loop: dynamic padding over length-grouped batches,
frozen-prefix caching, AdamW + linear warmup/decay, gradient accumulation and
clipping, early stopping, atomic resumable checkpoints.

Why not transformers.Trainer: caching the frozen prefix needs control of the
forward pass, and this loop with its state is ~400 lines (see bench/ for the measured speed).

The phases (torchtune-recipe style), each a function:
  setup()            device, mixed precision, frozen-prefix caches, optimizer, scheduler -> TrainSetup
                     (prefix_caches() builds the caches; a caller may build them once and pass them in)
  start_or_resume()  a fresh TrainState, or the newest checkpoint's (weights, optimizer, RNG restored)
  run_epoch()        the optimizer steps of one epoch; batch_logits() is the one training forward pass
  validate()         validation scores, best-weights bookkeeping, early stopping (patience; not near chance)
  save()             a checkpoint (rank 0 writes)
  finish()           the epochs of the budget, and extensions while the curve still rises (extend)
  train()            ties them together
Batching lives in depthtune.data.batching, the prefix cache in depthtune.training.prefix_cache, checkpoint
files in depthtune.training.checkpoints, gradient averaging over processes in depthtune.training.data_parallel,
AdamW and the schedule in depthtune.training.optimizer.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from depthtune.data.batching import Examples, autocast, collate, length_grouped_batches, predict_logits
from depthtune.training.optimizer import LinearSchedule, apply_step, build_optimizer
from depthtune.training.checkpoints import load_trainable_state, resume_latest, save_checkpoint, trainable_state
from depthtune import tasks
from depthtune.config import TrainConfig, VariantSpec
from depthtune.evaluation import convergence, metrics
from depthtune.training.data_parallel import all_reduce_grads, dist_info, params_in_sync
from depthtune.errors import ModelError
from depthtune.evaluation.lm_scoring import loss_starts, score_texts
from depthtune.training.precision import apply_precision, autocast_dtype, enable_gradient_checkpointing, resolve_precision
from depthtune.training.prefix_cache import (PrefixCache, frozen_prefix_layers, predict_cached, prefix_caches,
                                             set_train_mode, top_forward)
from depthtune.progress import Progress
from depthtune.runtime import seed_everything

# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Where training stands: everything a resumed run needs besides weights, optimizer and RNG.

    Saved as the checkpoint's meta.json (to_meta), read back on resume (from_meta).
    """
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way (= epochs completed; a finished epoch counts at its last step)
    batch_in_epoch: int = 0  # batches of `epoch` already stepped over: a resume starts at the next one
    best: Optional[float] = None  # best validation `metric` so far (None: no evaluation yet, the first one wins)
    best_epoch: float = -1  # epochs done at the best evaluation (1.5 = halfway through the second)
    best_step: int = 0
    best_val: dict = field(default_factory=dict)  # all scores of the best evaluation
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    loss_curve: list = field(default_factory=list)  # {"step", "epoch", "loss", "lr"} per optimizer step
    val_curve: list = field(default_factory=list)  # {"step", "epoch" (step / steps per epoch), the scores}
    samples: int = 0  # examples processed over all ranks (incl. repeats over epochs)
    real_tokens: int = 0  # non-pad tokens processed over all ranks
    stopped_early: bool = False
    extensions: int = 0  # budget extensions granted (a run still rising at the end of its budget)
    # {str(step): per-text outputs} of the validations the plateau and chance tests may still read
    # (evaluation.convergence.outputs_to_keep: the last window, the best before it, the best overall)
    val_outputs: dict = field(default_factory=dict)
    fingerprint: str = ""  # variant + config + data: a checkpoint of anything else is refused
    train_time_s: float = 0.0  # wall clock of the loop, evaluations included
    eval_time_s: float = 0.0
    extra: dict = field(default_factory=dict)  # the caller's keys (mlflow_run_id), top-level in meta.json

    def to_meta(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**meta, **{k: v for k, v in self.extra.items() if k not in meta}}

    @classmethod
    def from_meta(cls, meta: dict, extra: Optional[dict] = None) -> "TrainState":
        """A checkpoint's state; its extra keys win over `extra` (a resumed run keeps its MLflow run)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        saved_extra = {k: v for k, v in meta.items() if k not in known}
        return cls(**{k: v for k, v in meta.items() if k in known}, extra={**(extra or {}), **saved_extra})


class BestWeights:
    """The trainable weights of the best validation so far; the model gets them back at the end."""

    def __init__(self, tensors: Optional[dict]):
        self.tensors = tensors

    def keep(self, model: nn.Module) -> None:
        """The model's current weights become the best."""
        if self.tensors is None:
            self.tensors = trainable_state(model)
        else:  # in place: no second copy alive while the new one is made
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        self.tensors[n].copy_(p)

    def for_checkpoint(self, model: nn.Module) -> dict:
        return self.tensors if self.tensors is not None else trainable_state(model)

    def restore(self, model: nn.Module) -> None:
        if self.tensors is not None:  # None only if no evaluation ran although one was certain (cannot happen)
            load_trainable_state(model, self.tensors)


class LapTimer:
    """Seconds between laps: training time is added up at each checkpoint."""

    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


@dataclass
class TrainOutcome:
    steps: int
    epochs_run: float  # steps / steps per epoch (2.5 = stopped halfway through the third)
    best_epoch: float
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
    # evaluation.convergence: early stopping | plateau | still rising; the plateau test's figures (None: too few
    # validations); the majority predictor's validation score and whether the best stayed near it
    convergence: str = "still rising"
    rise: Optional[dict] = None
    chance: Optional[float] = None
    near_chance: bool = False
    extensions: int = 0
    budget_epochs: int = 0  # the epochs the run was given: train.epochs plus its extensions
    horizon_steps: int = 0  # optimizer steps of train.convergence.max_epochs (the verdict's trend horizon)

    @property
    def not_converged(self) -> bool:
        return self.convergence == "still rising"


def improves(score: float, best: Optional[float], metric: str) -> bool:
    """Whether a validation score beats the best so far, in the metric's direction (perplexity: lower)."""
    if best is None or best < 0:  # no evaluation yet (-1: the marker of checkpoints before the direction)
        return True
    return metrics.get(metric).better(score, best)


def plateau_rise(run: "TrainSetup", state: "TrainState") -> Optional[convergence.Rise]:
    """The plateau test on the run's validation curve so far (evaluation.convergence.rise_of)."""
    conv = run.cfg.convergence

    def paired_p(a, b):
        return run.task.paired_p(a, b, run.val_ex, run.metric, run.num_labels)

    return convergence.rise_of(state.val_curve, state.val_outputs, run.metric, conv.window, conv.alpha, paired_p)


def is_near_chance(run: "TrainSetup", state: "TrainState", *, test: bool = False) -> bool:
    """Whether the best validation so far is near chance; `test`: also the paired test against the majority
    predictor (the end of training), else only the share of the way covered (cheap, every validation)."""
    if run.chance is None or state.best is None:
        return False
    p = 0.0
    if test:
        best_outputs = state.val_outputs.get(str(state.best_step))
        p = 0.0 if best_outputs is None else run.task.paired_p(
            best_outputs, run.task.keepable(run.task.chance_outputs(run.val_ex)), run.val_ex, run.metric,
            run.num_labels)
    return convergence.near_chance(state.best, run.chance, p, run.metric, run.cfg.convergence.alpha)


# ----------------------------------------------------------------------------- setup


@dataclass
class TrainSetup:
    """What stays fixed while training runs (built once by setup())."""
    model: nn.Module
    cfg: TrainConfig
    train_ex: Examples
    val_ex: Examples
    device: str
    pad_id: int
    autocast_dtype: Optional[torch.dtype]  # bf16 under bf16-autocast (train.precision auto on a GPU), else None
    rank: int
    world: int  # data-parallel processes (torchrun); 1 otherwise
    frozen: int  # bottom encoder layers frozen (train_top variants), run in eval mode
    train_cache: Optional[PrefixCache]  # the frozen prefix's outputs, when cached
    val_cache: Optional[PrefixCache]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    checkpoint_dir: Optional[Path]
    metric: str  # the validation score that picks the best weights
    num_labels: int
    eval_batch_size: int
    log: Callable[[str], None]
    steps_per_epoch: int = 1
    timer: LapTimer = field(default_factory=LapTimer)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the lr search's rungs)
    task: tasks.Task = None  # what the loss and the validation scores are (setup: tasks.get(name))
    progress: Optional[Progress] = None  # the live progress line (finish() sets it; lr-search candidates run without)
    chance: Optional[float] = None  # the majority predictor's validation `metric` (None: the task has no such level)

    @property
    def schedule(self) -> LinearSchedule:
        return self.scheduler.lr_lambdas[0]


def setup(*, model: nn.Module, spec: VariantSpec, num_layers: int, train_ex: Examples, val_ex: Examples,
          cfg: TrainConfig, metric: str, device: str, pad_id: int, num_labels: int,
          checkpoint_dir: Optional[Path] = None, log: Callable[[str], None] = print,
          eval_batch_size: int = 64, caches: Optional[tuple] = None,
          max_steps: Optional[int] = None, task: str = "classification") -> TrainSetup:
    """Device, mixed precision, frozen-prefix caches, optimizer and schedule for one training run.

    `caches`: a pair from prefix_caches() for this model's variant and data (built here when None).
    `max_steps`: run_epoch() stops after that many optimizer steps (the schedule still spans train.epochs,
    so a run continued later goes on exactly as one that never stopped).
    """
    model.to(device)
    rank, world = dist_info()
    if world > 1 and cfg.batch_size % world:
        raise ModelError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} processes; "
                         "the global batch must split evenly")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # train.precision: auto = bf16 autocast on a GPU, fp32 on the CPU; bf16 = the weights themselves in bf16
    precision = resolve_precision(cfg.precision, device)
    apply_precision(model, precision)
    if cfg.gradient_checkpointing:  # after LoRA (the builder added it): peft would put its input-grad hook back
        enable_gradient_checkpointing(model)
    k = frozen_prefix_layers(spec, num_layers)
    if caches is None:
        caches = prefix_caches(model, spec, num_layers, train_ex, val_ex, cfg, device=device, pad_id=pad_id,
                               checkpoint_dir=checkpoint_dir, log=log)
    # the schedule spans train.epochs (early stopping may end the run before the decay does); a run still rising
    # at its end goes on in cycles of extension_epochs (finish: extend)
    per_epoch = steps_per_epoch(len(train_ex), cfg)
    total_steps = per_epoch * cfg.epochs
    the_task = tasks.get(task)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps, extension_steps=per_epoch * cfg.extension_epochs,
                                           head_lr=cfg.head_lr if the_task.labelled else None)
    chance_outputs = the_task.chance_outputs(val_ex)
    chance = None if chance_outputs is None else the_task.validation_scores(chance_outputs, val_ex, num_labels)[metric]
    return TrainSetup(model=model, cfg=cfg, train_ex=train_ex, val_ex=val_ex, device=device, pad_id=pad_id,
                      autocast_dtype=autocast_dtype(precision), rank=rank, world=world,
                      frozen=k, train_cache=caches[0], val_cache=caches[1], optimizer=optimizer,
                      scheduler=scheduler, total_steps=total_steps, checkpoint_dir=checkpoint_dir, metric=metric,
                      num_labels=num_labels, eval_batch_size=eval_batch_size, log=log, max_steps=max_steps,
                      steps_per_epoch=per_epoch, task=the_task, chance=chance)


def steps_per_epoch(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps in one epoch: a step every grad_accum batches, and one at the epoch's end."""
    return math.ceil(math.ceil(num_examples / cfg.batch_size) / cfg.grad_accum)


def is_eval_step(cfg: TrainConfig, step: int, per_epoch: int) -> bool:
    """Whether validation runs after optimizer step `step` (1-based).

    train.eval_every > 0: every that many steps. 0: train.evals_per_epoch times an epoch, evenly
    spaced, the last at the epoch's end: 125 steps an epoch and 2 evaluations -> after steps 63 and
    125 of each epoch (early stopping then reacts within half an epoch, not a whole one).
    """
    if cfg.eval_every:
        return step % cfg.eval_every == 0
    n = min(cfg.evals_per_epoch, per_epoch)
    in_epoch = (step - 1) % per_epoch + 1
    return any(in_epoch == math.ceil(j * per_epoch / n) for j in range(1, n + 1))


def patience_spent(cfg: TrainConfig, state: "TrainState") -> bool:
    """Early stopping: train.patience evaluations in a row without a new best (0 = never stop). Not inside an
    extension: its cycle warms the lr up again, and the dip that follows is not a plateau (measured: CLINC150's
    depth3, rising 0.25 -> 0.35, dipped to 0.26 at the extension's first validation and patience ended it); an
    extension is trained whole and judged by the plateau test at its end (extend)."""
    return cfg.patience > 0 and state.bad_evals >= cfg.patience and state.extensions == 0


def start_or_resume(run: TrainSetup, fingerprint: str,
                    extra_meta: dict) -> tuple[TrainState, BestWeights, Optional[int]]:
    """(state, best weights, the step resumed from or None): fresh, or from the newest checkpoint."""
    cfg = run.cfg
    # The best weights so far. An evaluation always replaces them (best starts at -1), so when one is
    # certain to run, the starting copy is never read: skip it (trainable params x 4 B, 87 MiB for
    # MiniLM full fine-tuning, held until the first evaluation). A checkpoint written before the first
    # evaluation stores the current weights as `best`; a resume replaces them at its first evaluation too.
    evaluation_certain = not cfg.eval_every or run.total_steps >= cfg.eval_every
    best = BestWeights(None if evaluation_certain else trainable_state(run.model))
    resumed = resume_latest(run.checkpoint_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                            fingerprint=fingerprint)
    if resumed is None:
        return TrainState(fingerprint=fingerprint, extra=dict(extra_meta)), best, None
    meta, best.tensors, name = resumed
    state = TrainState.from_meta(meta, extra=extra_meta)
    run.log(f"resumed from {name} (step {state.step}, epoch {state.epoch})")
    return state, best, state.step


# ----------------------------------------------------------------------------- phases


def batch_logits(run: TrainSetup, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A labelled task's training forward pass: (logits, labels, non-pad tokens) for training examples `index`.

    With a prefix cache only the trainable top runs, on the cached hidden states; otherwise the whole model.
    """
    if run.train_cache is not None:
        hidden, mask = run.train_cache.batch(index, run.device)
        labels = torch.tensor([run.train_ex.labels[i] for i in index], device=run.device)
        with autocast(run.device, run.autocast_dtype):
            logits = top_forward(run.model, hidden, mask, run.frozen)
    else:
        batch = {k: v.to(run.device) for k, v in collate(run.train_ex, index, run.pad_id).items()}
        labels, mask = batch.pop("labels"), batch["attention_mask"]
        with autocast(run.device, run.autocast_dtype):
            logits = run.model(**batch).logits
    return logits, labels, int(mask.sum())


def batch_lm_loss(run: TrainSetup, index: list[int]) -> tuple[torch.Tensor, int]:
    """A per-position task's training forward (next token): (its loss, non-pad tokens) for training examples
    `index`: the logits of every position, trained against the texts themselves."""
    batch = {k: v.to(run.device) for k, v in collate(run.train_ex, index, run.pad_id).items() if k != "labels"}
    with autocast(run.device, run.autocast_dtype):
        if run.train_cache is not None:  # the trainable top on the cached prefix: every position's logits
            hidden, mask = run.train_cache.batch(index, run.device)
            logits = top_forward(run.model, hidden, mask, run.frozen)
        else:
            logits = run.model(**batch).logits
    targets = (batch["input_ids"], batch["attention_mask"], loss_starts(run.train_ex, index, run.device))
    return run.task.loss(logits, targets), int(batch["attention_mask"].sum())


def batch_loss(run: TrainSetup, index: list[int]) -> tuple[torch.Tensor, int]:
    """The one training forward and loss of the task (depthtune.tasks: `loss`): (loss, non-pad tokens)."""
    if run.task.per_position:
        return batch_lm_loss(run, index)
    logits, labels, real = batch_logits(run, index)
    return run.task.loss(logits, labels), real


def optimizer_step(run: TrainSetup) -> None:
    """Average gradients over processes, then apply_step."""
    if run.world > 1:
        all_reduce_grads(run.model, run.world)
    apply_step(run.model, run.optimizer, run.scheduler, run.cfg.max_grad_norm)


def loss_csv(loss_curve: list, extra: Optional[dict] = None) -> str:
    """The loss curve for `dvc plots`: step,loss (and a column per `extra` name: {step: value}, blank elsewhere)."""
    extra = extra or {}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss", *extra])
    for row in loss_curve:
        w.writerow([row["step"], f"{row['loss']:.6f}", *(col.get(row["step"], "") for col in extra.values())])
    return buf.getvalue()


def run_epoch(run: TrainSetup, state: TrainState, best: BestWeights,
              on_step: Optional[Callable[[int, int], None]] = None) -> bool:
    """The optimizer steps left in epoch `state.epoch`; True when it stopped inside the epoch's last step:
    early stopping (patience_spent) or run.max_steps reached. A finished epoch is counted at its last step."""
    cfg = run.cfg
    batches = length_grouped_batches(run.train_ex.lengths, cfg.batch_size, cfg.seed, state.epoch)
    running, micro = 0.0, 0
    for bi in range(state.batch_in_epoch, len(batches)):
        # the global batch is unchanged: each of the N processes takes every N-th example of it
        index = batches[bi][run.rank::run.world] if run.world > 1 else batches[bi]
        loss, real = batch_loss(run, index)
        (loss / cfg.grad_accum).backward()
        running += loss.item()
        micro += 1
        state.samples += len(index) * run.world
        state.real_tokens += real * run.world
        last = bi == len(batches) - 1
        if micro < cfg.grad_accum and not last:
            continue  # accumulating: the step comes after grad_accum batches (or at the epoch's end)
        optimizer_step(run)
        state.step += 1
        state.loss_curve.append({"step": state.step, "epoch": state.epoch, "loss": running / micro,
                                 "lr": run.scheduler.get_last_lr()[0]})
        state.batch_in_epoch = bi + 1
        if last:  # the epoch is done: a checkpoint from here on resumes at the next one
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if run.progress is not None:
            run.progress.update(state.step, loss=running / micro, samples=state.samples)
        running, micro = 0.0, 0
        if on_step is not None:
            on_step(state.step, state.epoch)
        stop = False
        if is_eval_step(cfg, state.step, run.steps_per_epoch):
            stop = validate(run, state, best)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not last:  # last: train() saves
            save(run, state, best)
        if stop or (run.max_steps is not None and state.step >= run.max_steps):
            return True
    return False


def validate(run: TrainSetup, state: TrainState, best: BestWeights) -> bool:
    """Score the validation split, keep the best weights; True when early stopping should end training."""
    t0 = time.perf_counter()
    outputs = validation_outputs(run)
    scores = run.task.validation_scores(outputs, run.val_ex, run.num_labels)
    epochs = round(state.step / run.steps_per_epoch, 3)
    state.val_curve.append({"step": state.step, "epoch": epochs, **scores})
    keep_outputs(run, state, outputs)
    if run.progress is not None:
        run.progress.pause()  # the terminal's progress line is cleared; the next step redraws it
    run.log(f"  step {state.step:5d} epoch {epochs:g}: val " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()
                                                                        if isinstance(v, float)))
    if improves(scores[run.metric], state.best, run.metric):
        state.best, state.best_epoch, state.best_step = scores[run.metric], epochs, state.step
        state.best_val, state.bad_evals = scores, 0
        best.keep(run.model)
    elif not is_near_chance(run, state):  # patience counts a plateau after learning, not the wait before it
        state.bad_evals += 1
    set_train_mode(run.model, run.frozen)
    state.eval_time_s += time.perf_counter() - t0
    return patience_spent(run.cfg, state)


def validation_predictions(run: TrainSetup) -> list[int]:
    """The model's predicted label per validation text (from the cache when there is one)."""
    if run.val_cache is not None:
        logits = predict_cached(run.model, run.val_cache, run.frozen, len(run.val_ex), run.eval_batch_size,
                                run.device, run.autocast_dtype)
    else:
        logits = predict_logits(run.model, run.val_ex, run.eval_batch_size, run.device, run.pad_id,
                                run.autocast_dtype)
    return logits.argmax(-1).tolist()


def validation_nll(run: TrainSetup):
    """causal_lm: (summed nll, predicted tokens) per validation text (through the cache when there is one)."""
    top = None
    if run.val_cache is not None:
        def top(index):
            hidden, mask = run.val_cache.batch(index, run.device)
            return top_forward(run.model, hidden, mask, run.frozen)
    return score_texts(run.model, run.val_ex, batch_size=run.eval_batch_size, device=run.device, pad_id=run.pad_id,
                       autocast_dtype=run.autocast_dtype, top=top)


def validation_outputs(run: TrainSetup):
    """What the task scores on the validation split: the predicted labels (classification) or the per-text nll and
    tokens (a per-position task); its `validation_scores` turn them into {metric: value}."""
    return validation_nll(run) if run.task.per_position else validation_predictions(run)


def keep_outputs(run: TrainSetup, state: TrainState, outputs) -> None:
    """Keep this validation's per-text outputs; drop those the convergence tests can no longer read."""
    state.val_outputs[str(state.step)] = run.task.keepable(outputs)
    keep = {str(state.val_curve[i]["step"])
            for i in convergence.outputs_to_keep(state.val_curve, run.metric, run.cfg.convergence.window)}
    state.val_outputs = {k: v for k, v in state.val_outputs.items() if k in keep}


def save(run: TrainSetup, state: TrainState, best: BestWeights) -> None:
    """Add up the training time, then write a checkpoint (rank 0 only; none without a checkpoint_dir)."""
    state.train_time_s += run.timer.lap()
    if run.checkpoint_dir is not None and run.rank == 0:
        save_checkpoint(run.checkpoint_dir, state.step, model=run.model, optimizer=run.optimizer,
                        scheduler=run.scheduler, meta=state.to_meta(), best_state=best.for_checkpoint(run.model),
                        keep=run.cfg.keep_checkpoints)


# ----------------------------------------------------------------------------- the loop


def train(*, model: nn.Module, spec: VariantSpec, num_layers: int, train_ex: Examples, val_ex: Examples,
          cfg: TrainConfig, metric: str, device: str, pad_id: int, num_labels: int,
          checkpoint_dir: Optional[Path] = None, fingerprint: str = "", extra_meta: Optional[dict] = None,
          on_step: Optional[Callable[[int, int], None]] = None, log: Callable[[str], None] = print,
          eval_batch_size: int = 64, caches: Optional[tuple] = None, task: str = "classification") -> TrainOutcome:
    """Train in place; at the end the model holds the best validation checkpoint's weights.

    `caches`: the frozen prefix's (train, validation) caches from prefix_caches(), when already built.
    """
    seed_everything(cfg.seed)
    run = setup(model=model, spec=spec, num_layers=num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                metric=metric, device=device, pad_id=pad_id, num_labels=num_labels, checkpoint_dir=checkpoint_dir,
                log=log, eval_batch_size=eval_batch_size, caches=caches, task=task)
    state, best, resumed = start_or_resume(run, fingerprint, extra_meta or {})
    return finish(run, state, best, resumed_from=resumed, on_step=on_step)


def budget_epochs(cfg: TrainConfig, state: TrainState) -> int:
    """The epochs the run has now: train.epochs plus its extensions, never past train.convergence.max_epochs."""
    return min(cfg.max_epochs, cfg.epochs + state.extensions * cfg.extension_epochs)


def extend(run: TrainSetup, state: TrainState) -> bool:
    """At the end of the budget: give a run still rising (the plateau test) another extension_epochs, up to
    max_epochs; True when it goes on. The extension's cycle of the lr schedule starts at the next step."""
    cfg = run.cfg
    if budget_epochs(cfg, state) >= cfg.max_epochs:
        return False
    rise = plateau_rise(run, state)
    if rise is not None and not rise.rising:
        return False
    state.extensions += 1
    schedule = run.schedule
    schedule.extensions = state.extensions
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):  # its lr was the budget's end: 0
        group["lr"] = base * schedule(run.scheduler.last_epoch)
    why = ("too few validations to show a plateau" if rise is None else
           f"validation {run.metric} still rising: {rise.before:.4f} -> {rise.within:.4f} over the last "
           f"{rise.window} validations, p={rise.p:.2g}")
    run.log(f"  {why}; extending to {budget_epochs(cfg, state)} epochs (train.convergence.max_epochs "
            f"{cfg.max_epochs})")
    if run.progress is not None:
        run.progress.total = run.steps_per_epoch * budget_epochs(cfg, state)
    return True


def finish(run: TrainSetup, state: TrainState, best: BestWeights, *, resumed_from: Optional[int] = None,
           on_step: Optional[Callable[[int, int], None]] = None) -> TrainOutcome:
    """Train from `state` until its budget is done or early stopping ends it; a run still rising at the end of
    the budget gets extensions (extend); the model gets the best weights.

    train() calls it on a fresh or resumed state; the lr search on its winning candidate's state.
    """
    model, cfg = run.model, run.cfg
    run.max_steps = None
    set_train_mode(model, run.frozen)
    run.schedule.extensions = state.extensions
    run.timer.lap()  # the clock starts here: caching the prefix and resuming are not training time
    if run.rank == 0:  # one progress line, not one per data-parallel process
        run.progress = Progress("train", run.steps_per_epoch * budget_epochs(cfg, state), log=run.log,
                                start=state.step, samples_start=state.samples)
    while True:
        while state.epoch < budget_epochs(cfg, state) and not state.stopped_early:
            run_epoch(run, state, best, on_step)
            state.stopped_early = patience_spent(cfg, state)
            save(run, state, best)
        if state.stopped_early or not extend(run, state):
            break
    if run.progress is not None:
        run.progress.close()
        run.progress = None
    best.restore(model)
    model.eval()
    if not params_in_sync(model):
        raise ModelError("data-parallel ranks ended with different weights (gradient all-reduce failed)")
    return outcome_of(run, state, resumed_from)


def outcome_of(run: TrainSetup, state: TrainState, resumed_from: Optional[int]) -> TrainOutcome:
    """What the run did, with its convergence verdict (evaluation.convergence)."""
    cache, rise = run.train_cache, plateau_rise(run, state)
    return TrainOutcome(steps=state.step, epochs_run=round(state.step / run.steps_per_epoch, 3),
                        best_epoch=state.best_epoch,
                        best_step=state.best_step, best_val=state.best_val, stopped_early=state.stopped_early,
                        train_time_s=state.train_time_s - state.eval_time_s, samples=state.samples,
                        real_tokens=state.real_tokens, loss_curve=state.loss_curve, val_curve=state.val_curve,
                        resumed_from_step=resumed_from, cached_prefix_layers=run.frozen if cache is not None else 0,
                        cache_bytes=cache.nbytes if cache is not None else 0, world_size=run.world,
                        convergence=convergence.convergence(state.stopped_early, rise),
                        rise=rise.to_dict() if rise is not None else None, chance=run.chance,
                        near_chance=is_near_chance(run, state, test=True), extensions=state.extensions,
                        budget_epochs=budget_epochs(run.cfg, state),
                        horizon_steps=run.steps_per_epoch * run.cfg.max_epochs)
