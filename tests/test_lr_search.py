"""train.lr_search on a tiny random-init BERT (hidden 32, 4 layers): candidates, determinism, the
validation split only, one prefix cache for every candidate, and the finetune stage's record."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json

import pytest
import torch
import yaml

from depthtune import training
from depthtune.batching import predict_logits
from depthtune.errors import ConfigError
from depthtune.config import LrSearch, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.lr_search import candidate_lrs, pick_lr, search_lr, train_candidate
from depthtune.metric_modules import quick_scores
from depthtune.prefix_cache import PrefixCache
from depthtune.records import AuditRecord, TrainRecord
from depthtune.tracking import training_metrics
from depthtune.variants import build_variant
from tests.conftest import TINY_ARCH, tiny_params

MODEL = parse_section(ModelConfig, {"source": "scratch", "scratch": TINY_ARCH}, "model")
# 96 texts / batch 8 = 12 steps an epoch; 5 candidates x 6 steps
CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=0, seed=7,
                  lr_search=LrSearch(enabled=True, steps=6))
QUIET = dict(metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=lambda s: None)


def build(raw: dict):
    spec = parse_variant("v", raw, "variants.v")
    return spec, build_variant(MODEL, spec, 2, device="cpu", seed=0)


def search(spec, built, data, cfg=CFG, **kw):
    train_ex, val_ex = data
    return search_lr(lambda: built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                     cfg=cfg, **QUIET, **kw)


def without_seconds(result: dict) -> dict:
    return {"chosen_lr": result["chosen_lr"],
            "candidates": [{k: v for k, v in c.items() if k != "seconds"} for c in result["candidates"]]}


def test_config_defaults_and_bad_factors_are_one_line_errors():
    assert TrainConfig().lr_search == LrSearch(enabled=False, factors=[0.25, 0.5, 1.0, 2.0, 4.0], steps=60)
    assert parse_section(TrainConfig, {"lr_search": {"factors": [1, 3]}}, "train").lr_search.factors == (1, 3)
    for bad in ([], [0.5, 0], [1, 1], ["x"]):
        with pytest.raises(ConfigError, match=r"^train\.lr_search\.factors"):
            parse_section(TrainConfig, {"lr_search": {"factors": bad}}, "train")
    assert candidate_lrs(8e-5, [4.0, 0.25, 1.0]) == [2e-05, 8e-05, 3.2e-04]


def test_ties_go_to_the_configured_lr_then_the_smaller():
    cands = [{"lr": 4e-3, "val_accuracy": 0.8}, {"lr": 1e-3, "val_accuracy": 0.8}, {"lr": 2e-3, "val_accuracy": 0.7}]
    assert pick_lr(cands, "val_accuracy") == 1e-3
    assert pick_lr(cands, "val_accuracy", configured=4e-3) == 4e-3  # tied with the best: keep the default
    assert pick_lr(cands, "val_accuracy", configured=2e-3) == 1e-3  # the default lost: the smaller tied one
    assert pick_lr(cands + [{"lr": 8e-3, "val_accuracy": 0.81}], "val_accuracy", configured=1e-3) == 8e-3
    # every candidate at the majority class (what 60 steps gave depth3 on the default data)
    flat = [{"lr": lr, "val_accuracy": 0.578} for lr in (2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4)]
    assert pick_lr(flat, "val_accuracy", configured=8e-5) == 8e-5


def test_search_has_one_candidate_per_factor_is_deterministic_and_leaves_the_model_as_built(data):
    spec, built = build({})
    initial = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    first = search(spec, built, data)
    assert [c["lr"] for c in first["candidates"]] == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert all(c["steps"] == 6 and c["seconds"] > 0 and 0 <= c["val_accuracy"] <= 1 for c in first["candidates"])
    assert first["metric"] == "accuracy" and first["chosen_lr"] in [c["lr"] for c in first["candidates"]]
    best = max(c["val_accuracy"] for c in first["candidates"])
    tied = [c["lr"] for c in first["candidates"] if c["val_accuracy"] == best]
    assert first["chosen_lr"] == (CFG.lr if CFG.lr in tied else min(tied))  # ties: the configured lr first
    assert first["at_edge"] == (first["chosen_lr"] in (2.5e-4, 4e-3))
    # the model is back at its initial weights: the caller's training starts where a fresh model would
    assert all(torch.equal(initial[n], p) for n, p in built.model.named_parameters())
    assert without_seconds(search(spec, built, data)) == without_seconds(first)
    # training the searched model at the chosen lr == training a fresh one: bit for bit
    train_ex, val_ex = data
    cfg = dataclasses.replace(CFG, lr=first["chosen_lr"], epochs=1)
    fresh_spec, fresh = build({})
    outs = [training.train(model=m.model, spec=spec, num_layers=m.num_layers, train_ex=train_ex, val_ex=val_ex,
                           cfg=cfg, **QUIET) for m in (built, fresh)]
    assert outs[0].loss_curve == outs[1].loss_curve and outs[0].best_val == outs[1].best_val


def test_only_the_validation_split_is_scored(data):
    """search_lr cannot be given a test split, and a candidate's score is a plain evaluation on validation."""
    assert not any("test" in name for name in inspect.signature(search_lr).parameters)
    spec, built = build({"depth": 2})
    result = search(spec, built, data, cfg=dataclasses.replace(CFG, lr_search=LrSearch(factors=[1.0, 4.0], steps=6)))
    train_ex, val_ex = data
    _, again = build({"depth": 2})
    train_candidate(again.model, 4e-3, 6, spec=spec, num_layers=again.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=CFG, metric="accuracy", device="cpu", pad_id=0, num_labels=2, caches=(None, None),
                    eval_batch_size=64)
    logits = predict_logits(again.model, val_ex, 64, "cpu", 0)
    direct = quick_scores(logits.argmax(-1).tolist(), val_ex.labels, 2)["accuracy"]
    assert result["candidates"][1]["val_accuracy"] == direct


