"""The comparison report (depthtune/report/comparison.py, stages/compare.py) on synthetic result files."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from depthtune.errors import DepthtuneError
from depthtune.model.layer_order import layer_order_key
from depthtune.records import AuditRecord, EvalRecord, TrainRecord
from depthtune.report.comparison import (FRONT_PARAMS, FRONT_TIME, best_and_cheapest, build_report, load_results, pareto_front,
                              pick_best)
from depthtune.report.text import comparison_json, render_outputs
from depthtune.evaluation.metrics import macro_f1
from depthtune.evaluation.significance import bootstrap_ci

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EMB, LAYER, POOLER, HEAD = 11_918_592, 1_774_464, 147_840, 770

# name -> (depth, per-layer trainable rule, accuracy, train_time_s), in params order.
# Hand-made so that the fronts are known:
#   params front (acc up, params down): lora8 (74k, .85) < top2 (3.7M, .855) < full (22.7M, .86);
#     probe (149k, .70) is dominated by lora8, depth3 (17.4M, .84) by top2.
#   time front (acc up, time down): probe (10 s) < top2 (40 s) < full (100 s);
#     depth3 (60 s, .84) and lora8 (80 s, .85) are dominated by top2 (40 s, .855).
# Predictions on N = 1,000 texts: every variant is right on the first accuracy * N texts (nested), so
# against full (860 right) the discordant texts are all one way: top2 5 (McNemar p = 2/32 = 0.0625),
# lora8 10 (p = 2/1024), depth3 20, probe 160.
VARIANTS = {
    "full": (6, "all", 0.86, 100.0),
    "depth3": (3, "all", 0.84, 60.0),
    "top2": (6, "top2", 0.855, 40.0),
    "probe": (6, "probe", 0.70, 10.0),
    "lora8": (6, "lora", 0.85, 80.0),
}
N = 1000
REFS = [i % 2 for i in range(N)]


def predictions(acc: float, offset: int = 0) -> list:
    """Right on the acc * N texts from `offset` on (cyclically), wrong elsewhere."""
    k = round(acc * N)
    return [r if (i - offset) % N < k else 1 - r for i, r in enumerate(REFS)]


def _audit(name: str, depth: int, rule: str) -> dict:
    layers = [{"name": "embeddings", "total": EMB, "trainable": EMB if rule == "all" else 0, "adapter": 0}]
    for i in range(depth):
        if rule == "lora":
            layers.append({"name": f"layer.{i}", "total": LAYER + 12_288, "trainable": 12_288, "adapter": 12_288})
        else:
            tr = LAYER if rule == "all" or (rule == "top2" and i >= depth - 2) else 0
            layers.append({"name": f"layer.{i}", "total": LAYER, "trainable": tr, "adapter": 0})
    # written head-first: the report orders layers itself (embeddings, layer.0.., pooler, head)
    layers.insert(0, {"name": "head", "total": HEAD, "trainable": HEAD, "adapter": 0})
    layers.append({"name": "pooler", "total": POOLER, "trainable": 0 if rule == "lora" else POOLER, "adapter": 0})
    total = sum(x["total"] for x in layers)
    trainable = sum(x["trainable"] for x in layers)
    return AuditRecord(variant=name, description=f"synthetic {rule}",
                       architecture={"model_type": "bert", "num_layers": depth, "hidden_size": 384, "num_labels": 2},
                       total_params=total, trainable_params=trainable, trainable_fraction=trainable / total,
                       layers=layers, buckets=[],
                       estimates={"memory_bytes": {"total": 100 * 2 ** 20 + trainable * 16}}).to_dict()


def _train(name: str, audit: dict, depth: int, time_s: float, note: str = "") -> dict:
    est = audit["estimates"]["memory_bytes"]["total"]
    return TrainRecord(variant=name, device="cpu", total_params=audit["total_params"],
                       trainable_params=audit["trainable_params"], depth=depth, wall_time_s=time_s + 5,
                       train_time_s=time_s, samples_per_s=2000 / time_s, tokens_per_s=60000 / time_s, steps=100,
                       best_val={"accuracy": 0.8}, peak_memory_bytes=int(est * 1.2), peak_memory_kind="rss_growth",
                       estimated_memory_bytes=est, memory_ratio=1.2, not_converged=bool(note),
                       convergence_note=note).to_dict()


def _eval(name: str, preds: list) -> dict:
    """An eval record whose metrics and intervals are those of `preds` against REFS."""
    acc = sum(p == r for p, r in zip(preds, REFS)) / N
    return EvalRecord(variant=name, n=N, labels=["neg", "pos"], accuracy=acc, macro_f1=macro_f1(REFS, preds, 2),
                      accuracy_ci=list(bootstrap_ci(REFS, preds, "accuracy")),
                      macro_f1_ci=list(bootstrap_ci(REFS, preds, "macro_f1", num_labels=2)),
                      confusion_matrix=[[450, 50], [90, 410]], latency_ms={"p50": 4.5, "p95": 6.25},
                      throughput_per_s=300.0, predictions=preds, references=REFS).to_dict()


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def write_variants(root: Path, spec: dict, offsets: dict | None = None, notes: dict | None = None) -> Path:
    """Audit, train and eval records of every variant in `spec` (see VARIANTS) under root."""
    for name, (depth, rule, acc, time_s) in spec.items():
        audit = _audit(name, depth, rule)
        _write(root / "audit" / f"{name}.json", audit)
        _write(root / "metrics" / "train" / f"{name}.json",
               _train(name, audit, depth, time_s, (notes or {}).get(name, "")))
        _write(root / "metrics" / "eval" / f"{name}.json", _eval(name, predictions(acc, (offsets or {}).get(name, 0))))
    return root


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    return write_variants(tmp_path, VARIANTS)


def _dirs(root: Path) -> dict:
    return {"audit_dir": root / "audit", "train_dir": root / "metrics" / "train",
            "eval_dir": root / "metrics" / "eval"}


def _report(root: Path, metric="accuracy", tolerance=0.01, variants=None, alpha=0.05) -> dict:
    results = load_results(list(variants or VARIANTS), **_dirs(root))
    return build_report(results, metric=metric, tolerance=tolerance, alpha=alpha)


# ----------------------------------------------------------------------------- pareto


def test_pareto_front_hand_made():
    pts = [("a", 0.80, 10), ("b", 0.70, 20),   # b: worse and dearer than a
           ("c", 0.90, 100), ("d", 0.90, 150),  # d: same value as c, dearer
           ("e", 0.60, 1), ("f", 0.80, 10)]     # f: exact duplicate of a, both stay
    assert pareto_front(pts) == ["e", "a", "f", "c"]
    assert pareto_front([("x", 0.5, 5)]) == ["x"]
    assert pareto_front([]) == []


def test_fronts_and_marks(results_dir):
    rep = _report(results_dir)
    assert rep["fronts"][FRONT_PARAMS] == ["lora8", "top2", "full"]
    assert rep["fronts"][FRONT_TIME] == ["probe", "top2", "full"]
    marks = {r["variant"]: (r["pareto_params"], r["pareto_time"]) for r in rep["rows"]}
    assert marks == {"full": (True, True), "depth3": (False, False), "top2": (True, True),
                     "probe": (False, True), "lora8": (True, False)}
    assert [r["variant"] for r in rep["rows"]] == list(VARIANTS)  # params order
    row = {r["variant"]: r for r in rep["rows"]}
    assert row["depth3"]["depth"] == 3 and row["full"]["depth"] == 6
    assert row["full"]["trainable_pct"] == pytest.approx(100.0)
    assert row["top2"]["memory_ratio"] == pytest.approx(1.2, rel=1e-6)
    assert row["lora8"]["latency_p95_ms"] == 6.25


# ----------------------------------------------------------------------------- verdict


def test_no_winner_when_the_gap_is_noise(results_dir):
    rep = _report(results_dir)
    v, rows = rep["verdict"], {r["variant"]: r for r in rep["rows"]}
    assert rows["full"]["p_vs_best"] is None
    assert rows["top2"]["p_vs_best"] == pytest.approx(2 / 32) and rows["lora8"]["p_vs_best"] == pytest.approx(2 / 1024)
    assert v["best"]["variant"] == "full" and not v["significant"] and v["indistinguishable"] == ["top2"]
    lo, hi = rows["full"]["accuracy_ci"]
    assert lo < 0.86 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.86 * 0.14 / N) ** 0.5, rel=0.2)
    assert v["sentence"].startswith(
        f"No clear best: full has the highest accuracy (0.8600, 95% CI {lo:.3f}-{hi:.3f}), but top2 (p=0.06) is "
        "statistically indistinguishable from it at alpha 0.05 on 1,000 test texts (McNemar test). ")
    assert "Best by" not in v["sentence"]
    # lora8's point estimate sits exactly at best - 0.01 and its interval reaches above, but it is
    # significantly worse (p=0.002): out. top2 (interval up to ~0.88, p=0.06) is in.
    assert v["cheapest"]["variant"] == "top2"
    assert "Cheapest within 0.01 of it: **top2** (0.8550, 95% CI " in v["sentence"]
    assert "p=0.06, 3,697,538 trainable params, 6.1x fewer)." in v["sentence"]


def test_interval_rule_alpha_and_metric_change_the_verdict(results_dir):
    v = _report(results_dir, tolerance=0.0)["verdict"]
    assert v["cheapest"]["variant"] == "top2"  # its interval reaches 0.86; its point estimate does not
    v = _report(results_dir, alpha=0.1)["verdict"]  # top2's p=0.0625 < 0.1: every gap is now significant
    assert v["significant"] and v["indistinguishable"] == []
    assert v["sentence"].startswith("Best by accuracy: **full** (0.8600, 95% CI ")
    assert ("significantly better than every other variant at alpha 0.1 on 1,000 test texts (McNemar, "
            "every p ≤ 0.06).") in v["sentence"]
    assert v["cheapest"]["variant"] == "full"
    assert "No variant with fewer trainable params is within 0.01 of it" in v["sentence"]
    v = _report(results_dir, metric="macro_f1")["verdict"]
    assert v["best"]["variant"] == "full" and v["test"] == "paired bootstrap"


def test_identical_predictions_never_name_a_winner_in_either_order(tmp_path):
    # a and b: the same predictions (and the same trainable params), so the params order picks the top one
    spec = {"a": (6, "top2", 0.80, 40.0), "b": (6, "top2", 0.80, 50.0), "probe": (6, "probe", 0.70, 10.0)}
    write_variants(tmp_path, spec)
    for order, top, other in ((["a", "b", "probe"], "a", "b"), (["b", "a", "probe"], "b", "a")):
        v = _report(tmp_path, variants=order)["verdict"]
        assert v["best"]["variant"] == top and not v["significant"] and v["indistinguishable"] == [other]
        assert v["sentence"].startswith(f"No clear best: {top} has the highest accuracy (0.8000, 95% CI ")
        assert f"but {other} (p=1.00) is statistically indistinguishable from it" in v["sentence"]
        assert "Best by" not in v["sentence"] and "probe (p=" not in v["sentence"]
    for order in (["probe", "a"], ["a", "probe"]):  # a real gap: 100 texts apart, all one way
        v = _report(tmp_path, variants=order)["verdict"]
        assert v["significant"] and v["sentence"].startswith("Best by accuracy: **a** (0.8000, 95% CI ")
        assert "(McNemar, every p < 0.001)." in v["sentence"]


def test_not_converged_variants_are_marked_with_their_note(tmp_path):
    note = "validation accuracy still rising at the last epoch (2/2): raise train.epochs"
    write_variants(tmp_path, VARIANTS, notes={"lora8": note})
    rep = _report(tmp_path)
    assert [r["variant"] for r in rep["rows"] if r["not_converged"]] == ["lora8"]
    md = render_outputs(rep)["comparison.md"].decode()
    assert "| lora8 ⚠ | synthetic lora |" in md and "| full (top) |" in md
    assert f"- **lora8**: {note}" in md and "not converged" in md
    assert "not converged" not in render_outputs(_report(write_variants(tmp_path / "ok", VARIANTS)))[
        "comparison.md"].decode()


def test_training_table_says_how_each_variant_was_trained(tmp_path):
    root = write_variants(tmp_path, VARIANTS)
    path = root / "metrics" / "train" / "lora8.json"
    rec = json.loads(path.read_text())
    rec.update(config={"lr": 4e-3}, epochs_run=3.5, best_epoch=2.5, stopped_early=True,
               lr_search={"chosen_lr": 4e-3, "at_edge": True, "candidates": []})
    path.write_text(json.dumps(rec))
    rows = {r["variant"]: r for r in _report(root)["rows"]}
    assert (rows["lora8"]["lr"], rows["lora8"]["lr_searched"], rows["lora8"]["epochs_run"]) == (4e-3, True, 3.5)
    md = render_outputs(_report(root))["comparison.md"].decode()
    assert "| lora8 | 0.004 (searched, grid edge) | 3.5 | 2.5 | early stopping | yes: early stopping |" in md
    # a record without config, epochs or a convergence verdict (an older one): dashes, and converged by its budget
    assert "| full | — | 0 | -1 | budget: ? epochs | yes: plateau |" in md
    assert "accuracy across seeds" not in md  # one seed: no spread column


def test_training_table_says_which_rule_made_each_variant_converged(tmp_path):
    root = write_variants(tmp_path, VARIANTS)
    rise = {"window": 4, "before_step": 500, "before": 0.81, "within_step": 750, "within": 0.812, "gain": 0.002,
            "p": 0.75, "alpha": 0.05, "rate_per_step": 8e-6, "rising": False}
    updates = {
        "depth3": dict(convergence="plateau", rise=rise, budget_epochs=12, extensions=1, config={"lr": 8e-5}),
        "probe": dict(convergence="early stopping", stopped_early=True, near_chance=True, chance=0.5,
                      convergence_note="near chance (converged by early stopping): best validation accuracy 0.52"),
        "lora8": dict(convergence="still rising", not_converged=True, budget_epochs=16, extensions=2,
                      rise={**rise, "before": 0.70, "within": 0.76, "gain": 0.06, "p": 1e-5, "rising": True},
                      convergence_note="not converged: still rising after 16 epochs"),
    }
    for name, fields in updates.items():
        path = root / "metrics" / "train" / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    rep = _report(root)
    md = render_outputs(rep)["comparison.md"].decode()
    assert ("| depth3 | 8e-05 | 0 | -1 | budget: 12 epochs (1 extension) | yes: plateau (0.8100 -> 0.8120 over the "
            "last 4 validations, p=0.75) |") in md
    assert "| probe | — | 0 | -1 | early stopping | yes: early stopping; **near chance** |" in md
    assert ("| lora8 | — | 0 | -1 | budget: 16 epochs (2 extensions) | **no** ⚠: still rising (0.7000 -> 0.7600 "
            "over the last 4 validations, p<0.001) |") in md
    assert "- **probe**: near chance (converged by early stopping)" in md and "- **lora8**: not converged" in md
    assert rep["verdict"]["near_chance"] == ["probe"] and "probe stayed near chance" in rep["verdict"]["sentence"]
    html = render_outputs(rep)["index.html"].decode()
    assert "budget: 16 epochs (2 extensions)" in html and "still rising (0.7000 -&gt; 0.7600" in html
    assert "accuracy across seeds" not in md  # one seed: no spread column


def test_best_ties_prefer_fewer_params():
    rows = [{"variant": "big", "accuracy": 0.9, "trainable_params": 100},
            {"variant": "small", "accuracy": 0.9, "trainable_params": 10}]
    assert pick_best(rows, "accuracy")["variant"] == "small"
    with pytest.raises(DepthtuneError, match="not one of"):
        best_and_cheapest(rows, "f2")



def _seeded(name, acc, mean, sd, p, params=100):
    return {"variant": name, "accuracy": acc, "accuracy_ci": [acc - 0.03, acc + 0.03], "p_vs_best": p,
            "trainable_params": params, "n_test": 1000, "seeds": 3,
            "seed_accuracy": {"mean": mean, "sd": sd, "min": mean - sd, "max": mean + sd}}


def test_verdict_says_whether_the_seeds_confirm_the_first_seeds_best():
    # the from-zero example's figures: random init wins on seed 42 (p = 0.02) but is 0.578-0.699 over 3 seeds
    rows = [_seeded("full", 0.660, 0.6573, 0.0031, 0.02), _seeded("scratch", 0.699, 0.6580, 0.0693, None)]
    v = best_and_cheapest(rows, "accuracy")
    assert v["best"]["variant"] == "scratch" and v["significant"]
    assert v["seeds"]["by_mean"] == ["scratch", "full"] and not v["seeds"]["separated"]
    assert abs(v["seeds"]["lead"] - 0.0007) < 1e-9
    assert "scratch's 0.6580 ± 0.0693, 0.0007 ahead of full's 0.6573 ± 0.0031" in v["sentence"]
    assert "the seeds do not separate the two" in v["sentence"]
    # a lead larger than either sd: confirmed; the mean's leader differs from the first seed's best: said
    rows = [_seeded("full", 0.758, 0.775, 0.015, 0.93), _seeded("lora8", 0.760, 0.762, 0.005, None),
            _seeded("scratch", 0.727, 0.726, 0.010, 0.01)]
    v = best_and_cheapest(rows, "accuracy")
    assert v["best"]["variant"] == "lora8" and v["seeds"]["by_mean"] == ["full", "lora8", "scratch"]
    assert not v["seeds"]["separated"]  # 0.013 lead < full's sd 0.015
    assert "ahead of lora8's 0.7620" in v["sentence"] and "first seed's best" not in v["sentence"]
    rows[1]["seed_accuracy"]["mean"] = 0.70  # the first seed's best is third over the seeds: named
    assert "The first seed's best, lora8, averages 0.7000." in best_and_cheapest(rows, "accuracy")["sentence"]
    rows[0]["seed_accuracy"]["sd"] = 0.004
    assert best_and_cheapest(rows, "accuracy")["seeds"]["separated"]
    assert "more than either's seed-to-seed sd" in best_and_cheapest(rows, "accuracy")["sentence"]
    # one seed: no seed sentence at all
    for r in rows:
        r.update(seeds=1, seed_accuracy=None)
    v = best_and_cheapest(rows, "accuracy")
    assert "seeds" not in v and "Across seeds" not in v["sentence"]


# ----------------------------------------------------------------------------- eval records


def test_eval_record_round_trip_and_an_old_file_refused_in_one_line(tmp_path):
    doc = _eval("full", predictions(0.86, offset=7))
    path = tmp_path / "full.json"
    _write(path, doc)
    rec = EvalRecord.read(path)
    assert rec.predictions == predictions(0.86, offset=7) and rec.references == REFS and rec.n == N
    assert rec.interval("accuracy") == tuple(rec.accuracy_ci) and rec.accuracy_ci[0] < 0.86 < rec.accuracy_ci[1]
    assert rec.to_dict() == doc and doc["schema"] == "depthtune.eval/2"
    old = {k: v for k, v in doc.items() if k not in ("predictions", "references", "accuracy_ci", "macro_f1_ci")}
    _write(path, {**old, "schema": "depthtune.eval/1"})
    with pytest.raises(DepthtuneError) as exc:
        EvalRecord.read(path)
    msg = str(exc.value)
    assert "\n" not in msg and "depthtune.eval/1" in msg and "re-run its evaluation stage" in msg
    _write(path, {**doc, "predictions": doc["predictions"][:-1]})
    with pytest.raises(DepthtuneError, match="999 predictions and 1000 references for n=1000"):
        EvalRecord.read(path)
    _write(path, {**doc, "accuracy_ci": [0.8]})
    with pytest.raises(DepthtuneError, match=r"`accuracy_ci` is \[0.8\], expected \[low, high\]"):
        EvalRecord.read(path)


def test_variants_scored_on_other_texts_are_refused(results_dir):
    ev = results_dir / "metrics" / "eval" / "probe.json"
    doc = json.loads(ev.read_text())
    doc["references"] = doc["references"][1:] + doc["references"][:1]
    ev.write_text(json.dumps(doc))
    with pytest.raises(DepthtuneError, match=r"probe\.json: scored on other test texts than .*full\.json"):
        _report(results_dir)


# ----------------------------------------------------------------------------- errors


def test_missing_file_is_named(results_dir):
    (results_dir / "metrics" / "eval" / "top2.json").unlink()
    with pytest.raises(DepthtuneError) as exc:
        load_results(list(VARIANTS), **_dirs(results_dir))
    msg = str(exc.value)
    assert str(Path("metrics") / "eval" / "top2.json") in msg and "evaluation@top2" in msg
    assert "full" not in msg  # only the missing file is named


def test_variant_in_params_without_results(results_dir):
    with pytest.raises(DepthtuneError, match=r"audit.bitfit\.json.*train.bitfit\.json.*eval.bitfit\.json"):
        load_results([*VARIANTS, "bitfit"], **_dirs(results_dir))


def test_stale_or_broken_files(results_dir):
    train = results_dir / "metrics" / "train" / "probe.json"
    doc = json.loads(train.read_text())
    doc["trainable_params"] += 1
    train.write_text(json.dumps(doc))
    with pytest.raises(DepthtuneError, match=r"probe\.json: trainable_params 148,611 != 148,610 .*stale"):
        _report(results_dir)
    ev = results_dir / "metrics" / "eval" / "full.json"
    doc = json.loads(ev.read_text())
    del doc["accuracy"]
    ev.write_text(json.dumps(doc))
    with pytest.raises(DepthtuneError, match=r"full\.json: missing `accuracy`"):
        _report(results_dir, variants=["full"])
    ev.write_text("{not json")
    with pytest.raises(DepthtuneError, match=r"full\.json: not valid JSON"):
        _report(results_dir, variants=["full"])


def test_bad_value_and_copied_record_are_one_line(results_dir):
    train = results_dir / "metrics" / "train" / "top2.json"
    doc = json.loads(train.read_text())
    doc["train_time_s"] = "fast"
    train.write_text(json.dumps(doc))
    with pytest.raises(DepthtuneError, match=r"top2\.json: `train_time_s` is 'fast', expected a number"):
        _report(results_dir, variants=["top2"])
    audit = results_dir / "audit"
    (audit / "full.json").write_bytes((audit / "probe.json").read_bytes())  # copied by hand
    with pytest.raises(DepthtuneError, match=r"full\.json: belongs to variant 'probe', expected 'full'"):
        _report(results_dir, variants=["full"])


def test_layer_order():
    names = ["head", "layer.10", "other", "pooler", "layer.2", "final_norm", "embeddings", "adapter"]
    assert sorted(names, key=layer_order_key) == ["embeddings", "layer.2", "layer.10", "pooler", "final_norm",
                                                  "head", "other", "adapter"]  # unknown: first-seen order


# ----------------------------------------------------------------------------- outputs


def test_outputs(results_dir):
    out = render_outputs(_report(results_dir))
    assert set(out) == {"comparison.md", "comparison.json", "variants.csv", "pareto.png", "depth.png", "index.html"}
    for name in ("pareto.png", "depth.png"):
        assert out[name].startswith(PNG_MAGIC), name
        assert len(out[name]) > 10_000, (name, len(out[name]))

    doc = json.loads(out["comparison.json"])
    assert doc["schema"] == "depthtune.compare/2" and doc["alpha"] == 0.05
    top2 = doc["variants"]["top2"]
    assert set(top2) == {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "macro_f1_ci_low",
                         "macro_f1_ci_high", "p_vs_best", "trainable_params", "train_time_s"}
    assert (top2["accuracy"], top2["trainable_params"], top2["train_time_s"]) == (0.855, 2 * LAYER + POOLER + HEAD, 40.0)
    assert top2["accuracy_ci_low"] < 0.855 < top2["accuracy_ci_high"]
    assert top2["p_vs_best"] == pytest.approx(2 / 32) and doc["variants"]["full"]["p_vs_best"] == 1.0
    assert list(doc["variants"]) == list(VARIANTS)
    assert all(isinstance(x, (int, float)) for v in doc["variants"].values() for x in v.values())
    assert doc["best"] == {"variant": "full", "accuracy": 0.86, "trainable_params": EMB + 6 * LAYER + POOLER + HEAD}
    assert doc["cheapest"]["variant"] == "top2"
    assert doc["verdict"]["significant"] is False and doc["verdict"]["indistinguishable"] == ["top2"]
    assert doc["pareto"] == {FRONT_PARAMS: ["lora8", "top2", "full"], FRONT_TIME: ["probe", "top2", "full"]}
    assert [r["variant"] for r in doc["rows"]] == list(VARIANTS)
    assert doc["rows"][2]["pareto_params"] is True and doc["rows"][2]["depth"] == 6
    assert [x["name"] for x in doc["layers"]] == ["embeddings"] + [f"layer.{i}" for i in range(6)] + ["pooler", "head"]
    layer4 = doc["layers"][5]
    assert layer4["trainable"] == {"full": LAYER, "top2": LAYER, "probe": 0, "lora8": 12_288}  # no depth3

    md = out["comparison.md"].decode()
    assert md.startswith("# Variant comparison")
    assert "| top2 (cheapest) | synthetic top2 | 6 | 3,697,538 |" in md
    assert "| full (top) |" in md and "| 0.8550 [" in md and "| 0.06 |" in md  # metric [CI], p vs best
    assert "lora8 (0.8500, 74.5k params) → top2" in md
    assert "## Trainable parameters per layer" in md and "| layer.5 | 1,774,464 | — |" in md

    rows = list(csv.DictReader(io.StringIO(out["variants.csv"].decode())))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert {k: rows[1][k] for k in ("variant", "depth", "trainable_params", "accuracy", "train_time_s")} == {
        "variant": "depth3", "depth": "3", "trainable_params": str(EMB + 3 * LAYER + POOLER + HEAD),
        "accuracy": "0.84", "train_time_s": "60"}
    assert float(rows[1]["accuracy_ci_low"]) < 0.84 < float(rows[1]["accuracy_ci_high"])
    assert comparison_json(_report(results_dir))["tolerance"] == 0.01


def test_stage_main(results_dir, capsys):
    from stages.compare import main
    params = results_dir / "params.yaml"
    params.write_text("variants:\n" + "".join(f"  {v}: {{}}\n" for v in VARIANTS)
                      + "evaluation: {metric: accuracy}\ncompare: {tolerance: 0.005}\n")
    out = results_dir / "reports"
    main(["--params", str(params), "--out", str(out), "--audit", str(results_dir / "audit"),
          "--train", str(results_dir / "metrics" / "train"), "--eval", str(results_dir / "metrics" / "eval")])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["comparison.json", "comparison.md", "depth.png", "index.html", "pareto.png",
                     "variants.csv"]  # no temp files
    assert json.loads((out / "comparison.json").read_text())["cheapest"]["variant"] == "top2"
    assert (out / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "comparison.json").stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600
    printed = capsys.readouterr().out
    assert "| variant |" in printed and "Cheapest within 0.005 of it: top2" in printed


def test_pretraining_cost_is_shown_beside_the_variants(results_dir):
    from stages.compare import main
    params = results_dir / "params.yaml"
    params.write_text("variants:\n" + "".join(f"  {v}: {{}}\n" for v in VARIANTS)
                      + "evaluation: {metric: accuracy}\ncompare: {tolerance: 0.005}\n")
    record = {"enabled": True, "objective": "mlm", "base": "scratch (bert)", "steps": 1500, "stopped_by": "max_steps",
              "tokens": 2_919_147, "train_time_s": 420.0, "tokens_per_s": 6950.4, "mfu": 0.41, "total_params": 4_934_519,
              "val_curve": [{"step": 0, "perplexity": 6712.0}, {"step": 1500, "perplexity": 229.8}],
              "final_perplexity": 229.8, "tokenizer": {"trained": True, "kind": "wordpiece", "vocab_size": 6519},
              "coverage": {"train": {"unk_fraction": 0.0}, "test": {"unk_fraction": 0.0058}}}
    (results_dir / "pretrain.json").write_text(json.dumps(record))
    dirs = ["--audit", str(results_dir / "audit"), "--train", str(results_dir / "metrics" / "train"),
            "--eval", str(results_dir / "metrics" / "eval")]
    main(["--params", str(params), "--out", str(results_dir / "reports"), "--pretrain", str(results_dir / "pretrain.json"),
          *dirs])
    md = (results_dir / "reports" / "comparison.md").read_text()
    assert "## Pretraining: the base model the variants start from" in md
    assert "| mlm | scratch (bert) | 4,934,519 | 1,500 (max_steps) | 2,919,147 | 7.0 | 6,950 | 0.41 | 6,712 -> 229.8 |" in md
    assert "trained wordpiece (6,519) | train 0.0%, test 0.6% |" in md
    assert "top2 0.7 + 7.0 = 7.7 min" in md  # top2 trains 40 s: its own time + the pretraining it started from
    doc = json.loads((results_dir / "reports" / "comparison.json").read_text())
    assert doc["pretraining"]["train_time_s"] == 420.0 and doc["rows"][2]["with_pretraining_s"] == 460.0
    # pretraining off (the pass-through record): no section, nothing added
    (results_dir / "pretrain.json").write_text(json.dumps({"enabled": False}))
    main(["--params", str(params), "--out", str(results_dir / "reports"), "--pretrain", str(results_dir / "pretrain.json"),
          *dirs])
    assert "## Pretraining" not in (results_dir / "reports" / "comparison.md").read_text()


def test_single_variant_renders(results_dir):
    rep = _report(results_dir, variants=["probe"])
    assert rep["fronts"] == {FRONT_PARAMS: ["probe"], FRONT_TIME: ["probe"]}
    assert rep["verdict"]["best"]["variant"] == rep["verdict"]["cheapest"]["variant"] == "probe"
    out = render_outputs(rep)
    assert out["pareto.png"].startswith(PNG_MAGIC) and out["depth.png"].startswith(PNG_MAGIC)


def test_per_class_section_names_the_worst_classes_and_confused_pairs():
    """77 classes stay readable: the worst 15 by F1 and the 10 largest confusions, by label name."""
    from depthtune.evaluation.class_summary import class_markdown, confused_pairs, worst_classes

    labels = [f"intent_{i:02d}" for i in range(77)]
    per_class = {name: {"precision": 0.9, "recall": 0.9, "f1": 0.5 + i / 200, "support": 10}
                 for i, name in enumerate(labels)}
    matrix = [[10 if i == j else 0 for j in range(77)] for i in range(77)]
    matrix[5][6], matrix[7][5], matrix[7][7] = 4, 2, 8
    worst = worst_classes(per_class)
    assert [r["label"] for r in worst] == labels[:15] and worst[0]["f1"] == 0.5
    pairs = confused_pairs(matrix, labels)
    assert pairs[0] == {"true": "intent_05", "predicted": "intent_06", "count": 4, "share": 4 / 14}
    assert pairs[1]["true"] == "intent_07" and len(pairs) == 2
    md = "\n".join(class_markdown({"variant": "full", "classes": 77, "worst": worst, "confused": pairs}))
    assert "the 15 of 77 classes with the lowest F1" in md and "- intent_05 -> intent_06: 4 (29%)" in md
    assert md.count("\n| intent_") == 15


def test_text_the_tokenizer_cannot_read_is_flagged_in_the_report(results_dir):
    """An audit record carrying the tokenization stage's unknown share > 1% puts a caution above the table."""
    audit = results_dir / "audit" / "full.json"
    doc = json.loads(audit.read_text())
    audit.write_text(json.dumps({**doc, "unknown_fraction": 0.64}))
    report = _report(results_dir)
    assert report["unknown_fraction"] == 0.64
    out = render_outputs(report)
    assert "**Caution**: 64.0% of the text is unknown to the tokenizer" in out["comparison.md"].decode()
    assert "64.0% of the text is unknown" in out["index.html"].decode()
    audit.write_text(json.dumps({**doc, "unknown_fraction": 0.0}))
    assert "Caution" not in render_outputs(_report(results_dir))["comparison.md"].decode()
