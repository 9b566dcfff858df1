"""Promotion against a real MLflow registry on a SQLite file.

Models are tiny BERTs whose classifier weight is zero, so each always predicts one
label: accuracy is then the share of that label in the test data, which lets the
test steer "better" and "worse" exactly, and shows the champion being re-scored on
NEW test data rather than trusted on its old metrics.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from depthtune.config import RegistryConfig, TrackingConfig
from depthtune.errors import DepthtuneError
from depthtune.records import AuditRecord, TrainRecord
from tests.tracking.test_promotion_steps import eval_record  # one builder each
from tests.tracking.test_tracking import make_model, train_result

pytestmark = pytest.mark.timeout(400)

LABELS = ["rotten", "fresh"]
ROTTEN, FRESH = 0, 1
NAME = "depthtune-test"


def write_test_data(root: Path, n_fresh: int, n_rotten: int, labels=LABELS) -> None:
    d = root / "data" / "prepared"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"review number {i}", "label": FRESH if i < n_fresh else ROTTEN} for i in range(n_fresh + n_rotten)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "labels.json").write_text(json.dumps({"names": list(labels)}))


def train_variant(root: Path, cfg: TrackingConfig, variant: str, favour: int, accuracy: float, labels=LABELS,
                  seed: int = 0, trainable: int = 1000) -> str:
    """What finetune + evaluation leave behind: model folder, audit/train/eval JSONs, an MLflow run with the model."""
    from depthtune.tracking import log_runs as tracking

    model_dir = make_model(root / "models" / variant, labels=labels, favour=favour, seed=seed)
    audit = {"schema": "depthtune.audit/1", "variant": variant, "description": "full fine-tuning",
             "architecture": {"model_type": "bert", "num_layers": 2, "hidden_size": 32, "num_labels": len(labels)},
             "total_params": 2000, "trainable_params": trainable, "trainable_fraction": trainable / 2000,
             "adapter_params": 0, "layers": [{"name": "embeddings", "total": 1000, "trainable": 0, "adapter": 0},
                                             {"name": "head", "total": 1000, "trainable": trainable, "adapter": 0}],
             "buckets": [], "estimates": {"memory_bytes": {"total": 123}, "flops_per_token": {"train": 1}}}
    run_id = tracking.variant_run_id(cfg, variant, root=root)
    train = train_result(variant, audit, run_id=run_id, steps=4)
    rec = tracking.log_variant_training(cfg, variant, audit_result=AuditRecord.from_dict(audit),
                                        train_result=TrainRecord.from_dict(train), model_dir=model_dir,
                                        params_flat={"variant": variant}, resolved_config={}, run_id=run_id, root=root)
    assert rec["logged"], rec
    ev = eval_record(variant, accuracy, labels)
    for sub, obj in (("audit", audit), ("metrics/train", train), ("metrics/eval", ev)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / f"{variant}.json").write_text(json.dumps(obj))
    return run_id


def only_variant(root: Path, variant: str) -> None:
    """Keep just one variant's eval file: each round of the test has one candidate."""
    for f in (root / "metrics" / "eval").glob("*.json"):
        if f.stem != variant:
            f.unlink()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_root=str(tmp / "mlartifacts"),
                         experiment="reg")
    return tmp, cfg


def test_refusals_without_a_store(tmp_path):
    from depthtune.tracking.registry import promote

    reg = RegistryConfig(model_name=NAME)
    with pytest.raises(DepthtuneError, match="no candidate metrics"):
        promote(reg, TrackingConfig(), root=tmp_path)
    (tmp_path / "metrics" / "eval").mkdir(parents=True)
    ev = eval_record("full")
    del ev["accuracy"]
    (tmp_path / "metrics" / "eval" / "full.json").write_text(json.dumps(ev))
    with pytest.raises(DepthtuneError, match="full.json: missing `accuracy`"):
        promote(reg, TrackingConfig(), root=tmp_path)


