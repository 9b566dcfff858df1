"""Does a validation curve support "converged"? And may a comparison crown its best?

A fine-tuning run ends one of three ways (TrainRecord.convergence):
  early stopping  train.patience validations in a row without a new best: it levelled off (converged)
  plateau         its budget ended it (train.epochs, extended while still rising up to train.convergence.max_epochs)
                  and the best of its last `window` validations is NOT significantly better than its best before
                  them (the metric's own paired test on the validation texts, p >= alpha): more of the same
                  training did not measurably help (converged)
  still rising    its budget ended it while that best WAS significantly better: not converged
The old rule ("not converged = the last validation set a new best") read one point: a curve still climbing whose
last validation dipped was called converged, one cut on a plateau's noisy top was not. This one compares two bests
on the same texts with a test, so a climb of a few texts in a thousand is noise, a climb of twenty is not.

Beside it, a flag: `near chance`. A run whose best validation score got less than a tenth of the way from the
majority-label predictor's score to a perfect one, or is not significantly better than that predictor, learned
nothing a user can read as the method's result (its lr or its budget failed it). Early stopping does not count
validations while a run is near chance: patience measures a plateau after learning, not before it starts.

The comparison's rule (`could_reach`): a variant that is not converged, or near chance, blocks the verdict from
calling the best significant when it could close the gap: its test interval reaches the best's score, or its curve,
continued at its last window's rate for another train.convergence.max_epochs, would. A straight line overstates a
decelerating curve: on purpose, the verdict errs toward "not settled".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from depthtune.evaluation import metrics

# a run "near chance" covered less than this share of the way from the majority predictor's score to a perfect one
NEAR_CHANCE_SHARE = 0.1


def best_index(curve: Sequence[dict], metric: str, indices: Sequence[int]) -> int:
    """The index (of `indices`) of the best validation score; ties: the earliest."""
    m = metrics.get(metric)
    best = indices[0]
    for i in indices[1:]:
        if m.better(curve[i][metric], curve[best][metric]):
            best = i
    return best


def window_of(n: int, window: int) -> int:
    """The window a curve of `n` validations is tested over: `window`, or all but the first when it is shorter."""
    return min(window, n - 1)


def window_bests(curve: Sequence[dict], metric: str, window: int) -> Optional[tuple[int, int]]:
    """(index of the best validation before the last `window` (fewer on a shorter curve: window_of), index of the
    best within them); None with a single validation (nothing to compare: too short to show a plateau)."""
    if len(curve) < 2:
        return None
    cut = len(curve) - window_of(len(curve), window)
    return best_index(curve, metric, range(cut)), best_index(curve, metric, range(cut, len(curve)))


def outputs_to_keep(curve: Sequence[dict], metric: str, window: int) -> set[int]:
    """The validations whose per-text outputs the tests below may still read: the last `window`, the best before
    them (the plateau test) and the best overall (the chance test). The rest are dropped as training goes on."""
    n = len(curve)
    keep = set(range(max(0, n - window), n))
    if n:
        keep.add(best_index(curve, metric, range(n)))
        # the best before the window; on a curve shorter than window + 1, its first validation (window_of)
        keep.add(best_index(curve, metric, range(n - window)) if n > window else 0)
    return keep


@dataclass(frozen=True)
class Rise:
    """What the last `window` validations gained over the best before them, and whether that is more than noise."""
    window: int
    before_step: int
    before: float
    within_step: int
    within: float
    gain: float  # in the metric's units, positive = better (lower perplexity counts as a gain)
    p: float  # the metric's paired test of the two bests on the validation texts (1.0 when gain <= 0)
    alpha: float
    rate_per_step: float  # gain / optimizer steps between the two bests (0 when gain <= 0)

    @property
    def rising(self) -> bool:
        return self.gain > 0 and self.p < self.alpha

    def to_dict(self) -> dict:
        return {**asdict(self), "rising": self.rising}


PairedP = Callable[[object, object], float]  # (outputs of A, outputs of B) -> p-value of the metric's paired test


def rise_of(curve: Sequence[dict], outputs: dict, metric: str, window: int, alpha: float,
            paired_p: PairedP) -> Optional[Rise]:
    """The plateau test over the validation curve; `outputs`: {str(step): that validation's per-text outputs} (at
    least those of outputs_to_keep). None when the curve is too short to tell."""
    bests = window_bests(curve, metric, window)
    if bests is None:
        return None
    a, b = curve[bests[0]], curve[bests[1]]
    m = metrics.get(metric)
    gain = m.sign * (b[metric] - a[metric])
    p = paired_p(outputs[str(b["step"])], outputs[str(a["step"])]) if gain > 0 else 1.0
    steps = max(1, b["step"] - a["step"])
    return Rise(window=window_of(len(curve), window), before_step=a["step"], before=a[metric], within_step=b["step"], within=b[metric],
                gain=round(gain, 12), p=p, alpha=alpha, rate_per_step=gain / steps if gain > 0 else 0.0)


def near_chance(best: float, chance: Optional[float], p_vs_chance: float, metric: str, alpha: float) -> bool:
    """Whether a best validation score is near chance (see the module doc); False when the task has no chance level
    (language models) or the metric is unbounded."""
    m = metrics.get(metric)
    if chance is None or not m.bounded or not m.higher_is_better:
        return False
    covered = (best - chance) / max(1e-12, 1.0 - chance)
    return covered < NEAR_CHANCE_SHARE or p_vs_chance >= alpha


def convergence(stopped_early: bool, rise: Optional[Rise]) -> str:
    """early stopping | plateau | still rising (see the module doc); a curve too short to tell is still rising."""
    if stopped_early:
        return "early stopping"
    return "plateau" if rise is not None and not rise.rising else "still rising"


def could_reach(score: float, ci: Optional[Sequence[float]], rate_per_step: float, horizon_steps: int,
                best: float, metric: str) -> Optional[str]:
    """Why a not-converged variant could close the gap to `best` (its test score), or None when neither its interval
    nor its trend reaches it: the interval's far end reaches the best's score, or score + rate x horizon does."""
    sign = metrics.get(metric).sign
    if ci is not None and sign * (max(ci) if sign > 0 else min(ci)) >= sign * best:
        return f"its 95% interval {ci[0]:.4f}-{ci[1]:.4f} reaches {best:.4f}"
    if rate_per_step > 0:
        needed = abs(best - score) / rate_per_step  # steps at its last window's rate to draw level
        if needed <= horizon_steps:
            return (f"its validation curve, still rising at {rate_per_step * 1000:.3g} per 1,000 steps, would reach "
                    f"{best:.4f} in about {needed:,.0f} more steps (the horizon: {horizon_steps:,})")
    return None


def rival_reach(score: float, ci: Optional[Sequence[float]], rise: Optional[dict], horizon_steps: int, best: float,
                metric: str) -> Optional[str]:
    """could_reach for a not-converged variant's record (`rise`: TrainRecord.rise; None: too short to show a trend,
    which cannot rule it out)."""
    if rise is None:
        return "its curve has too few validations to show where it goes"
    return could_reach(score, ci, rise.get("rate_per_step") or 0.0, horizon_steps, best, metric)
