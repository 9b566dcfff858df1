"""The real DAG: dvc repro in a temporary git repo, every stage a Prefect flow, MLflow on SQLite."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import make_project, project_env, tiny_params


def run(cmd, project, env, timeout=900):
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(local_pipeline):
    p = local_pipeline
    return p["proj"], p["env"], p["out"], p["first"]


def test_repro_runs_every_stage_and_writes_every_variant(project):
    proj, env, out, _ = project
    variants = ["full", "top1", "probe"]
    expected = {"prepare", "pretrain", "tokenization", "audit", "compare", "promote"} | \
        {f"{s}@{v}" for s in ("finetune", "evaluation") for v in variants}
    assert ran_stages(out) == expected
    for v in variants:
        audit = json.loads((proj / "audit" / f"{v}.json").read_text())
        train = json.loads((proj / "metrics" / "train" / f"{v}.json").read_text())
        ev = json.loads((proj / "metrics" / "eval" / f"{v}.json").read_text())
        assert train["trainable_params"] == audit["trainable_params"]
        assert 0.0 <= ev["accuracy"] <= 1.0 and len(ev["confusion_matrix"]) == 2
        assert (proj / "models" / v / "model.safetensors").exists()
    assert (proj / "reports" / "comparison.md").read_text().count("|") > 20
    # every stage ran as a Prefect flow on one shared project server
    timings = [json.loads(line) for line in (proj / ".depthtune" / "timings.jsonl").read_text().splitlines()]
    assert {t["stage"] for t in timings} >= expected
    # each stage is a plain process of its own: imports, then its work inside the flow
    assert len({t["process_start"] for t in timings}) == len(timings)
    assert all(0 < t["startup_s"] and t["work_s"] <= t["process_s"] for t in timings), timings
    assert (proj / ".prefect" / "server.json").exists()


def test_prefect_recorded_a_flow_run_per_stage(project):
    proj, env, _, _ = project
    code = ("import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        runs = await c.read_flow_runs()\n"
            "        print(json.dumps(sorted((r.name, r.state_type.value) for r in runs)))\n"
            "asyncio.run(main())\n")
    url = json.loads((proj / ".prefect" / "server.json").read_text())["url"]
    proc = run([sys.executable, "-c", code], proj, dict(env, PREFECT_API_URL=url), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs.get("finetune@full") == "COMPLETED" and runs.get("compare") == "COMPLETED"


def test_dvc_metrics_show_contains_every_variant(project):
    proj, env, _, _ = project
    proc = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], proj, env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = next(iter(json.loads(proc.stdout).values()))["data"]
    for v in ("full", "top1", "probe"):
        assert files[f"metrics/train/{v}.json"]["data"]["trainable_params"] > 0
        assert "accuracy" in files[f"metrics/eval/{v}.json"]["data"]


def test_mlflow_has_one_parent_and_a_nested_run_per_variant(project):
    proj, env, _, _ = project
    code = ("import json, mlflow\n"
            f"mlflow.set_tracking_uri('sqlite:///{proj}/mlflow.db')\n"
            "runs = mlflow.search_runs(search_all_experiments=True, output_format='list')\n"
            "print(json.dumps([{'id': r.info.run_id, 'parent': r.data.tags.get('mlflow.parentRunId'),\n"
            "  'variant': r.data.tags.get('depthtune.variant'), 'trainable': r.data.metrics.get('trainable_params'),\n"
            "  'acc': r.data.metrics.get('test.accuracy')} for r in runs]))\n")
    proc = run([sys.executable, "-c", code], proj, env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    children = [r for r in runs if r["parent"]]
    parents = {r["parent"] for r in children}
    assert len(parents) == 1
    assert sorted(r["variant"] for r in children) == ["full", "probe", "top1"]
    for r in children:
        audit = json.loads((proj / "audit" / f"{r['variant']}.json").read_text())
        assert r["trainable"] == audit["trainable_params"]
        assert r["acc"] is not None


def test_second_repro_is_a_no_op(project):
    proj, env, _, _ = project
    t = time.perf_counter()
    proc = run([sys.executable, "-m", "dvc", "repro"], proj, env)
    assert proc.returncode == 0
    assert ran_stages(proc.stdout) == set()
    assert time.perf_counter() - t < 30


def test_changing_one_variants_lr_reruns_only_that_variant(project):
    proj, env, _, _ = project
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["variants"]["probe"]["train"]["lr"] = 1e-2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([sys.executable, "-m", "dvc", "repro"], proj, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = ran_stages(proc.stdout)
    assert {"finetune@probe", "evaluation@probe"} <= ran
    assert not ran & {"prepare", "tokenization", "finetune@full", "finetune@top1", "evaluation@full"}


def test_editing_a_module_reruns_exactly_the_stages_that_import_it(project):
    """dvc.yaml lists each stage's import closure: an edit to report.py touches compare only,
    an edit to batching.py touches finetune and evaluation, not prepare."""
    proj, env, _, _ = project

    def changed_after_editing(module: str) -> set[str]:
        path = proj / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            proc = run([sys.executable, "-m", "dvc", "status", "--json"], proj, env, timeout=120)
        finally:
            path.write_text(original)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return set(json.loads(proc.stdout or "{}"))

    assert changed_after_editing("depthtune/report/comparison.py") == {"compare"}
    batching = changed_after_editing("depthtune/data/batching.py")
    assert {f"finetune@{v}" for v in ("full", "top1", "probe")} <= batching
    assert {f"evaluation@{v}" for v in ("full", "top1", "probe")} <= batching
    assert not batching & {"prepare", "tokenization", "audit", "compare"}