def test_champion_challenger_promotion(env, monkeypatch, capsys):
    import mlflow

    from depthtune.tracking.registry import promote, registry_state

    tmp, cfg = env
    root = tmp / "proj"
    reg = RegistryConfig(model_name=NAME, metric="accuracy", min_delta=0.005, min_metric=0.2)
    timings = {}

    # run 1: 7 fresh / 3 rotten; r1 always says fresh -> 0.7 -> first champion
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "run-1")
    write_test_data(root, n_fresh=7, n_rotten=3)
    train_variant(root, cfg, "r1", FRESH, 0.7)
    rep1 = promote(reg, cfg, root=root)
    assert rep1["decision"] == "promoted" and rep1["candidate"]["version"] == "1", rep1
    assert rep1["candidate"]["rescored"]["accuracy"] == pytest.approx(0.7)
    timings["register"], timings["alias"] = rep1["timings_s"]["register"], rep1["timings_s"]["alias"]

    # run 2: same data; r2 always says rotten -> 0.3 < 0.7 -> challenger, champion stays v1
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "run-2")
    train_variant(root, cfg, "r2", ROTTEN, 0.3, seed=2)
    only_variant(root, "r2")
    rep2 = promote(reg, cfg, root=root)
    assert rep2["decision"] == "challenger", rep2
    assert rep2["champion_before"]["version"] == "1" and rep2["champion_before"]["variant"] == "r1"
    assert rep2["champion_before"]["rescored"]["accuracy"] == pytest.approx(0.7)
    assert rep2["aliases_after"] == {"champion": "1", "challenger": "2"}
    assert "-0.4000, McNemar p=" in rep2["reason"] and rep2["reason"].endswith("not better")
    # all 10 texts discordant, 7 for the champion: p = 2 P(Bin(10, 1/2) <= 3) = 2 * 176 / 1024
    assert rep2["paired_test"] == {"test": "McNemar", "p_value": pytest.approx(352 / 1024), "alpha": 0.05}

    # run 3: the data changed (2 fresh / 18 rotten); r3 always says rotten -> 0.9, and v1 RE-SCORED now -> 0.1;
    # the 20 texts all discordant, 18 for r3: McNemar p = 2 (1 + 20 + 190) / 2^20 = 0.0004 < alpha
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "run-3")
    write_test_data(root, n_fresh=2, n_rotten=18)
    train_variant(root, cfg, "r3", ROTTEN, 0.9, seed=3)
    only_variant(root, "r3")
    rep3 = promote(reg, cfg, root=root)
    assert rep3["decision"] == "promoted", rep3
    assert rep3["champion_before"]["version"] == "1"
    assert rep3["champion_before"]["rescored"]["accuracy"] == pytest.approx(0.1)  # not its old 0.7
    assert rep3["paired_test"]["p_value"] == pytest.approx(2 * 211 / 2 ** 20)
    assert "significantly better at alpha 0.05" in rep3["reason"]
    assert rep3["aliases_after"] == {"champion": "3", "challenger": "2"}

    # the DVC stage, again with nothing new: the same version is reused, nothing moves
    from stages.promote import main as promote_stage

    (root / "params.yaml").write_text(
        f"variants: {{r3: {{}}}}\nregistry: {{model_name: {NAME}, min_delta: 0.005, min_metric: 0.2}}\n"
        f"tracking: {{uri: '{cfg.uri}', artifact_root: '{cfg.artifact_root}', experiment: reg}}\n")
    monkeypatch.chdir(root)
    rep4 = promote_stage([])
    assert rep4["decision"] == "unchanged" and rep4["candidate"]["version"] == "3"
    assert rep4["candidate"]["newly_registered"] is False
    assert json.loads((root / "reports" / "promotion.json").read_text())["decision"] == "unchanged"

    state = registry_state(cfg, NAME)
    assert state["champion"] == "3" and state["challenger"] == "2"
    assert [v["version"] for v in state["versions"]] == ["1", "2", "3"]
    assert state["versions"][1]["promotion"].startswith("challenger:")
    assert state["versions"][2]["promotion"].startswith("promoted:")

    from mlflow import MlflowClient

    client = MlflowClient(cfg.uri)
    v1, v3 = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "3")
    assert v1.tags["depthtune.replaced_by"] == "3"
    for key in ("depthtune.variant", "depthtune.depth", "depthtune.trainable_params", "depthtune.total_params",
                "depthtune.eval.accuracy", "depthtune.git_commit", "depthtune.dvc_lock_hash",
                "depthtune.data_fingerprint", "depthtune.labels"):
        assert v3.tags.get(key), key
    assert v3.tags["depthtune.variant"] == "r3" and "r3: full fine-tuning" in v3.description

    # the served champion predicts label names
    t0 = time.perf_counter()
    preds = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["a great film"])
    timings["load_predict"] = time.perf_counter() - t0
    assert list(preds) == ["rotten"]
    # and `depthtune predict` reads the same alias (the store from params.yaml in the working directory)
    from depthtune.cli import main as cli

    assert cli(["predict", "--json", "--model", f"models:/{NAME}@champion", "a great film"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["label"] == "rotten" and out["text"] == "a great film"
    print(f"\nregistry state: {json.dumps(state)}\ntimings: {timings}")


def test_label_mapping_mismatch_is_refused(env, monkeypatch):
    from depthtune.tracking.registry import promote, registry_state

    tmp, cfg = env
    root = tmp / "relabelled"
    before = registry_state(cfg, NAME)
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "run-relabel")
    new_labels = ["negative", "positive"]
    write_test_data(root, n_fresh=2, n_rotten=8, labels=new_labels)
    train_variant(root, cfg, "relabel", ROTTEN, 0.9, labels=new_labels)
    with pytest.raises(DepthtuneError, match="label mapping differs from champion v3"):
        promote(RegistryConfig(model_name=NAME, min_metric=0.2), cfg, root=root)
    assert registry_state(cfg, NAME) == before  # nothing registered, no alias moved


def test_candidate_that_fails_to_load_is_refused(env, monkeypatch):
    import mlflow

    from depthtune.tracking import store as mlflow_store
    from depthtune.tracking.runs import TAG_MODEL_URI
    from depthtune.tracking.registry import promote, registry_state

    tmp, cfg = env
    root = tmp / "broken"
    before = registry_state(cfg, NAME)
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "run-broken")
    write_test_data(root, n_fresh=2, n_rotten=8)
    run_id = train_variant(root, cfg, "broken", ROTTEN, 0.95)
    mlflow_store.use_store(cfg)
    model_uri = mlflow.MlflowClient(cfg.uri).get_run(run_id).data.tags[TAG_MODEL_URI]
    location = mlflow.get_logged_model(model_uri.split("/")[-1]).artifact_location
    for f in Path(location.removeprefix("file://")).rglob("model.safetensors"):
        f.unlink()
    with pytest.raises(DepthtuneError, match="candidate broken fails to load back"):
        promote(RegistryConfig(model_name=NAME, min_metric=0.2), cfg, root=root)
    assert registry_state(cfg, NAME) == before