def test_a_train_top_variant_caches_its_prefix_once_for_every_candidate_and_the_training(data, monkeypatch):
    built_caches = []

    class CountingCache(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built_caches.append(self)

    monkeypatch.setattr(training, "PrefixCache", CountingCache)
    spec, built = build({"train_top": 1})
    train_ex, val_ex = data
    result = search(spec, built, data)
    assert len(result["candidates"]) == 5 and len(built_caches) == 2  # train + validation, once
    # the stage's way: one pair for the search and the training after it
    built_caches.clear()
    caches = training.prefix_caches(built.model, spec, built.num_layers, train_ex, val_ex, CFG, device="cpu",
                                    pad_id=0, log=lambda s: None)
    search(spec, built, data, caches=caches)
    out = training.train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                         cfg=dataclasses.replace(CFG, lr=result["chosen_lr"]), caches=caches, **QUIET)
    assert len(built_caches) == 2 and out.cached_prefix_layers == 3


@pytest.fixture(scope="module")
def stage_runs(shared_data, tmp_path_factory):
    """The finetune stage of a tiny probe project, run with the search off and on (tracking off)."""
    from stages import audit, finetune, prepare, tokenization

    project = tmp_path_factory.mktemp("project")
    params = tiny_params(shared_data, variants={"probe": {"train_top": 0, "train": {"lr": 5e-3}}},
                         tracking={"enabled": False})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    params["train"]["lr_search"] = {"enabled": True, "factors": [0.5, 1.0, 2.0], "steps": 5}
    (project / "params-on.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = {"off": io.StringIO(), "on": io.StringIO()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        threads = torch.get_num_threads()
        try:
            prepare.main([])
            tokenization.main([])
            audit.main([])
            with contextlib.redirect_stdout(out["off"]):
                finetune.main(["--variant", "probe"])
            with contextlib.redirect_stdout(out["on"]):
                finetune.main(["--variant", "probe", "--params", "params-on.yaml", "--metrics", "on.json",
                               "--model", "models/probe-on", "--loss-plot", "on.csv"])
        finally:
            torch.set_num_threads(threads)
    project.joinpath("off.log").write_text(out["off"].getvalue())
    project.joinpath("on.log").write_text(out["on"].getvalue())
    return project


def test_finetune_stage_records_the_search_only_when_enabled(stage_runs):
    off = json.loads((stage_runs / "metrics/train/probe.json").read_text())
    assert "lr search" not in (stage_runs / "off.log").read_text()
    log = (stage_runs / "on.log").read_text()
    assert log.count("lr search: lr ") == 3 and log.count("lr search: chose lr") == 1
    assert log.count("cached frozen prefix") == 1  # one cache for the search and the training
    assert off["lr_search"] is None and off["config"]["lr"] == 5e-3
    on = TrainRecord.read(stage_runs / "on.json")
    assert [c["lr"] for c in on.lr_search["candidates"]] == [2.5e-3, 5e-3, 1e-2]
    assert on.config["lr"] == on.lr_search["chosen_lr"] and on.steps == off["steps"]
    audit = AuditRecord.read(stage_runs / "audit/probe.json")
    scalars, curves = training_metrics(audit, on)
    assert scalars["lr_search.chosen_lr"] == on.lr_search["chosen_lr"]
    cands = on.lr_search["candidates"]
    assert curves["lr_search.val_accuracy"] == [(i, c["val_accuracy"]) for i, c in enumerate(cands)]
    off_scalars, off_curves = training_metrics(audit, TrainRecord.read(stage_runs / "metrics/train/probe.json"))
    assert not [k for k in [*off_scalars, *off_curves] if k.startswith("lr_search")]


def test_mlflow_gets_the_search_in_the_variant_run(stage_runs, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from depthtune import mlflow_runs, mlflow_store, tracking
    from depthtune.config import TrackingConfig

    monkeypatch.delenv(mlflow_runs.PIPELINE_KEY_ENV, raising=False)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"),
                         experiment="t")
    on = TrainRecord.read(stage_runs / "on.json")
    rid = tracking.variant_run_id(cfg, "probe", root=stage_runs)
    rec = tracking.log_variant_training(cfg, "probe", audit_result=AuditRecord.read(stage_runs / "audit/probe.json"),
                                        train_result=on, model_dir=stage_runs / "models/probe-on", params_flat={},
                                        resolved_config={}, run_id=rid, root=stage_runs, log_model=False)
    assert rec["logged"], rec
    client = MlflowClient(mlflow_store.tracking_uri(cfg))
    history = client.get_metric_history(rid, "lr_search.val_accuracy")
    cands = on.lr_search["candidates"]
    assert [(m.step, m.value) for m in history] == [(i, c["val_accuracy"]) for i, c in enumerate(cands)]
    assert client.get_run(rid).data.metrics["lr_search.chosen_lr"] == on.lr_search["chosen_lr"]
    assert {a.path for a in client.list_artifacts(rid, "train")} == {"train/lr_search.json"}
    runs = client.search_runs([client.get_run(rid).info.experiment_id])
    assert sorted(r.data.tags.get("depthtune.role") for r in runs) == ["pipeline", "variant"]  # no nested runs
