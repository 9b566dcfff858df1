"""flows/retrain.py: the schedule read back from a Prefect API, and one real run on a toy DVC project."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from depthtune import runtime  # noqa: F401
from depthtune.errors import ConfigError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_params(path: Path, cron: str, tz: str) -> Path:
    path.write_text(f"variants: {{full: {{}}}}\nretrain:\n  cron: '{cron}'\n  timezone: {tz}\n")
    return path


def test_deployment_schedule_and_overlap_policy(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.retrain import DEPLOYMENT_NAME, build_deployment

    dep = build_deployment(write_params(tmp_path / "params.yaml", "15 4 * * 2", "Europe/Paris"))
    dep_id = dep.apply()
    with get_client(sync_client=True) as client:
        d = client.read_deployment(dep_id)
    assert d.name == DEPLOYMENT_NAME and len(d.schedules) == 1
    assert d.schedules[0].schedule.cron == "15 4 * * 2" and d.schedules[0].schedule.timezone == "Europe/Paris"
    assert d.schedules[0].active
    # a tick that fires while a run is still going is cancelled, not queued
    limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else d.concurrency_limit
    assert limit == 1
    assert str(d.concurrency_options.collision_strategy.value) == "CANCEL_NEW"
    assert d.parameters["root"] == str(tmp_path)


def test_bad_timezone_is_a_config_error(tmp_path):
    from flows.retrain import build_deployment

    with pytest.raises(ConfigError, match="retrain: invalid cron"):
        build_deployment(write_params(tmp_path / "params.yaml", "0 3 * * 1", "Mars/Olympus"))


def test_changes_report():
    from flows.retrain import changes

    before = {"rows": {"train": 10, "test": 2}, "data_fingerprint": "a", "metrics": {"full": {"accuracy": 0.5}},
              "promotion": None}
    after = {"rows": {"train": 12, "test": 3}, "data_fingerprint": "b", "metrics": {"full": {"accuracy": 0.75}},
             "promotion": {"decision": "promoted", "version": "2", "mtime": 1.0}}
    c = changes(before, after)
    assert c["data_changed"] and c["rows"]["train"]["delta"] == 2
    assert c["metrics"]["full"]["accuracy"]["delta"] == 0.25 and c["promotion"]["decision"] == "promoted"


# A toy DVC project with the same stage names: prepare (source.csv -> data/prepared),
# evaluation (metrics/eval/full.json, accuracy grows with the rows), promote (reports/promotion.json).
PREPARE = textwrap.dedent("""
    import json, pathlib
    rows = [l for l in pathlib.Path("source.csv").read_text().splitlines() if l.strip()]
    out = pathlib.Path("data/prepared"); out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:-2]), ("validation", rows[-2:-1]), ("test", rows[-1:])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": r, "label": 0}) + "\\n" for r in part))
    (out / "labels.json").write_text(json.dumps({"names": ["a", "b"]}))
""")
EVALUATE = textwrap.dedent("""
    import json, pathlib
    n = sum(1 for _ in open("data/prepared/train.jsonl"))
    pathlib.Path("metrics/eval").mkdir(parents=True, exist_ok=True)
    pathlib.Path("metrics/eval/full.json").write_text(json.dumps({"variant": "full", "accuracy": n / 10, "macro_f1": n / 20}))
""")
PROMOTE = textwrap.dedent("""
    import json, pathlib
    acc = json.loads(pathlib.Path("metrics/eval/full.json").read_text())["accuracy"]
    pathlib.Path("reports").mkdir(exist_ok=True)
    pathlib.Path("reports/promotion.json").write_text(json.dumps({"decision": "promoted", "reason": f"accuracy {acc}",
        "candidate": {"variant": "full", "version": str(int(acc * 10))}}))
""")


def test_retrain_flow_on_a_toy_dvc_project(prefect_api, tmp_path, monkeypatch):
    import subprocess

    from flows.retrain import retrain

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the flow exports it for its children; restore after
    root = tmp_path / "proj"
    root.mkdir()
    for name, code in (("prepare.py", PREPARE), ("evaluate.py", EVALUATE), ("promote.py", PROMOTE)):
        (root / name).write_text(code)
    py = sys.executable
    (root / "dvc.yaml").write_text(textwrap.dedent(f"""
        stages:
          prepare:
            cmd: {py} prepare.py
            deps: [prepare.py, source.csv]
            outs: [data/prepared]
          evaluation:
            cmd: {py} evaluate.py
            deps: [evaluate.py, data/prepared]
            outs:
              - metrics/eval:
                  cache: false
          promote:
            cmd: {py} promote.py
            deps: [promote.py, metrics/eval]
            outs:
              - reports/promotion.json:
                  cache: false
    """))
    (root / "source.csv").write_text("".join(f"row {i}\n" for i in range(6)))
    subprocess.run([py, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([py, "-m", "dvc", "repro", "-q"], cwd=root, check=True, capture_output=True)

    # the source grows by two rows: prepare re-runs, the metric moves, promote runs
    (root / "source.csv").write_text("".join(f"row {i}\n" for i in range(8)))
    report = retrain(root=str(root))
    c = report["changes"]
    assert report["skipped"] is False and c["data_changed"] is True
    assert c["rows"]["train"] == {"before": 4, "after": 6, "delta": 2}
    assert c["metrics"]["full"]["accuracy"] == {"before": 0.4, "after": 0.6, "delta": 0.2}
    assert c["promotion"]["decision"] == "promoted" and c["promotion"]["version"] == "6"
    assert report["steps"][0]["ran_stages"] == ["prepare"]
    assert json.loads((root / "reports" / "retrain.json").read_text())["changes"]["data_changed"] is True

    # nothing new: prepare re-reads the source (forced), its outputs hash the same, nothing downstream runs
    report2 = retrain(root=str(root))
    assert report2["changes"]["data_changed"] is False and report2["changes"]["promotion"] is None
    assert report2["steps"][0]["ran_stages"] == ["prepare"]
    assert all(not s["ran_stages"] for s in report2["steps"][1:])


def test_skips_while_a_previous_run_is_running(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from flows.retrain import retrain

    with get_client(sync_client=True) as client:
        previous = client.create_flow_run(retrain, state=Running())
        try:
            report = retrain(root=str(tmp_path))  # no dvc.yaml here: it must not even try
        finally:
            client.set_flow_run_state(previous.id, Completed(), force=True)
    assert report == {"skipped": True, "reason": "previous run still running"}