def test_unreachable_store_is_refused(tmp_path):
    import socket

    from depthtune.tracking.registry import promote

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_test_data(tmp_path, 5, 5)
    (tmp_path / "metrics" / "eval").mkdir(parents=True)
    (tmp_path / "metrics" / "eval" / "full.json").write_text(json.dumps(eval_record("full", 0.9)))
    (tmp_path / "metrics" / "train").mkdir(parents=True)
    train = train_result("full", {"total_params": 2000, "trainable_params": 2000}, run_id="x")
    (tmp_path / "metrics" / "train" / "full.json").write_text(json.dumps(train))
    t0 = time.perf_counter()
    with pytest.raises(DepthtuneError, match="tracking store unreachable at http://127.0.0.1"):
        promote(RegistryConfig(model_name=NAME), TrackingConfig(uri=f"http://127.0.0.1:{port}"), root=tmp_path)
    assert time.perf_counter() - t0 < 20


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from depthtune.config import RegistryConfig, TrackingConfig
    from depthtune.tracking.registry import promote
    root, uri, art, go = sys.argv[1:5]
    while not Path(go).exists():
        time.sleep(0.05)
    cfg = TrackingConfig(uri=uri, artifact_root=art, experiment="reg")
    rep = promote(RegistryConfig(model_name="race-model", min_delta=0.005, min_metric=0.05), cfg, root=Path(root))
    print("REPORT " + json.dumps({"decision": rep["decision"], "version": rep["candidate"]["version"]}))
