"""Scheduled retraining: refresh the data, re-run the pipeline, promote, report what changed.

    python -m flows.retrain              # one run now
    python -m flows.retrain serve        # a deployment on the `retrain.cron` / `retrain.timezone` schedule

`serve` needs a real Prefect server (schedules never fire on the temporary one):
    prefect server start --host 127.0.0.1 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.retrain serve

Steps: `dvc repro --force --single-item prepare` (re-reads the configured source; new rows
change the DVC hash of data/prepared, unchanged rows leave everything downstream cached) -> `dvc repro` (everything downstream of what changed) ->
promote (the `promote` stage when dvc.yaml has one, else stages/promote.py).
The report compares before/after: rows per split, metric deltas per variant and
the promotion decision; it goes to reports/retrain.json and a Prefect artifact.

Overlap: the deployment has concurrency limit 1 with CANCEL_NEW (a tick that
fires while the previous run is still going is cancelled), and the flow itself
returns "skipped" if another run of it is RUNNING.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from depthtune import runtime, tasks
from depthtune.errors import DepthtuneError, first_line
from depthtune.files import write_json_atomic
from depthtune.layout import PROJECT_ROOT

from prefect import flow, get_run_logger, task  # noqa: E402

FLOW_NAME = "depthtune-retrain"
DEPLOYMENT_NAME = "weekly-retrain"


# ----------------------------------------------------------------------------- plain functions (no Prefect)


def count_rows(path: Path) -> Optional[int]:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return None


def snapshot(root: Path) -> dict:
    """What the pipeline's outputs say right now: rows per split, eval metrics, promotion."""
    from depthtune.tracking.runs import data_fingerprint

    prepared = root / "data" / "prepared"
    rows = {split: count_rows(prepared / f"{split}.jsonl") for split in ("train", "validation", "test")}
    metrics = {}
    for f in sorted((root / "metrics" / "eval").glob("*.json")):
        try:
            ev = json.loads(f.read_text())
        except ValueError:
            continue
        task = tasks.get(ev.get("task", "classification"))  # its metrics, the headline first
        metrics[ev.get("variant", f.stem)] = {m: ev.get(m) for m in task.metrics}
    promotion = None
    report = root / "reports" / "promotion.json"
    if report.is_file():
        try:
            p = json.loads(report.read_text())
            promotion = {"decision": p.get("decision"), "reason": p.get("reason"),
                         "version": (p.get("candidate") or {}).get("version"),
                         "variant": (p.get("candidate") or {}).get("variant"),
                         "aliases": p.get("aliases_after"), "mtime": report.stat().st_mtime}
        except ValueError:
            pass
    return {"rows": rows, "data_fingerprint": data_fingerprint(root), "metrics": metrics, "promotion": promotion}


def _delta(a, b):
    return round(b - a, 6) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def changes(before: dict, after: dict) -> dict:
    """Before/after snapshot -> {data_changed, rows, metrics (with deltas), promotion}."""
    rows = {s: {"before": before["rows"].get(s), "after": after["rows"].get(s),
                "delta": _delta(before["rows"].get(s), after["rows"].get(s))} for s in after["rows"]}
    metrics = {}
    for v in sorted(set(before["metrics"]) | set(after["metrics"])):
        b, a = before["metrics"].get(v, {}), after["metrics"].get(v, {})
        names = list(dict.fromkeys([*a, *b]))  # the variant's task's metrics, the headline first
        metrics[v] = {m: {"before": b.get(m), "after": a.get(m), "delta": _delta(b.get(m), a.get(m))} for m in names}
    p_before, p_after = before.get("promotion"), after.get("promotion")
    fresh = p_after is not None and (p_before is None or p_after.get("mtime") != p_before.get("mtime"))
    return {"data_changed": before["data_fingerprint"] != after["data_fingerprint"], "rows": rows,
            "metrics": metrics, "promotion": p_after if fresh else None, "promotion_ran": fresh}


def summary_markdown(report: dict) -> str:
    lines = ["# depthtune retrain", "", f"data changed: **{report['changes']['data_changed']}**", "",
             "| split | rows before | rows after | delta |", "|---|---:|---:|---:|"]
    for s, r in report["changes"]["rows"].items():
        lines.append(f"| {s} | {r['before']} | {r['after']} | {r['delta']} |")
    lines += ["", "| variant | metric | before | after | delta |", "|---|---|---:|---:|---:|"]
    for v, m in report["changes"]["metrics"].items():
        if m:  # the headline metric of the variant's task
            name, a = next(iter(m.items()))
            lines.append(f"| {v} | {name} | {a['before']} | {a['after']} | {a['delta']} |")
    p = report["changes"]["promotion"]
    version = f" v{p['version']}" if p and p.get("version") else ""
    lines += ["", f"promotion: **{p['decision']}**{version} ({p['variant']}): {p['reason']}" if p
              else "promotion: not re-run (nothing upstream changed)"]
    return "\n".join(lines) + "\n"


