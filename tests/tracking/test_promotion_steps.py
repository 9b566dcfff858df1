"""depthtune.tracking.registry's promotion steps one at a time, without an MLflow store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthtune.config import RegistryConfig
from depthtune.errors import DataError, DepthtuneError
from depthtune.records import EvalRecord
from depthtune.tracking.registry import decide, paired_p_value, rank_variants, read_test_data, score
from depthtune.evaluation.significance import bootstrap_ci
from tests.tracking.test_tracking import eval_result, train_result

REG = RegistryConfig(model_name="m", metric="accuracy", min_delta=0.01, min_metric=0.5)


def eval_record(variant: str, accuracy: float = 0.7, labels=("rotten", "fresh")) -> dict:
    """test_tracking's eval_result as a current (depthtune.eval/2) record: predictions with that accuracy."""
    ev = eval_result(variant, accuracy, labels)
    n = ev["n"]
    refs = [i % len(labels) for i in range(n)]
    preds = [r if i < round(accuracy * n) else (r + 1) % len(labels) for i, r in enumerate(refs)]
    return {**ev, "schema": EvalRecord.SCHEMA, "predictions": preds, "references": refs,
            "accuracy_ci": list(bootstrap_ci(refs, preds, "accuracy")),
            "macro_f1_ci": list(bootstrap_ci(refs, preds, "macro_f1", num_labels=len(labels)))}


# ----------------------------------------------------------------------------- decide (pure)


def test_first_model_becomes_champion():
    decision, reason = decide(REG, "1", 0.6, None, None)
    assert decision == "promoted" and reason.startswith("first champion: accuracy 0.6000")


def test_the_champion_itself_is_unchanged():
    assert decide(REG, "3", 0.8, "3", 0.8)[0] == "unchanged"


@pytest.mark.parametrize("candidate, champion, p, expected, why", [
    (0.80, 0.70, 0.001, "promoted", "significantly better at alpha 0.05, +0.1000 >= min_delta 0.01"),
    (0.71, 0.70, 0.01, "promoted", "+0.0100 >= min_delta 0.01"),  # exactly min_delta is enough
    (0.80, 0.70, 0.30, "challenger", "McNemar p=0.300: not significantly better (p >= alpha 0.05)"),
    (0.705, 0.70, 0.001, "challenger", "+0.0050 < min_delta 0.01"),  # significant but under the floor
    (0.705, 0.70, 0.50, "challenger", "not significantly better (p >= alpha 0.05); +0.0050 < min_delta 0.01"),
    (0.60, 0.70, 1e-4, "challenger", "-0.1000, McNemar p<0.001: not better"),  # significantly WORSE
])
def test_candidate_must_be_significantly_better_and_by_min_delta(candidate, champion, p, expected, why):
    decision, reason = decide(REG, "2", candidate, "1", champion, p)
    assert decision == expected, reason
    assert "vs champion v1" in reason and why in reason


def test_a_tie_never_replaces_the_champion():
    reg = RegistryConfig(model_name="m", min_delta=0.0)
    decision, reason = decide(reg, "2", 0.7, "1", 0.7, 1.0)
    assert decision == "challenger" and reason.endswith("+0.0000, McNemar p=1.000: not better")
    with pytest.raises(ValueError, match="p_value"):
        decide(reg, "2", 0.8, "1", 0.7)


