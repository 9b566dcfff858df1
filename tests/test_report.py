"""The comparison report (depthtune/report.py, stages/compare.py) on synthetic result files."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from depthtune.errors import DepthtuneError
from depthtune.layer_order import layer_order_key
from depthtune.records import AuditRecord, EvalRecord, TrainRecord
from depthtune.report import (FRONT_PARAMS, FRONT_TIME, best_and_cheapest, build_report, comparison_json,
                              load_results, pareto_front, render_outputs)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EMB, LAYER, POOLER, HEAD = 11_918_592, 1_774_464, 147_840, 770

# name -> (depth, per-layer trainable rule, accuracy, macro_f1, train_time_s), in params order.
# Hand-made so that the fronts are known:
#   params front (acc up, params down): lora8 (74k, .85) < top2 (3.7M, .855) < full (22.7M, .86);
#     probe (149k, .70) is dominated by lora8, depth3 (17.4M, .84) by top2.
#   time front (acc up, time down): probe (10 s) < top2 (40 s) < full (100 s);
#     depth3 (60 s, .84) and lora8 (80 s, .85) are dominated by top2 (40 s, .855).
VARIANTS = {
    "full": (6, "all", 0.86, 0.858, 100.0),
    "depth3": (3, "all", 0.84, 0.839, 60.0),
    "top2": (6, "top2", 0.855, 0.851, 40.0),
    "probe": (6, "probe", 0.70, 0.69, 10.0),
    "lora8": (6, "lora", 0.85, 0.862, 80.0),
}


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


def _train(name: str, audit: dict, depth: int, time_s: float) -> dict:
    est = audit["estimates"]["memory_bytes"]["total"]
    return TrainRecord(variant=name, device="cpu", total_params=audit["total_params"],
                       trainable_params=audit["trainable_params"], depth=depth, wall_time_s=time_s + 5,
                       train_time_s=time_s, samples_per_s=2000 / time_s, tokens_per_s=60000 / time_s, steps=100,
                       best_val={"accuracy": 0.8}, peak_memory_bytes=int(est * 1.2), peak_memory_kind="rss_growth",
                       estimated_memory_bytes=est, memory_ratio=1.2).to_dict()


def _eval(name: str, acc: float, f1: float) -> dict:
    return EvalRecord(variant=name, n=1000, labels=["neg", "pos"], accuracy=acc, macro_f1=f1,
                      confusion_matrix=[[450, 50], [90, 410]], latency_ms={"p50": 4.5, "p95": 6.25},
                      throughput_per_s=300.0).to_dict()


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    for name, (depth, rule, acc, f1, time_s) in VARIANTS.items():
        audit = _audit(name, depth, rule)
        _write(tmp_path / "audit" / f"{name}.json", audit)
        _write(tmp_path / "metrics" / "train" / f"{name}.json", _train(name, audit, depth, time_s))
        _write(tmp_path / "metrics" / "eval" / f"{name}.json", _eval(name, acc, f1))
    return tmp_path


def _dirs(root: Path) -> dict:
    return {"audit_dir": root / "audit", "train_dir": root / "metrics" / "train",
            "eval_dir": root / "metrics" / "eval"}


def _report(root: Path, metric="accuracy", tolerance=0.01, variants=None) -> dict:
    results = load_results(list(variants or VARIANTS), **_dirs(root))
    return build_report(results, metric=metric, tolerance=tolerance)


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


def test_best_and_cheapest_sentence(results_dir):
    v = _report(results_dir)["verdict"]
    assert v["best"]["variant"] == "full"
    # lora8 (0.85) sits exactly at best - tolerance (0.86 - 0.01): inside, and the fewest params
    assert v["cheapest"]["variant"] == "lora8"
    assert "Best by accuracy: **full** (0.8600" in v["sentence"]
    assert "Cheapest within 0.01 of it: **lora8** (0.8500" in v["sentence"]
    assert "74,498 trainable params" in v["sentence"]


def test_tolerance_and_metric_change_the_verdict(results_dir):
    v = _report(results_dir, tolerance=0.005)["verdict"]
    assert (v["best"]["variant"], v["cheapest"]["variant"]) == ("full", "top2")
    v = _report(results_dir, tolerance=0.0)["verdict"]
    assert v["cheapest"]["variant"] == "full"
    assert "No variant with fewer trainable params is within 0 of it." in v["sentence"]
    v = _report(results_dir, metric="macro_f1")["verdict"]  # lora8 has the best macro-F1 and fewest params
    assert (v["best"]["variant"], v["cheapest"]["variant"]) == ("lora8", "lora8")
    assert "Best by macro-F1: **lora8**" in v["sentence"]


def test_best_ties_prefer_fewer_params():
    rows = [{"variant": "big", "accuracy": 0.9, "trainable_params": 100},
            {"variant": "small", "accuracy": 0.9, "trainable_params": 10}]
    assert best_and_cheapest(rows, "accuracy", 0.0)["best"]["variant"] == "small"


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
    assert set(out) == {"comparison.md", "comparison.json", "variants.csv", "pareto.png", "depth.png"}
    for name in ("pareto.png", "depth.png"):
        assert out[name].startswith(PNG_MAGIC), name
        assert len(out[name]) > 10_000, (name, len(out[name]))

    doc = json.loads(out["comparison.json"])
    assert doc["schema"] == "depthtune.compare/1"
    assert doc["variants"]["top2"] == {"accuracy": 0.855, "macro_f1": 0.851,
                                       "trainable_params": 2 * LAYER + POOLER + HEAD, "train_time_s": 40.0}
    assert list(doc["variants"]) == list(VARIANTS)
    assert all(isinstance(x, (int, float)) for v in doc["variants"].values() for x in v.values())
    assert doc["best"] == {"variant": "full", "accuracy": 0.86, "trainable_params": EMB + 6 * LAYER + POOLER + HEAD}
    assert doc["cheapest"]["variant"] == "lora8"
    assert doc["pareto"] == {FRONT_PARAMS: ["lora8", "top2", "full"], FRONT_TIME: ["probe", "top2", "full"]}
    assert [r["variant"] for r in doc["rows"]] == list(VARIANTS)
    assert doc["rows"][2]["pareto_params"] is True and doc["rows"][2]["depth"] == 6
    assert [x["name"] for x in doc["layers"]] == ["embeddings"] + [f"layer.{i}" for i in range(6)] + ["pooler", "head"]
    layer4 = doc["layers"][5]
    assert layer4["trainable"] == {"full": LAYER, "top2": LAYER, "probe": 0, "lora8": 12_288}  # no depth3

    md = out["comparison.md"].decode()
    assert md.startswith("# Variant comparison")
    assert "| top2 | synthetic top2 | 6 | 3,697,538 |" in md
    assert "| full (best) |" in md and "| lora8 (cheapest) |" in md
    assert "lora8 (0.8500, 74.5k params) → top2" in md
    assert "## Trainable parameters per layer" in md and "| layer.5 | 1,774,464 | — |" in md

    rows = list(csv.DictReader(io.StringIO(out["variants.csv"].decode())))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert rows[1] == {"variant": "depth3", "depth": "3", "trainable_params": str(EMB + 3 * LAYER + POOLER + HEAD),
                       "accuracy": "0.84", "macro_f1": "0.839", "train_time_s": "60"}
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
    assert names == ["comparison.json", "comparison.md", "depth.png", "pareto.png", "variants.csv"]  # no temp files
    assert json.loads((out / "comparison.json").read_text())["cheapest"]["variant"] == "top2"
    assert (out / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "comparison.json").stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600
    printed = capsys.readouterr().out
    assert "| variant |" in printed and "Cheapest within 0.005 of it: top2" in printed


def test_single_variant_renders(results_dir):
    rep = _report(results_dir, variants=["probe"])
    assert rep["fronts"] == {FRONT_PARAMS: ["probe"], FRONT_TIME: ["probe"]}
    assert rep["verdict"]["best"]["variant"] == rep["verdict"]["cheapest"]["variant"] == "probe"
    out = render_outputs(rep)
    assert out["pareto.png"].startswith(PNG_MAGIC) and out["depth.png"].startswith(PNG_MAGIC)
