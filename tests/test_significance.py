"""depthtune/evaluation/significance.py against hand-computed values and the evaluation stage's metrics."""
from __future__ import annotations

import time

import numpy as np
import pytest

from depthtune.evaluation.metrics import accuracy, macro_f1
from depthtune.evaluation.significance import (bootstrap_ci, compare_to_best, mcnemar, paired_bootstrap,
                                               paired_test)


def pair(b: int, c: int, both_right: int = 0, both_wrong: int = 0):
    """Binary references and two predictions with b texts only A gets right, c only B gets right."""
    refs = [1] * (b + c + both_right + both_wrong)
    a = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    bb = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return refs, a, bb


def noisy(refs: np.ndarray, acc: float, seed: int, k: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random(len(refs)) < acc
    return np.where(keep, refs, (refs + rng.integers(1, k, len(refs))) % k)


# ----------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_on_hand_computed_tables():
    # b=8, c=2: p = 2 * P(Bin(10, 1/2) <= 2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar(*pair(8, 2, both_right=50, both_wrong=7)) == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar(*pair(5, 0)) == pytest.approx(2 / 32, rel=1e-12)       # 5 discordant, all one way
    assert mcnemar(*pair(0, 10)) == pytest.approx(2 / 1024, rel=1e-12)     # symmetric in A and B
    assert mcnemar(*pair(3, 3, both_right=100)) == 1.0                     # b = c
    assert mcnemar(*pair(0, 0, both_right=10, both_wrong=3)) == 1.0         # no discordant text


def test_mcnemar_matches_scipy_binomtest_at_large_counts():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    p = mcnemar(*pair(600, 480, both_right=5000))
    assert p == pytest.approx(binomtest(480, 1080, 0.5).pvalue, rel=1e-9)
    assert 1e-5 < p < 1e-2


# ----------------------------------------------------------------------------- metrics


def test_macro_f1_matches_the_evaluation_stage():
    from sklearn.metrics import f1_score

    from depthtune.evaluation.metric_modules import ClassificationReport

    refs = np.arange(300) % 4  # classes 0..3 present; the label set has 6 (4 and 5 absent everywhere)
    preds = noisy(refs, 0.7, seed=1, k=4)
    stage = ClassificationReport().compute(predictions=preds.tolist(), references=refs.tolist(), num_labels=6)
    assert macro_f1(refs, preds, num_labels=6) == pytest.approx(stage["macro_f1"], abs=1e-12)
    assert accuracy(refs, preds) == pytest.approx(stage["accuracy"], abs=1e-12)
    # without num_labels: the classes present in references or predictions (sklearn's default)
    assert macro_f1(refs, preds) == pytest.approx(f1_score(refs, preds, average="macro"), abs=1e-12)
    assert macro_f1(refs, preds) > macro_f1(refs, preds, num_labels=6)  # absent classes count as 0


def test_lengths_must_match():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="not one of"):
        bootstrap_ci([0, 1], [0, 1], "f2")


# ----------------------------------------------------------------------------- bootstrap interval


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_narrows_with_more_texts():
    refs = np.arange(500) % 3
    preds = noisy(refs, 0.8, seed=2, k=3)
    for metric, fn in (("accuracy", accuracy), ("macro_f1", macro_f1)):
        lo, hi = bootstrap_ci(refs, preds, metric)
        assert lo < fn(refs, preds) < hi, metric
        assert bootstrap_ci(refs, preds, metric) == (lo, hi)  # same predictions, same seed: same interval
        assert bootstrap_ci(refs, preds, metric, seed=1) != (lo, hi)
        lo4, hi4 = bootstrap_ci(np.tile(refs, 4), np.tile(preds, 4), metric)  # same rate, 4x the texts
        assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.25)  # width ~ 1/sqrt(n)
        lo50, hi50 = bootstrap_ci(refs, preds, metric, level=0.5)
        assert lo < lo50 < hi50 < hi
    # accuracy 0.8 on 500 texts: the normal approximation's 95% half-width is 1.96 * sqrt(.8 * .2 / 500) = 0.035
    lo, hi = bootstrap_ci(refs, preds, "accuracy")
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.8 * 0.2 / 500), rel=0.2)


# ----------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_identical_gap_and_speed():
    refs = np.arange(1000) % 5
    a = noisy(refs, 0.85, seed=3)
    assert paired_bootstrap(refs, a, a.copy(), "macro_f1") == 1.0
    worse = a.copy()
    worse[:120] = (refs[:120] + 1) % 5  # 120 texts A gets right or wrong, B surely wrong
    assert paired_bootstrap(refs, a, worse, "macro_f1") < 0.01
    slightly = a.copy()
    slightly[:3] = (refs[:3] + 1) % 5  # at most 3 texts apart: noise
    assert paired_bootstrap(refs, a, slightly, "macro_f1") > 0.05
    t = time.perf_counter()
    p = paired_bootstrap(refs, a, noisy(refs, 0.84, seed=4), "macro_f1", n=1000)
    assert time.perf_counter() - t < 1.0  # 1,000 resamples x 1,000 texts, vectorised
    assert p == paired_bootstrap(refs, a, noisy(refs, 0.84, seed=4), "macro_f1")  # seeded


def test_paired_test_and_compare_to_best():
    refs, a, b = pair(8, 2, both_right=50)
    assert paired_test(refs, a, b, "accuracy") == mcnemar(refs, a, b)
    assert paired_test(refs, a, b, "macro_f1") == paired_bootstrap(refs, a, b, "macro_f1")
    p = compare_to_best(refs, {"x": b, "best": a, "same": list(a)}, "accuracy", "best")
    assert list(p) == ["x", "best", "same"]
    assert p["best"] is None and p["same"] == 1.0 and p["x"] == pytest.approx(112 / 1024)
    with pytest.raises(ValueError, match="no predictions"):
        compare_to_best(refs, {"x": b}, "accuracy", "best")
