"""train.lr_search: each variant's learning rate chosen on the validation split by successive halving.

The candidates are the variant's lr (train.lr, or its kind's default) times each factor of
`train.lr_search.factors` (default 0.25, 0.5, 1, 2, 4). Every candidate is the real training run at
its lr (same initial weights, seed, batches, warmup and decay over train.epochs), trained up to
an evaluation point; then the best third (rounded up) goes on, and the others stop:

    rung 0: all 5 candidates train to evaluation `first_rung`       (default 1 = half an epoch)
    rung 1: the best 2 and the configured lr go on to evaluation 3 x first_rung   (1.5 epochs)
    rung 2: ... until one is left; it goes on training to the end (early stopping as usual).

The configured lr (the variant kind's default, or the user's) is the prior: it is never cut before
the last rung, and the best candidate replaces it only when significantly better on the validation
texts (paired test, p < train.lr_search.alpha; a tie keeps it).

Why this and not short separate runs: a run of 60 steps with its own decayed schedule, measured on
the default data, favoured large rates that then lost in the real run (full 0.795 vs 0.812,
lora8 0.786 vs 0.804): the short horizon biases the choice. Here a candidate is judged on the real
run's own trajectory, over a horizon that triples at each rung, and the winner is not trained
again: its run continues. The cost is only what the losers trained: with 5 candidates and
evaluations every 63 steps (2,000 texts, batch 16, 2 an epoch), 2 x 63 + 2 x 188 = 502 steps,
~4 epochs. A candidate is ranked by its best validation score so far; a tie goes to the
configured lr, else to the smaller. For train_top variants the frozen prefix is cached once and
every candidate reuses it (it does not depend on the lr).

Memory: while the candidates are alive each holds its trainable weights, AdamW's two moments and
its best weights (4 x trainable params x 4 B; MiniLM full fine-tuning: 5 x 363 MB in rung 0;
measured peak RSS growth 2.5 GiB against 1.0 GiB for the same variant without the search).

Only the validation split is ever scored: search_and_train takes no test data.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from depthtune.data.batching import Examples
from depthtune.training.checkpoints import load_trainable_state, rng_state, set_rng_state, trainable_state
from depthtune.config import TrainConfig, VariantSpec
from depthtune.training.prefix_cache import set_train_mode
from depthtune.runtime import seed_everything
from depthtune.evaluation.significance import paired_test
from depthtune.training.loop import (BestWeights, TrainOutcome, TrainSetup, TrainState, finish, is_eval_step,
                                patience_spent, run_epoch, setup, steps_per_epoch, validation_predictions)

KEEP = 3  # each rung keeps the best 1/KEEP of the candidates (rounded up) and triples the horizon


def candidate_lrs(lr: float, factors) -> list[float]:
    """lr x each factor, smallest first (10 significant digits: 8e-5 x 0.25 prints as 2e-05)."""
    return sorted(float(f"{lr * f:.10g}") for f in factors)


def rung_steps(cfg: TrainConfig, num_examples: int) -> list[int]:
    """The optimizer step at which each rung ends: evaluation first_rung x 3^i, while the run lasts."""
    per_epoch = steps_per_epoch(num_examples, cfg)
    evals = [s for s in range(1, per_epoch * cfg.epochs + 1) if is_eval_step(cfg, s, per_epoch)]
    ends, k = [], cfg.lr_search.first_rung
    while k <= len(evals):
        ends.append(evals[k - 1])
        k *= KEEP
    return ends or [per_epoch * cfg.epochs]


@dataclass
class Candidate:
    """One lr's training run, parked (weights and RNG streams copied out) while another one trains."""
    lr: float
    run: TrainSetup
    state: TrainState
    best: BestWeights
    weights: dict
    rng: dict
    seconds: float = 0.0
    rung: int = 0

    def score(self) -> float:
        return self.state.best