""")


def test_two_concurrent_promotions_stay_consistent(env, monkeypatch):
    """Champion v1 (0.1); two candidates (0.9 each, significantly better: McNemar p = 0.02) promote
    at once from two processes.

    Serialised, the first is promoted and the second, now compared with it (0.9 vs 0.9),
    becomes challenger. Unserialised, both would read v1 and both claim the champion.
    """
    from depthtune.tracking.registry import promote, registry_state

    tmp, cfg = env
    reg = RegistryConfig(model_name="race-model", min_delta=0.005, min_metric=0.05)
    base = tmp / "race0"
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "race-0")
    write_test_data(base, n_fresh=1, n_rotten=9)
    train_variant(base, cfg, "c0", FRESH, 0.1)
    assert promote(reg, cfg, root=base)["decision"] == "promoted"
    roots = []
    for i in (1, 2):
        root = tmp / f"race{i}"
        monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", f"race-{i}")
        write_test_data(root, n_fresh=1, n_rotten=9)
        train_variant(root, cfg, f"c{i}", ROTTEN, 0.9, seed=i)
        roots.append(root)
    go = tmp / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), cfg.uri, cfg.artifact_root, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in roots]
    time.sleep(6)  # let both import mlflow/torch and wait at the line
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:]))
    decisions = sorted(r["decision"] for r in results)
    assert decisions == ["challenger", "promoted"], results
    winner = next(r["version"] for r in results if r["decision"] == "promoted")
    loser = next(r["version"] for r in results if r["decision"] == "challenger")
    state = registry_state(cfg, "race-model")
    assert state["champion"] == winner and state["challenger"] == loser
    assert len(state["versions"]) == 3 and {winner, loser} == {"2", "3"}


def test_a_rival_still_rising_holds_the_promotion_back_unless_told(tmp_path, monkeypatch):
    """r1 is ahead (0.9 vs 0.5 on 10 texts), but r2 was cut by its budget while its validation curve still rose
    fast enough to pass r1 in another max_epochs: no version is registered, no alias moves, the report says why.
    registry.promote_unsettled: true promotes anyway; a rival too slow to catch up does not hold anything."""
    from depthtune.tracking.registry import promote, registry_state

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"),
                         experiment="held")
    monkeypatch.setenv("DEPTHTUNE_PIPELINE_KEY", "held-1")
    write_test_data(tmp_path, n_fresh=9, n_rotten=1)
    train_variant(tmp_path, cfg, "r1", FRESH, 0.9)
    train_variant(tmp_path, cfg, "r2", ROTTEN, 0.5, seed=2)
    path = tmp_path / "metrics" / "train" / "r2.json"
    rec = json.loads(path.read_text())
    rising = {"window": 4, "before_step": 100, "before": 0.40, "within_step": 200, "within": 0.50, "gain": 0.10,
              "p": 0.001, "alpha": 0.05, "rate_per_step": 0.001, "rising": True}
    path.write_text(json.dumps({**rec, "not_converged": True, "convergence": "still rising", "rise": rising,
                                "horizon_steps": 1000}))
    reg = RegistryConfig(model_name=NAME, min_metric=0.2)
    held = promote(reg, cfg, root=tmp_path)
    assert held["decision"] == "held" and held["reason"].startswith("r1 is ahead, but not converged"), held
    assert held["candidate"]["variant"] == "r1" and "version" not in held["candidate"]
    assert "r2: its validation curve, still rising" in held["reason"] and "registry untouched" in held["reason"]
    with pytest.raises(Exception, match="not found|RESOURCE_DOES_NOT_EXIST"):
        registry_state(cfg, NAME)  # nothing was registered
    told = promote(RegistryConfig(model_name=NAME, min_metric=0.2, promote_unsettled=True), cfg, root=tmp_path)
    assert told["decision"] == "promoted" and told["unsettled"] == held["unsettled"]
    assert registry_state(cfg, NAME)["champion"] == "1"
    # too slow: 0.5 + 1e-5 x 1,000 steps = 0.51, and its interval [0.3, 0.5] stops short of 0.9: nothing held
    path.write_text(json.dumps({**json.loads(path.read_text()), "rise": {**rising, "rate_per_step": 1e-5}}))
    again = promote(reg, cfg, root=tmp_path)
    assert again["decision"] == "unchanged" and again["unsettled"] == []