def test_rescoring_pairs_both_models_on_the_same_texts():
    from depthtune.tracking.registry import LabelledTexts

    names = ["neg", "pos"]
    gold = ["pos"] * 30 + ["neg"] * 30
    champ = ["pos"] * 60                         # right on the 30 pos texts
    cand = ["pos"] * 30 + ["neg"] * 12 + ["pos"] * 18  # also right on 12 neg texts: b=12, c=0
    data = LabelledTexts(texts=[""] * 60, gold=gold, names=names)
    assert score(cand, gold, names)["accuracy"] == pytest.approx(42 / 60)
    assert paired_p_value("accuracy", data, cand, champ) == pytest.approx(2 / 2 ** 12)
    assert paired_p_value("accuracy", data, cand, cand) == 1.0
    assert paired_p_value("macro_f1", data, cand, champ) < 0.05
    assert decide(REG, "2", 42 / 60, "1", 0.5, paired_p_value("accuracy", data, cand, champ))[0] == "promoted"
    few = ["pos"] * 30 + ["neg"] * 3 + ["pos"] * 27  # +0.05 on 3 texts: McNemar p = 0.25
    assert decide(REG, "2", 33 / 60, "1", 0.5, paired_p_value("accuracy", data, few, champ))[0] == "challenger"


# ----------------------------------------------------------------------------- rank (records on disk)


def write_variant(root: Path, variant: str, accuracy: float, trainable: int | None, p95: float = 2.0) -> None:
    ev = eval_record(variant, accuracy)
    ev["latency_ms"] = {"p50": 1.0, "p95": p95}
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / f"{variant}.json").write_text(json.dumps(ev))
    if trainable is not None:
        (root / "train").mkdir(exist_ok=True)
        train = train_result(variant, {"total_params": 10_000, "trainable_params": trainable})
        (root / "train" / f"{variant}.json").write_text(json.dumps(train))


def test_rank_best_first_ties_to_the_cheaper_and_constraints(tmp_path):
    write_variant(tmp_path, "full", 0.8, 10_000)
    write_variant(tmp_path, "top2", 0.8, 2_000)      # same metric, fewer trainable params: first
    write_variant(tmp_path, "head", 0.4, 100)        # below min_metric
    write_variant(tmp_path, "slow", 0.9, 5_000, p95=50.0)
    write_variant(tmp_path, "orphan", 0.95, None)    # no train record
    reg = RegistryConfig(model_name="m", min_metric=0.5, max_latency_ms=10.0)
    ranked = rank_variants(reg, tmp_path / "eval", tmp_path / "train", tmp_path / "audit")
    assert [c.variant for c in ranked] == ["orphan", "slow", "top2", "full", "head"]
    assert [c.variant for c in ranked if c.eligible] == ["top2", "full"]
    by_name = {c.variant: c for c in ranked}
    assert by_name["head"].reasons == ["accuracy 0.4000 < min_metric 0.5"]
    assert by_name["slow"].reasons == ["p95 latency 50.0 ms > max_latency_ms 10.0"]
    assert by_name["orphan"].reasons[-1].endswith("train/orphan.json not found")
    assert by_name["top2"].summary() == {"variant": "top2", "metric": 0.8, "trainable_params": 2_000,
                                         "latency_p95_ms": 2.0, "eligible": True, "reasons": []}


def test_rank_refuses_a_record_of_another_variant(tmp_path):
    write_variant(tmp_path, "full", 0.8, 10_000)
    (tmp_path / "eval" / "copy.json").write_text((tmp_path / "eval" / "full.json").read_text())
    with pytest.raises(DepthtuneError, match="copy.json: belongs to variant 'full'"):
        rank_variants(REG, tmp_path / "eval", tmp_path / "train", tmp_path / "audit")


# ----------------------------------------------------------------------------- the current test data


def test_read_test_data_names_labels_and_refuses_bad_rows(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["rotten", "fresh"]}))
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    data = read_test_data(test, tmp_path / "labels.json")
    assert data.texts == ["good", "bad"] and data.gold == ["fresh", "rotten"] and data.names == ["rotten", "fresh"]
    test.write_text('{"text": "good", "label": 1}\n{"text": "odd"}\n')  # used to be a KeyError traceback
    with pytest.raises(DataError, match=r"test.jsonl:2: label None is not a label id"):
        read_test_data(test, tmp_path / "labels.json")
    test.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_test_data(test, tmp_path / "labels.json")
