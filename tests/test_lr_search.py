"""train.lr_search on a tiny random-init BERT (hidden 32, 4 layers): candidates, determinism, the
validation split only, one prefix cache for every candidate, and the finetune stage's record."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import time

import pytest
import torch
import yaml

from depthtune.training import loop as training
from depthtune.errors import ConfigError
from depthtune.config import FIXED_BUDGET, LrSearch, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.training.lr_search import KEEP, candidate_lrs, ranked, rung_steps, search_and_train
from depthtune.training import prefix_cache
from depthtune.training.prefix_cache import PrefixCache
from depthtune.records import AuditRecord, TrainRecord
from depthtune.tracking.log_runs import training_metrics
from depthtune.model.variants import build_variant
from tests.conftest import TINY_ARCH, in_project, run_stages, tiny_params

MODEL = parse_section(ModelConfig, {"source": "scratch", "scratch": TINY_ARCH}, "model")
# 96 texts / batch 8 = 12 steps an epoch, validated after steps 6, 12, 18, 24 (2 an epoch, 2 epochs):
# rung 0 ends at the 1st evaluation (step 6, 5 candidates), rung 1 at the 3rd (step 18, the best 2)
CFG = TrainConfig(convergence=FIXED_BUDGET, epochs=2, batch_size=8, lr=1e-3, checkpoint_every=0, seed=7, evals_per_epoch=2, patience=0,
                  lr_search=LrSearch(enabled=True, first_rung=1))
QUIET = dict(metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=lambda s: None)


def build(raw: dict):
    spec = parse_variant("v", raw, "variants.v")
    return spec, build_variant(MODEL, spec, 2, device="cpu", seed=0)


def search(spec, built, data, cfg=CFG, caches=(None, None), **kw):
    train_ex, val_ex = data
    return search_and_train(built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                            cfg=cfg, caches=caches, fingerprint_for=lambda c: f"fp-{c.lr}", extra_meta={},
                            **QUIET, **kw)


def without_seconds(result: dict) -> dict:
    return {**result, "seconds": None,
            "candidates": [{k: v for k, v in c.items() if k != "seconds"} for c in result["candidates"]]}


def test_config_defaults_and_bad_factors_are_one_line_errors():
    assert TrainConfig().lr_search == LrSearch(enabled=False, factors=[0.25, 0.5, 1.0, 2.0, 4.0], first_rung=1)
    assert parse_section(TrainConfig, {"lr_search": {"factors": [1, 3]}}, "train").lr_search.factors == (1, 3)
    for bad in ([], [0.5, 0], [1, 1], ["x"]):
        with pytest.raises(ConfigError, match=r"^train\.lr_search\.factors"):
            parse_section(TrainConfig, {"lr_search": {"factors": bad}}, "train")
    assert candidate_lrs(8e-5, [4.0, 0.25, 1.0]) == [2e-05, 8e-05, 3.2e-04]


def test_rungs_end_at_evaluations_that_triple():
    assert rung_steps(CFG, 96) == [6, 18]
    # the default run: 2,000 texts / 16 = 125 steps an epoch, 8 epochs at most -> evaluations 1, 3, 9
    default = TrainConfig(lr=8e-5)
    assert rung_steps(default, 2000) == [63, 188, 563]
    assert rung_steps(dataclasses.replace(CFG, lr_search=LrSearch(first_rung=2)), 96) == [12]
    assert rung_steps(dataclasses.replace(CFG, epochs=1, evals_per_epoch=1), 96) == [12]


def test_the_configured_lr_survives_every_rung_but_the_last():
    from depthtune.training.lr_search import survivors

    class Run:
        def __init__(self, lr):
            self.lr = lr

    runs = [Run(lr) for lr in (1.6e-4, 3.2e-4, 2e-5, 4e-5, 8e-5)]  # ranked: the configured 8e-5 last
    assert [r.lr for r in survivors(runs, 8e-5, last_rung=False)] == [1.6e-4, 3.2e-4, 8e-5]
    assert [r.lr for r in survivors(runs, 8e-5, last_rung=True)] == [1.6e-4, 3.2e-4]
    assert [r.lr for r in survivors(runs[:2], 3.2e-4, last_rung=False)] == [1.6e-4, 3.2e-4]
    assert [r.lr for r in survivors(runs[:3], 1.6e-4, last_rung=False)] == [1.6e-4]  # already kept: not twice


def test_ranking_is_by_best_validation_then_the_configured_lr_then_the_smaller():
    class Run:  # what ranked() reads of a candidate: its lr and its best validation score
        def __init__(self, lr, best):
            self.lr, self.best = lr, best

        def score(self):
            return self.best

    runs = [Run(4e-3, 0.8), Run(1e-3, 0.8), Run(2e-3, 0.7), Run(8e-3, 0.6)]
    assert [r.lr for r in ranked(runs, configured=2e-3)] == [1e-3, 4e-3, 2e-3, 8e-3]
    assert [r.lr for r in ranked(runs, configured=4e-3)][:2] == [4e-3, 1e-3]  # tied with the best: the default
    assert KEEP == 3


def test_successive_halving_then_the_winner_trains_on_exactly_as_a_plain_run_at_its_lr(data):
    spec, built = build({})
    out, cfg, result = search(spec, built, data)
    cands = result["candidates"]
    assert [c["lr"] for c in cands] == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3] and result["rungs"] == [6, 18]
    # 5 -> the best 2 and the configured lr (1e-3) -> 1
    rung1 = [c["lr"] for c in cands if c["rung"] == 1]
    assert 1e-3 in rung1 and len(rung1) in (2, 3) and sorted(c["rung"] for c in cands).count(0) == 5 - len(rung1)
    assert sorted(c["steps"] for c in cands) == [6] * (5 - len(rung1)) + [18] * len(rung1) and out.steps == 24
    assert result["chosen_lr"] == cfg.lr and result["extra_steps"] == 6 * (5 - len(rung1)) + 18 * (len(rung1) - 1)
    second = [c for c in cands if c["rung"] == 1]
    leader = max(second, key=lambda c: (c["val_accuracy"], c["lr"] == CFG.lr, -c["lr"]))
    assert leader["lr"] == result["best_on_validation"]
    # the leader replaces the configured lr only when significantly better on the validation texts
    p = result["p_vs_configured"]
    assert (p is None) == (leader["lr"] == CFG.lr)
    assert result["chosen_lr"] == (leader["lr"] if p is not None and p < 0.05 else CFG.lr)
    assert result["at_edge"] == (result["chosen_lr"] in (2.5e-4, 4e-3))
    # the winner's run is the real run: a plain train() at the chosen lr gives the same curves, bit for bit
    train_ex, val_ex = data
    _, fresh = build({})
    plain = training.train(model=fresh.model, spec=spec, num_layers=fresh.num_layers, train_ex=train_ex,
                           val_ex=val_ex, cfg=cfg, **QUIET)
    assert out.loss_curve == plain.loss_curve and out.val_curve == plain.val_curve and out.steps == plain.steps
    assert all(torch.equal(a, b) for a, b in zip(built.model.state_dict().values(), fresh.model.state_dict().values()))
    # the winner's training time is its own: its rungs and its run on, not the other candidates' time
    _, timed = build({})
    t0 = time.perf_counter()
    timed_out, _, timed_result = search(spec, timed, data, cfg=dataclasses.replace(CFG, checkpoint_every=5))
    finish_s = time.perf_counter() - t0 - timed_result["seconds"]
    own = next(c["seconds"] for c in timed_result["candidates"] if c["lr"] == timed_result["chosen_lr"])
    assert timed_out.train_time_s <= own + finish_s
    # deterministic
    _, again = build({})
    assert without_seconds(search(spec, again, data)[2]) == without_seconds(result)


def test_without_the_gate_the_validation_leader_wins_and_with_it_a_small_lead_keeps_the_prior(data):
    spec, built = build({})
    open_cfg = dataclasses.replace(CFG, lr_search=LrSearch(enabled=True, alpha=1.0))
    _, cfg, result = search(spec, built, data, cfg=open_cfg)
    assert result["chosen_lr"] == result["best_on_validation"] == cfg.lr and result["p_vs_configured"] is None
    # 32 validation texts: no lead is significant at a tiny alpha, so the configured lr stays
    _, strict = build({})
    _, cfg, gated = search(spec, strict, data, cfg=dataclasses.replace(CFG, lr_search=LrSearch(enabled=True,
                                                                                             alpha=1e-9)))
    assert gated["best_on_validation"] == result["best_on_validation"] and gated["chosen_lr"] == CFG.lr == cfg.lr
    assert (gated["p_vs_configured"] is None) == (result["best_on_validation"] == CFG.lr)


def test_only_the_validation_split_is_scored(data):
    """search_and_train cannot be given a test split; a candidate's score is its run's validation curve."""
    assert not any("test" in name for name in inspect.signature(search_and_train).parameters)
    spec, built = build({"depth": 2})
    out, _, result = search(spec, built, data, cfg=dataclasses.replace(CFG, lr_search=LrSearch(factors=[1.0, 4.0])))
    assert len(result["candidates"]) == 2 and result["rungs"] == [6]  # 2 candidates: one cut, after rung 0
    assert max(p["accuracy"] for p in out.val_curve) == out.best_val["accuracy"]


def test_a_train_top_variant_caches_its_prefix_once_for_every_candidate_and_the_training(data, monkeypatch):
    built_caches = []

    class CountingCache(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built_caches.append(self)

    monkeypatch.setattr(prefix_cache, "PrefixCache", CountingCache)
    spec, built = build({"train_top": 1})
    train_ex, val_ex = data
    caches = prefix_cache.prefix_caches(built.model, spec, built.num_layers, train_ex, val_ex, CFG, device="cpu",
                                    pad_id=0, log=lambda s: None)
    out, _, result = search(spec, built, data, caches=caches)
    assert len(result["candidates"]) == 5 and len(built_caches) == 2  # train + validation, once
    assert out.cached_prefix_layers == 3


@pytest.fixture(scope="module")
def stage_runs(shared_data, tmp_path_factory):
    """The finetune stage of a tiny probe project, run with the search off and on (tracking off)."""
    from stages import finetune

    project = tmp_path_factory.mktemp("project")
    params = tiny_params(shared_data, variants={"probe": {"train_top": 0, "train": {"lr": 5e-3}}},
                         tracking={"enabled": False})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # 240 texts / 16 = 15 steps an epoch, validated at each end: 3 candidates to step 15, the winner on to 30
    params["train"]["lr_search"] = {"enabled": True, "factors": [0.5, 1.0, 2.0], "first_rung": 1}
    (project / "params-on.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = {"off": io.StringIO(), "on": io.StringIO()}
    with contextlib.redirect_stdout(out["off"]):
        run_stages(project, ["probe"], evaluate=False)
    with in_project(project), contextlib.redirect_stdout(out["on"]):
        finetune.main(["--variant", "probe", "--params", "params-on.yaml", "--metrics", "on.json",
                       "--model", "models/probe-on", "--loss-plot", "on.csv"])
    project.joinpath("off.log").write_text(out["off"].getvalue())
    project.joinpath("on.log").write_text(out["on"].getvalue())
    return project


def test_finetune_stage_records_the_search_only_when_enabled(stage_runs):
    off = json.loads((stage_runs / "metrics/train/probe.json").read_text())
    assert "lr search" not in (stage_runs / "off.log").read_text()
    log = (stage_runs / "on.log").read_text()
    assert log.count("lr search, rung 0 (to step 15): lr ") == 1 and log.count("lr search: chose lr") == 1
    assert log.count("cached frozen prefix") == 1  # one cache for the search and the training
    assert off["lr_search"] is None and off["config"]["lr"] == 5e-3
    on = TrainRecord.read(stage_runs / "on.json")
    assert [c["lr"] for c in on.lr_search["candidates"]] == [2.5e-3, 5e-3, 1e-2]
    assert on.config["lr"] == on.lr_search["chosen_lr"] and on.steps == off["steps"] == 30
    assert on.lr_search["extra_steps"] == 2 * 15 and on.lr_search["rungs"] == [15]
    audit = AuditRecord.read(stage_runs / "audit/probe.json")
    scalars, curves = training_metrics(audit, on)
    assert scalars["lr_search.chosen_lr"] == on.lr_search["chosen_lr"]
    cands = on.lr_search["candidates"]
    assert curves["lr_search.val_accuracy"] == [(i, c["val_accuracy"]) for i, c in enumerate(cands)]
    off_scalars, off_curves = training_metrics(audit, TrainRecord.read(stage_runs / "metrics/train/probe.json"))
    assert not [k for k in [*off_scalars, *off_curves] if k.startswith("lr_search")]


def test_mlflow_gets_the_search_in_the_variant_run(stage_runs, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from depthtune.tracking import runs as mlflow_runs

    from depthtune.tracking import store as mlflow_store

    from depthtune.tracking import log_runs as tracking
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


def test_a_stage_killed_after_the_search_resumes_the_winner_without_searching_again(stage_runs):
    """SIGKILL in the winner's run (step 20, after the checkpoint at 18); the re-run resumes it at its lr."""
    import os
    import subprocess
    import sys

    from depthtune.layout import PROJECT_ROOT

    params = yaml.safe_load((stage_runs / "params-on.yaml").read_text())
    params["train"]["checkpoint_every"] = 6
    (stage_runs / "params-kill.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "stages.finetune", "--variant", "probe", "--params", "params-kill.yaml",
           "--metrics", "kill.json", "--model", "models/probe-kill", "--loss-plot", "kill.csv"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "DEPTHTUNE_FAULT_KILL_AT_STEP": "probe:20"}
    killed = subprocess.run(cmd, cwd=stage_runs, env=env, capture_output=True, text=True)
    assert killed.returncode == -9 and "lr search: chose lr" in killed.stdout
    env.pop("DEPTHTUNE_FAULT_KILL_AT_STEP")
    resumed = subprocess.run(cmd, cwd=stage_runs, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "lr search" not in resumed.stdout and "(step 18, " in resumed.stdout
    on, kill = TrainRecord.read(stage_runs / "on.json"), TrainRecord.read(stage_runs / "kill.json")
    assert kill.lr_search["chosen_lr"] == on.lr_search["chosen_lr"] == kill.config["lr"]
    assert kill.resumed_from_step == 18 and [p["accuracy"] for p in kill.val_curve] == [p["accuracy"] for p in on.val_curve]