def advance(c: Candidate, target: int) -> None:
    """Train candidate `c` on to optimizer step `target` (or its end: epochs done, patience spent)."""
    t0 = time.perf_counter()
    c.run.timer.lap()  # the run's clock restarts: the time other candidates trained is not this one's
    model = c.run.model
    load_trainable_state(model, c.weights)
    set_rng_state(c.rng)
    set_train_mode(model, c.run.frozen)
    c.run.max_steps = target
    while c.state.step < target and c.state.epoch < c.run.cfg.epochs and not c.state.stopped_early:
        run_epoch(c.run, c.state, c.best)
        c.state.stopped_early = patience_spent(c.run.cfg, c.state)
    c.state.train_time_s += c.run.timer.lap()  # the winner's record counts its rungs as training time
    c.weights, c.rng = trainable_state(model), rng_state()
    c.seconds += time.perf_counter() - t0


def ranked(cands: list[Candidate], configured: float) -> list[Candidate]:
    """Best validation score first; among equals the configured lr, then the smaller lr."""
    return sorted(cands, key=lambda c: (-c.score(), c.lr != configured, c.lr))


def survivors(ranked_alive: list[Candidate], configured: float, last_rung: bool) -> list[Candidate]:
    """The best 1/KEEP go on; so does the configured lr (the prior) until the last rung decides.

    Why the configured lr is kept: an early rung judges candidates still in warmup, where a larger lr
    is always ahead. Measured on the default data: full fine-tuning's 8e-5 sat at the majority class
    (0.579) after half an epoch while 1.6e-4 had 0.768; cut there, the search chose 1.6e-4, which
    peaked at that half epoch (0.768 validation) while 8e-5 reaches 0.788 after 2 epochs.
    """
    keep = ranked_alive[:math.ceil(len(ranked_alive) / KEEP)]
    prior = [c for c in ranked_alive if c.lr == configured and c not in keep]
    return keep + (prior if not last_rung else [])


def gate_against_prior(winner: Candidate, everyone: list[Candidate], configured: float, metric: str,
                       alpha: float) -> tuple[Candidate, Optional[float]]:
    """(the run that trains on, the p-value of the winner against the configured lr or None).

    The validation split decided the ranking; a small lead on it is noise as often as not (measured:
    on TREC and SST-2, 3 of 15 searches moved off the default by < 0.5 validation points, and the
    test scores moved -0.4, +1.4 and -2.4 points). So the configured lr stays unless the winner's best
    weights beat the configured run's best weights on the same validation texts by a paired test.
    """
    prior = next((c for c in everyone if c.lr == configured), None)
    if prior is None or prior is winner or alpha >= 1.0:
        return winner, None
    model, preds = winner.run.model, {}
    for c in (winner, prior):
        load_trainable_state(model, c.best.tensors)
        preds[c.lr] = validation_predictions(c.run)
    refs = winner.run.val_ex.labels
    p = paired_test(refs, preds[winner.lr], preds[configured], metric, num_labels=winner.run.num_labels)
    return (winner if p < alpha else prior), p


def start_candidates(model: nn.Module, lrs: list[float], cfg: TrainConfig, make_setup: Callable) -> list[Candidate]:
    """One parked run per lr, all from the model's current weights and the same seed."""
    initial, cands = trainable_state(model), []
    for lr in lrs:
        load_trainable_state(model, initial)
        seed_everything(cfg.seed)  # as train() does: every candidate sees the same batches and dropout
        run = make_setup(dataclasses.replace(cfg, lr=lr))
        cands.append(Candidate(lr=lr, run=run, state=TrainState(), best=BestWeights(None),
                               weights=initial, rng=rng_state()))
    return cands


def halve(everyone: list, ends: list[int], prior: float, metric: str, log: Callable[[str], None]) -> tuple[list, int]:
    """Successive halving: every live candidate trains to each rung's end step, the best third (and the configured
    lr) go on; (the candidates alive at the end, the last rung run)."""
    alive = list(everyone)
    for rung, target in enumerate(ends):
        for c in alive:
            advance(c, target)
            c.rung = rung
        alive = ranked(alive, prior)
        log(f"lr search, rung {rung} (to step {target}): "
            + ", ".join(f"lr {c.lr:.3g} val {metric} {c.score():.4f}" for c in alive))
        alive = survivors(alive, prior, last_rung=rung == len(ends) - 1)
        if len(alive) == 1:
            break
    return alive, rung