def dvc(args: list[str], root: Path) -> dict:
    """Run `dvc <args>` in the project; one-line error with the last output lines on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    if proc.returncode != 0:
        tail = " | ".join(line for line in out.strip().splitlines()[-3:])
        raise DepthtuneError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {tail}")
    return {"cmd": "dvc " + " ".join(args), "seconds": round(time.perf_counter() - t0, 1), "ran_stages": ran}


def dvc_stages(root: Path) -> set:
    import yaml

    try:
        return set((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    except (OSError, yaml.YAMLError):
        return set()


# ----------------------------------------------------------------------------- Prefect


@task(name="refresh-data")
def refresh_data(root: str, prepare_stage: str) -> dict:
    if prepare_stage not in dvc_stages(Path(root)):
        return {"cmd": None, "ran_stages": [], "note": f"no stage {prepare_stage!r} in dvc.yaml"}
    # forced: DVC cannot see a changed source file outside the repo; if the rows are the same,
    # prepare's outputs hash the same and nothing downstream re-runs
    return dvc(["repro", "--force", "--single-item", prepare_stage], Path(root))


@task(name="run-pipeline")
def run_pipeline(root: str) -> dict:
    return dvc(["repro"], Path(root))


@task(name="promote")
def promote_step(root: str) -> dict:
    if "promote" in dvc_stages(Path(root)):
        return dvc(["repro", "promote"], Path(root))  # up to date after `dvc repro`: a no-op check
    proc = subprocess.run([sys.executable, "-m", "stages.promote"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DepthtuneError(f"promote failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return {"cmd": "python -m stages.promote", "ran_stages": ["promote"]}


def _other_running_runs() -> int:
    """Flow runs of this flow that are RUNNING now, other than this one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    return sum(1 for r in runs if str(r.id) != str(flow_run.id))


def _export_api_url() -> None:
    """Stages started by dvc reuse this server instead of each starting a temporary one."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url)


@flow(name=FLOW_NAME, log_prints=True)
def retrain(root: str = str(PROJECT_ROOT), prepare_stage: str = "prepare",
            report_path: str = "reports/retrain.json") -> dict:
    logger = get_run_logger()
    if _other_running_runs():
        logger.warning("another retrain run is still RUNNING: skipping this one")
        return {"skipped": True, "reason": "previous run still running"}
    _export_api_url()
    rootp = Path(root)
    before = snapshot(rootp)
    steps = [refresh_data(root, prepare_stage), run_pipeline(root), promote_step(root)]
    after = snapshot(rootp)
    report = {"schema": "depthtune.retrain/1", "skipped": False, "steps": steps, "changes": changes(before, after),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(rootp / report_path, report)
    try:
        from prefect.artifacts import create_markdown_artifact
        create_markdown_artifact(summary_markdown(report), key="depthtune-retrain")
    except Exception as exc:  # noqa: BLE001  (a report artifact must not fail the run)
        logger.warning(f"could not create the Prefect artifact: {exc}")
    print(summary_markdown(report))
    return report


def build_deployment(params_path: str | Path = PROJECT_ROOT / "params.yaml", name: str = DEPLOYMENT_NAME):
    """A RunnerDeployment on the retrain.cron / retrain.timezone schedule, at most one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from depthtune.config import load_params
    from depthtune.errors import ConfigError

    cfg = load_params(params_path).retrain
    try:  # prefect validates cron and IANA timezone here; name the params keys instead of a pydantic dump
        return retrain.to_deployment(
            name=name, schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            parameters={"root": str(Path(params_path).resolve().parent)}, tags=["depthtune", "retrain"],
            description=f"depthtune retrain ({cfg.cron}, {cfg.timezone}): dvc repro + promote")
    except (ValueError, TypeError) as exc:
        msg = next((line.strip() for line in str(exc).splitlines() if "Value error" in line or "nvalid" in line),
                   first_line(exc))
        raise ConfigError(f"retrain: invalid cron {cfg.cron!r} / timezone {cfg.timezone!r} ({msg})") from None


def main(argv=None) -> int:
    runtime.configure_process()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        if not os.environ.get("PREFECT_API_URL"):
            raise DepthtuneError("serve needs a Prefect server: run `prefect server start --host 127.0.0.1` and "
                                 "export PREFECT_API_URL=http://127.0.0.1:4200/api (schedules never fire on a temporary server)")
        from prefect import serve

        serve(build_deployment())
        return 0
    if argv:
        raise DepthtuneError(f"unknown arguments {argv}: usage python -m flows.retrain [serve]")
    report = retrain()
    return 0 if report else 1


if __name__ == "__main__":
    from depthtune.files import run_main

    run_main(main)
