"""Convergence that a curve supports (depthtune/evaluation/convergence.py): the plateau test, the near-chance flag,
the reach rule the verdict and the registry share."""
from __future__ import annotations

import pytest

from depthtune.evaluation.convergence import (Rise, convergence, could_reach, near_chance, outputs_to_keep, rise_of,
                                              window_bests)
from depthtune.evaluation.significance import mcnemar

N = 1000
REFS = [i % 7 for i in range(N)]


def right_on(acc: float) -> list[int]:
    """Predictions right on the first acc * N texts, wrong after: two such are nested, so their discordant texts
    all go one way (the paired test sees every text the better one gained)."""
    k = round(acc * N)
    return [r if i < k else (r + 1) % 7 for i, r in enumerate(REFS)]


def curve_and_outputs(*accs, every: int = 10):
    curve = [{"step": every * (i + 1), "epoch": i + 1, "accuracy": a} for i, a in enumerate(accs)]
    return curve, {str(p["step"]): right_on(p["accuracy"]) for p in curve}


def paired(a, b) -> float:
    return mcnemar(REFS, a, b)


def test_a_curve_still_climbing_is_not_converged_though_its_last_validation_dipped():
    """The issue's full fine-tuning curve (77 intents): best at the second-to-last validation, last one a dip. The
    old rule ("the last validation set a new best") called it converged; the best of the last 4 validations beats
    the best before them by 71 texts in 1,000, all one way: rising."""
    curve, outputs = curve_and_outputs(0.43, 0.51, 0.59, 0.65, 0.72, 0.77, 0.785, 0.791, 0.788)
    rise = rise_of(curve, outputs, "accuracy", 4, 0.05, paired)
    assert (rise.before, rise.within, rise.window) == (0.72, 0.791, 4)
    assert rise.gain == pytest.approx(0.071) and rise.p < 1e-6 and rise.rising
    assert rise.rate_per_step == pytest.approx(0.071 / 30)  # steps 50 -> 80
    assert convergence(False, rise) == "still rising"
    assert convergence(True, rise) == "early stopping"  # patience ran out: that rule wins


def test_a_curve_on_a_noisy_plateau_is_converged_though_its_last_validation_is_a_new_best():
    curve, outputs = curve_and_outputs(0.80, 0.85, 0.86, 0.858, 0.859, 0.857, 0.862)
    rise = rise_of(curve, outputs, "accuracy", 4, 0.05, paired)
    assert (rise.before, rise.within) == (0.86, 0.862)
    assert rise.gain == pytest.approx(0.002) and rise.p == pytest.approx(0.5) and not rise.rising
    assert convergence(False, rise) == "plateau"


def test_a_falling_window_is_a_plateau_without_a_test_and_a_short_curve_uses_what_it_has():
    curve, outputs = curve_and_outputs(0.6, 0.9, 0.7, 0.7, 0.6, 0.65)
    rise = rise_of(curve, outputs, "accuracy", 4, 0.05, lambda a, b: pytest.fail("no test for a loss"))
    assert rise.gain < 0 and rise.p == 1.0 and not rise.rising and rise.rate_per_step == 0.0
    # two validations: the second against the first; one: nothing to compare, so nothing shows a plateau
    curve, outputs = curve_and_outputs(0.5, 0.7)
    rise = rise_of(curve, outputs, "accuracy", 4, 0.05, paired)
    assert rise.window == 1 and rise.rising
    assert rise_of(curve[:1], outputs, "accuracy", 4, 0.05, paired) is None
    assert convergence(False, None) == "still rising"


def test_lower_is_better_metrics_gain_when_they_fall():
    curve = [{"step": s, "perplexity": v} for s, v in ((10, 40.0), (20, 30.0), (30, 20.0), (40, 19.0))]
    assert window_bests(curve, "perplexity", 2) == (1, 3)
    rise = rise_of(curve, {str(s): s for s in (10, 20, 30, 40)}, "perplexity", 2, 0.05, lambda a, b: 0.01)
    assert rise.gain == pytest.approx(11.0) and rise.rising


def test_only_the_outputs_the_tests_can_read_are_kept():
    curve, _ = curve_and_outputs(0.5, 0.9, 0.6, 0.7, 0.65, 0.66, 0.64)
    # last 3 (4, 5, 6), the best before them (1, also the best overall)
    assert outputs_to_keep(curve, "accuracy", 3) == {1, 4, 5, 6}
    assert outputs_to_keep(curve[:2], "accuracy", 3) == {0, 1}


def test_near_chance_is_a_tenth_of_the_way_or_no_significant_gain():
    # 150 intents: the majority label is right on 0.7% of the texts; 2% is 1.3% of the way to perfect
    assert near_chance(0.02, 0.007, 0.01, "accuracy", 0.05)
    assert not near_chance(0.40, 0.007, 1e-9, "accuracy", 0.05)
    # two classes, majority 50%: 0.56 covers 12% of the way, but if the test cannot tell it from chance, flagged
    assert not near_chance(0.56, 0.5, 0.01, "accuracy", 0.05)
    assert near_chance(0.56, 0.5, 0.2, "accuracy", 0.05)
    assert not near_chance(5.0, None, 1.0, "accuracy", 0.05)  # no chance level (a language model)
    assert not near_chance(30.0, 100.0, 1.0, "perplexity", 0.05)  # unbounded, lower is better: not defined


def test_a_rival_could_reach_the_best_by_its_interval_or_its_trend():
    # interval: 0.84 [0.81, 0.87] reaches 0.86
    assert "interval" in could_reach(0.84, [0.81, 0.87], 0.0, 1000, 0.86, "accuracy")
    # trend: 0.758 rising 0.071 over 30 steps... at 2.4e-4 a step, 1,000 more steps reach 0.886 easily
    why = could_reach(0.758, [0.73, 0.784], 0.071 / 300, 2000, 0.886, "accuracy")
    assert "would reach" in why and "0.7580" not in why
    # a slow trend and a narrow interval: out of reach
    assert could_reach(0.758, [0.73, 0.784], 1e-6, 2000, 0.886, "accuracy") is None
    # lower is better: the interval's low end must reach down to the best
    assert could_reach(25.0, [21.0, 29.0], 0.0, 100, 22.0, "perplexity")
    assert could_reach(25.0, [24.0, 26.0], 0.0, 100, 22.0, "perplexity") is None


def test_rise_round_trips_as_a_record_dict():
    r = Rise(window=4, before_step=10, before=0.5, within_step=40, within=0.6, gain=0.1, p=0.01, alpha=0.05,
             rate_per_step=0.1 / 30)
    assert r.to_dict()["rising"] is True and r.to_dict()["window"] == 4
