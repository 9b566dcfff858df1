"""Faults injected into real `dvc repro` runs of a tiny project, compared with an uninterrupted run.

Two copies of the same tiny project (random-init 4-layer BERT, 240 SST-2 phrases, variants
`full` and `probe`, checkpoints every 4 of 30 steps, CPU, one thread, same seed) run side by side
(two chains, one per core):

  ref     a clean `dvc repro`; then the faults that must leave earlier outputs alone: prepare
          SIGKILLed mid-write with outputs present, a full disk (RLIMIT_FSIZE: tests run as root,
          so chmod would not stop a write) in prepare and in finetune, a file where a folder belongs
  killed  1. `prepare` SIGKILLed half-way through writing train.jsonl (no earlier output)
          2. `prepare` again; `tokenization` SIGKILLed half-way through writing report.json
          3. `dvc repro` with DEPTHTUNE_FAULT_KILL_AT_STEP=full:10: finetune@full dies after step 10
          4. finetune@full resumes from checkpoint 8 and is SIGKILLed half-way through writing checkpoint 15
          5. `dvc repro`: resumes from checkpoint 12 and finishes the pipeline (MLflow on, a token in the env)

The killed project must end with the same models (bit for bit), metrics and loss curves as `ref`.
Stages run without Prefect (DEPTHTUNE_PREFECT=0): Prefect is not what is under test here.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import make_project, project_env, tiny_params
from tests.reliability._util import (assert_one_line_error, injected, leftovers, lock_outs, rlimit_fsize, run,
                                     snapshot, stable, stage)

pytestmark = pytest.mark.timeout(900)

VARIANTS = {"full": {}, "probe": {"train_top": 0, "train": {"lr": 5e-3}}}
TOKEN = "hf_" + "R3liab1lityT0ken" * 2  # put in the environment of the final run; must never reach MLflow
UP_TO_DATE = "Data and pipelines are up to date"


def project_params(shared, tracking: bool) -> dict:
    return tiny_params(shared, variants=VARIANTS, train={"checkpoint_every": 4}, tracking={"enabled": tracking})


def checkpoints(project: Path, variant: str) -> list[str]:
    root = project / "checkpoints" / variant
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def dvc(project: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, env, timeout=900)


def truncated_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8", errors="replace"))
        return False
    except ValueError:
        return True


def ref_chain(ref: Path, env: dict) -> dict:
    """The clean run, then the faults that must keep its outputs (recorded; asserted by the tests)."""
    rec: dict = {}
    p = dvc(ref, env, "repro")
    rec["repro"] = p
    if p.returncode != 0:
        return rec
    data = ref / "data/prepared"
    before = snapshot(data)
    # prepare SIGKILLed half-way through train.jsonl, with earlier outputs present
    p = injected("write:train.jsonl", "stages.prepare", cwd=ref, env=env)
    rec["kill_with_outputs"] = SimpleNamespace(rc=p.returncode, unchanged=snapshot(data) == before,
                                               leftovers=leftovers(ref / "data", "prepared"),
                                               status=dvc(ref, env, "status"))
    p = stage("prepare", cwd=ref, env=env)  # the next run: removes the dead writer's temp copy, same bytes
    rec["prepare_after_kill"] = SimpleNamespace(rc=p.returncode, err=p.stderr, unchanged=snapshot(data) == before,
                                                leftovers=leftovers(ref / "data", "prepared"))
    # a full disk: prepare (4 KB files), then finetune (training fits, the 4 MB model.safetensors does not)
    p = stage("prepare", cwd=ref, env=env, preexec_fn=rlimit_fsize(4096))
    rec["disk_full_prepare"] = SimpleNamespace(proc=p, unchanged=snapshot(data) == before,
                                               leftovers=leftovers(ref / "data", "prepared"))
    outs = (ref / "models/probe", ref / "metrics/train/probe.json", ref / "plots/loss/probe.csv")
    before_ft = snapshot(*outs)
    p = stage("finetune", "--variant", "probe", cwd=ref, env=env, preexec_fn=rlimit_fsize(1 << 20))
    rec["disk_full_finetune"] = SimpleNamespace(proc=p, unchanged=snapshot(*outs) == before_ft,
                                                leftovers=leftovers(ref / "models", "probe"),
                                                status=dvc(ref, env, "status"))
    shutil.rmtree(ref / "checkpoints/probe", ignore_errors=True)
    # a file where a folder belongs, and a file where the output folder itself belongs
    report = ref / "reports/comparison.md"
    before_md = snapshot(report)
    rec["file_as_parent"] = stage("prepare", "--out", "reports/comparison.md/prepared", cwd=ref, env=env)
    rec["file_as_out"] = stage("prepare", "--out", "reports/comparison.md", cwd=ref, env=env)
    rec["file_unchanged"] = snapshot(report) == before_md
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("faults")
    ref = make_project(base / "ref", project_params(shared_data, tracking=False))
    k = make_project(base / "killed", project_params(shared_data, tracking=True))
    ref_env, env = project_env(ref, DEPTHTUNE_PREFECT=0), project_env(k, DEPTHTUNE_PREFECT=0)
    ref_rec: dict = {}

    def ref_thread():
        try:
            ref_rec.update(ref_chain(ref, ref_env))
        except BaseException as exc:  # re-raised in the test thread
            ref_rec["error"] = exc

    thread = threading.Thread(target=ref_thread, daemon=True)
    thread.start()
    rec: dict = {}
    try:
        # 1. prepare killed half-way through train.jsonl, nothing written before
        p = injected("write:train.jsonl", "stages.prepare", cwd=k, env=env)
        left = leftovers(k / "data", "prepared")
        rec["prepare_kill"] = SimpleNamespace(
            rc=p.returncode, prepared_exists=(k / "data/prepared").exists(), leftovers=left,
            partial=[(k / "data" / d / "train.jsonl").stat().st_size for d in left
                     if (k / "data" / d / "train.jsonl").exists()])
        # 2. prepare again (removes what the killed one left); tokenization killed half-way through report.json
        p = stage("prepare", cwd=k, env=env)
        rec["prepare_again"] = SimpleNamespace(rc=p.returncode, err=p.stderr, leftovers=leftovers(k / "data", "prepared"),
                                               size=(k / "data/prepared/train.jsonl").stat().st_size)
        p = injected("write:report.json", "stages.tokenization", cwd=k, env=env)
        left = leftovers(k / "data", "tokenized")
        rec["tokenization_kill"] = SimpleNamespace(
            rc=p.returncode, tokenized_exists=(k / "data/tokenized").exists(), leftovers=left,
            report_truncated=[truncated_json(k / "data" / d / "report.json") for d in left])
        # 3. dvc repro; finetune@full SIGKILLs itself right after optimizer step 10
        p = dvc(k, dict(env, DEPTHTUNE_FAULT_KILL_AT_STEP="full:10"), "repro")
        meta8 = k / "checkpoints/full/checkpoint-00000008/meta.json"
        rec["repro_kill"] = SimpleNamespace(
            rc=p.returncode, out=p.stdout + p.stderr, checkpoints=checkpoints(k, "full"),
            model_exists=(k / "models/full").exists(), metrics_exists=(k / "metrics/train/full.json").exists(),
            data_leftovers=leftovers(k / "data", "prepared") + leftovers(k / "data", "tokenized"),
            run_id=json.loads(meta8.read_text()).get("mlflow_run_id") if meta8.exists() else None)
        if meta8.exists():  # kept for the wrong-variant test
            shutil.copytree(meta8.parent, base / "stash" / meta8.parent.name)
        # 4. resume by hand; SIGKILL half-way through writing checkpoint 15's first file
        p = injected("safetensors:checkpoint-00000015", "stages.finetune", "--variant", "full", cwd=k, env=env)
        tmp15 = [d for d in checkpoints(k, "full") if d.startswith(".tmp-checkpoint-00000015-")]
        rec["checkpoint_kill"] = SimpleNamespace(
            rc=p.returncode, out=p.stdout, checkpoints=checkpoints(k, "full"),
            tmp_files=sorted(f.name for d in tmp15 for f in (k / "checkpoints/full" / d).iterdir()))
        # 5. dvc repro recovers and finishes (MLflow on; a token in the environment)
        p = dvc(k, dict(env, HF_TOKEN=TOKEN), "repro")
        rec["repro_resume"] = SimpleNamespace(rc=p.returncode, out=p.stdout + p.stderr,
                                              checkpoints=checkpoints(k, "full"))
    finally:
        thread.join(timeout=900)
    if "error" in ref_rec:
        raise ref_rec["error"]
    assert ref_rec["repro"].returncode == 0, (ref_rec["repro"].stdout + ref_rec["repro"].stderr)[-4000:]
    assert rec["repro_resume"].rc == 0, rec["repro_resume"].out[-4000:]
    return SimpleNamespace(ref=ref, k=k, ref_env=ref_env, env=env, rec=rec, ref_rec=ref_rec, stash=base / "stash")


def load(project: Path, kind: str, variant: str) -> dict:
    return json.loads((project / "metrics" / kind / f"{variant}.json").read_text())


# ----------------------------------------------------------------------------- kills in the killed project


def test_prepare_and_tokenization_killed_mid_write_leave_nothing_valid_and_the_next_run_recovers(runs):
    r = runs.rec
    pk = r["prepare_kill"]
    assert pk.rc == -9 and not pk.prepared_exists  # no truncated data/prepared, ever
    assert len(pk.leftovers) == 1 and pk.partial and 0 < pk.partial[0] < r["prepare_again"].size  # half a file died with it
    assert r["prepare_again"].rc == 0, r["prepare_again"].err
    assert r["prepare_again"].leftovers == []  # the dead writer's temp copy is removed by the next run
    tk = r["tokenization_kill"]
    assert tk.rc == -9 and not tk.tokenized_exists
    assert len(tk.leftovers) == 1 and tk.report_truncated == [True]
    # dvc repro then rebuilt tokenization (and found nothing half-written to trust)
    assert "Running stage 'tokenization'" in r["repro_kill"].out
    assert r["repro_kill"].data_leftovers == []
    assert lock_outs(runs.k)[("tokenization", "data/tokenized")] == lock_outs(runs.ref)[("tokenization", "data/tokenized")]


def test_sigkill_in_finetune_then_dvc_repro_resumes_with_the_uninterrupted_results(runs):
    rk = runs.rec["repro_kill"]
    assert rk.rc != 0 and "finetune@full" in rk.out
    assert rk.checkpoints == ["checkpoint-00000004", "checkpoint-00000008"]  # step 10 died before its checkpoint
    assert not rk.model_exists and not rk.metrics_exists  # nothing half-written downstream
    assert "resumed from checkpoint-00000008" in runs.rec["checkpoint_kill"].out
    train_k, train_ref = load(runs.k, "train", "full"), load(runs.ref, "train", "full")
    assert train_k["resumed_from_step"] == 12 and train_ref["resumed_from_step"] is None
    assert len(train_k["loss_curve"]) == 30
    assert [(p["step"], p["loss"], p["lr"]) for p in train_k["loss_curve"]] == \
        [(p["step"], p["loss"], p["lr"]) for p in train_ref["loss_curve"]]
    assert train_k["val_curve"] == train_ref["val_curve"]
    assert stable(train_k) == stable(train_ref)
    ev_k, ev_ref = load(runs.k, "eval", "full"), load(runs.ref, "eval", "full")
    for key in ("accuracy", "macro_f1", "confusion_matrix", "per_class"):
        assert ev_k[key] == ev_ref[key], key
    assert stable(ev_k) == stable(ev_ref)
    # the saved model is bit-identical to the uninterrupted run's
    assert lock_outs(runs.k)[("finetune@full", "models/full")] == lock_outs(runs.ref)[("finetune@full", "models/full")]
    assert not (runs.k / "checkpoints/full").exists()  # removed once the variant finished


def test_kill_while_writing_a_checkpoint_is_never_resumed_from(runs):
    ck = runs.rec["checkpoint_kill"]
    assert ck.rc == -9
    complete = [c for c in ck.checkpoints if c.startswith("checkpoint-")]
    partial = [c for c in ck.checkpoints if c.startswith(".tmp-checkpoint-00000015-")]
    assert complete == ["checkpoint-00000008", "checkpoint-00000012"] and len(partial) == 1
    assert ck.tmp_files == ["trainable.safetensors"]  # half of it: the kill hit mid-write
    out = runs.rec["repro_resume"].out
    assert "resumed from checkpoint-00000012" in out  # the half-written checkpoint 15 was skipped


def test_checkpoint_of_another_variant_is_refused_by_the_stage(runs, monkeypatch, capsys):
    """finetune@probe finds a checkpoint of `full` in checkpoints/probe: one line, nothing written.

    Runs the stage's main() through run_main in this process (a subprocess costs ~10 s of imports),
    tracking off so nothing here can reach a store outside the project."""
    import torch

    from depthtune.files import run_main
    from stages import finetune

    k = runs.k
    params = yaml.safe_load((k / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (k / "params-notrack.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(runs.stash, k / "checkpoints/probe")
    outs = (k / "models/probe", k / "metrics/train/probe.json", k / "plots/loss/probe.csv")
    before = snapshot(*outs)
    monkeypatch.chdir(k)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda: finetune.main(["--variant", "probe", "--params", "params-notrack.yaml"]))
    finally:
        torch.set_num_threads(threads)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: checkpoints/probe/checkpoint-00000008: checkpoint is from a different "
                             "variant, config or dataset") and "delete it to start over" in err[0]
    assert snapshot(*outs) == before
    assert checkpoints(k, "probe") == ["checkpoint-00000008"]  # refused, not deleted
    shutil.rmtree(k / "checkpoints/probe")


# ----------------------------------------------------------------------------- reproducibility, provenance


def test_two_clean_runs_with_the_same_seed_give_identical_results(runs):
    ref_out, k_out = lock_outs(runs.ref), lock_outs(runs.k)
    # byte-identical data, audit and models (dvc.lock md5s); finetune@full is the resumed one in `killed`
    for key in [("prepare", "data/prepared"), ("tokenization", "data/tokenized"), ("audit", "audit"),
                ("finetune@probe", "models/probe"), ("finetune@full", "models/full")]:
        assert k_out[key] is not None and k_out[key] == ref_out[key], key
    # result JSON: equal except timing/latency/provenance fields
    for kind in ("train", "eval"):
        assert stable(load(runs.k, kind, "probe")) == stable(load(runs.ref, kind, "probe")), kind
    rows = {p: {r["variant"]: (r["accuracy"], r["macro_f1"], r["trainable_params"])
                for r in json.loads((p / "reports/comparison.json").read_text())["rows"]} for p in (runs.ref, runs.k)}
    assert rows[runs.ref] == rows[runs.k] and set(rows[runs.k]) == {"full", "probe"}


def _mlflow_client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def test_registered_model_tags_identify_code_params_and_data(runs):
    from depthtune.provenance import tree_fingerprint

    k = runs.k
    promo = json.loads((k / "reports/promotion.json").read_text())
    assert promo["decision"] == "promoted", promo
    cand = promo["candidate"]
    mv = _mlflow_client(k).get_model_version("tiny-classifier", cand["version"])
    tags = mv.tags
    head = run(["git", "rev-parse", "HEAD"], k).stdout.strip()
    assert tags["depthtune.git_commit"] == head
    entry = yaml.safe_load((k / "dvc.lock").read_text())["stages"][f"finetune@{cand['variant']}"]
    blob = json.dumps({"deps": entry.get("deps"), "params": entry.get("params")}, sort_keys=True, default=str)
    assert tags["depthtune.dvc_lock_hash"] == hashlib.sha256(blob.encode()).hexdigest()
    # that dvc.lock entry pins the exact params and input data hashes of the registered variant
    recorded = entry["params"]["params.yaml"]
    params = yaml.safe_load((k / "params.yaml").read_text())
    assert recorded["train"] == params["train"] and recorded["model"] == params["model"]
    assert {d["path"] for d in entry["deps"]} >= {"data/tokenized", f"audit/{cand['variant']}.json"}
    assert tags["depthtune.data_fingerprint"] == tree_fingerprint(k / "data/prepared") == \
        tree_fingerprint(runs.ref / "data/prepared")
    assert tags["depthtune.variant"] == cand["variant"]


def test_one_mlflow_run_per_variant_across_the_kills(runs):
    k = runs.k
    run_id = runs.rec["repro_kill"].run_id
    assert run_id and load(k, "train", "full")["mlflow_run_id"] == run_id  # re-attached after each kill
    client = _mlflow_client(k)
    exp = client.get_experiment_by_name("depthtune")
    full_runs = client.search_runs([exp.experiment_id], "tags.`depthtune.variant` = 'full'")
    assert [r.info.run_id for r in full_runs] == [run_id]
    assert full_runs[0].info.status == "FINISHED"


def test_no_token_from_the_environment_reaches_the_tracking_store(runs):
    k = runs.k
    blobs = [(k / "mlflow.db").read_bytes()] + [f.read_bytes() for f in (k / "mlartifacts").rglob("*") if f.is_file()]
    assert len(blobs) > 3  # the store and logged artifacts are there to search
    assert not any(TOKEN.encode() in b for b in blobs)
    with sqlite3.connect(k / "mlflow.db") as db:
        assert db.execute("select count(*) from params").fetchone()[0] > 10


# ----------------------------------------------------------------------------- faults that must leave earlier outputs alone


def test_kill_with_earlier_outputs_keeps_them_and_dvc_sees_no_change(runs):
    r = runs.ref_rec
    kw = r["kill_with_outputs"]
    assert kw.rc == -9 and kw.unchanged and len(kw.leftovers) == 1
    assert kw.status.returncode == 0 and UP_TO_DATE in kw.status.stdout, kw.status.stdout
    pa = r["prepare_after_kill"]
    assert pa.rc == 0, pa.err
    assert pa.leftovers == [] and pa.unchanged  # temp copy removed, the same bytes written again


def test_full_disk_gives_one_line_and_keeps_earlier_outputs(runs):
    r = runs.ref_rec
    dp = r["disk_full_prepare"]
    assert_one_line_error(dp.proc, "data/prepared: cannot write the output (File too large",
                          "previous output is unchanged")
    assert dp.unchanged and dp.leftovers == []
    df = r["disk_full_finetune"]
    assert_one_line_error(df.proc, "models/probe: cannot write the output", "File too large")
    assert df.unchanged and df.leftovers == []
    assert UP_TO_DATE in df.status.stdout, df.status.stdout


def test_a_file_where_a_directory_belongs_is_refused(runs):
    r = runs.ref_rec
    assert_one_line_error(r["file_as_parent"], "reports/comparison.md/prepared: cannot write: "
                                               "reports/comparison.md is a file, expected a directory")
    assert_one_line_error(r["file_as_out"], "reports/comparison.md: is a file, expected the output directory")
    assert r["file_unchanged"]