def free_losers(everyone: list, winner) -> None:
    """Free the losers' optimizer states and weight copies before the winner goes on."""
    for c in everyone:
        if c is not winner:
            c.run.optimizer.state.clear()
            c.weights = c.best.tensors = None


def search_and_train(model: nn.Module, *, spec: VariantSpec, num_layers: int, train_ex: Examples,
                     val_ex: Examples, cfg: TrainConfig, metric: str, device: str, pad_id: int, num_labels: int,
                     caches: tuple, fingerprint_for: Callable[[TrainConfig], str], extra_meta: dict,
                     checkpoint_dir=None, log: Callable[[str], None] = print,
                     eval_batch_size: int = 64, on_step=None) -> tuple[TrainOutcome, TrainConfig, dict]:
    """Successive halving over the candidate lrs, then the winner trains on to the end.

    Returns (the winner's outcome, the train config with the chosen lr, the search's result:
    {metric, candidates: [{lr, val_<metric>, steps, rung, seconds}] smallest lr first, chosen_lr,
    best_on_validation (the lr that led the last rung), p_vs_configured (its paired test against the
    configured lr; None when they are the same), at_edge, rungs (their end steps), seconds,
    extra_steps}). The winner's checkpoints (in
    checkpoint_dir) carry the result in their meta, so a resumed stage skips the search.
    """
    t0 = time.perf_counter()
    quiet = lambda _: None  # noqa: E731 -- the candidates' per-evaluation lines would drown the search's

    def make_setup(c: TrainConfig) -> TrainSetup:
        return setup(model=model, spec=spec, num_layers=num_layers, train_ex=train_ex, val_ex=val_ex, cfg=c,
                     metric=metric, device=device, pad_id=pad_id, num_labels=num_labels, checkpoint_dir=None,
                     log=quiet, eval_batch_size=eval_batch_size, caches=caches)

    lrs = candidate_lrs(cfg.lr, cfg.lr_search.factors)
    everyone = start_candidates(model, lrs, cfg, make_setup)
    key, ends = f"val_{metric}", rung_steps(cfg, len(train_ex))
    alive, rung = halve(everyone, ends, cfg.lr, metric, log)
    best = ranked(alive, cfg.lr)[0]
    winner, p = gate_against_prior(best, everyone, cfg.lr, metric, cfg.lr_search.alpha)
    chosen = dataclasses.replace(cfg, lr=winner.lr)
    result = {"metric": metric, "chosen_lr": winner.lr, "rungs": ends[:rung + 1],
              "best_on_validation": best.lr, "p_vs_configured": p,
              "at_edge": len(lrs) > 1 and winner.lr in (lrs[0], lrs[-1]),
              "candidates": [{"lr": c.lr, key: c.score(), "steps": c.state.step, "rung": c.rung,
                              "seconds": round(c.seconds, 3)} for c in sorted(everyone, key=lambda c: c.lr)],
              "extra_steps": sum(c.state.step for c in everyone if c is not winner),
              "seconds": round(time.perf_counter() - t0, 3)}
    gate = "" if p is None else (f"; lr {best.lr:.3g} led but not significantly (p={p:.2g} >= "
                                 f"{cfg.lr_search.alpha:g}): the configured lr stays" if winner is not best
                                 else f"; significantly better than the configured lr (p={p:.2g})")
    log(f"lr search: chose lr {winner.lr:.3g} of {len(lrs)} (configured {cfg.lr:.3g}) on validation {metric} "
        f"in {result['seconds']:.1f} s; the others trained {result['extra_steps']} steps{gate}"
        + ("; it is at the edge of the grid: consider wider train.lr_search.factors" if result["at_edge"] else ""))
    free_losers(everyone, winner)
    load_trainable_state(model, winner.weights)
    set_rng_state(winner.rng)
    run, state = winner.run, winner.state
    run.checkpoint_dir, run.log = checkpoint_dir, log
    state.fingerprint = fingerprint_for(chosen)
    state.extra = {**extra_meta, "lr_search": result}
    return finish(run, state, winner.best, on_step=on_step), chosen, result
