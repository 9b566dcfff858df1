"""Where a pipeline run's wall time went: the stages' own work vs DVC + Prefect + MLflow.

    start=$(date +%s.%N); dvc repro; python -m flows.timings --since "$start"   # what `make repro` does
    python -m flows.timings --since 1795400000 --json

Every stage process appends one row to .depthtune/timings.jsonl (flows/stage.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from depthtune.layout import PROJECT_ROOT, STATE

TIMINGS = PROJECT_ROOT / STATE / "timings.jsonl"


def read_rows(t_start: float, path: Path = TIMINGS) -> list[dict]:
    """The stage processes that started after `t_start`, in start order."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["process_start"] >= t_start - 1:
                rows.append(row)
    return sorted(rows, key=lambda r: r["process_start"])


def stage_row(r: dict, dvc_s: float) -> dict:
    """One stage: interpreter + imports, own work, Prefect, MLflow, DVC (seconds).

    dvc_s is the gap before this process started: DVC checking and hashing, the previous stage's
    process exit, this process's launch (the first stage: from the pipeline's start).
    """
    startup, work, mlflow_s = r.get("startup_s", 0.0), r["work_s"], r.get("mlflow_s", 0.0)
    prefect = max(0.0, r["process_s"] - startup - work)
    return {"process_s": r["process_s"], "startup_s": startup, "work_s": work, "mlflow_s": mlflow_s,
            "own_s": round(startup + work - mlflow_s, 3), "prefect_s": round(prefect, 3),
            "dvc_s": round(dvc_s, 3), "overhead_s": round(prefect + mlflow_s + dvc_s, 3)}


def overhead_report(t_start: float, wall: float, path: Path = TIMINGS) -> dict:
    """Split the pipeline's wall time into the stages' own work and what orchestration adds.

    A stage's own work is what running it by hand without Prefect or MLflow would cost:
    interpreter start + its imports (torch, transformers, ...) + its main(), less the time
    main() spent in MLflow. Orchestration = Prefect (its import, server check, flow and task
    runs) + MLflow (import, store, logging) + DVC (everything between stage processes: dvc's
    own start-up, hashing, dvc.lock, process exit). Stages run side by side (--parallel) make
    the per-stage DVC gaps overlap: they are clamped at 0, the total stays wall - the rest.
    """
    rows = read_rows(t_start, path)
    stages, prev_end = {}, t_start
    for r in rows:
        stages[r["stage"]] = stage_row(r, max(0.0, r["process_start"] - prev_end))
        prev_end = max(prev_end, r["process_start"] + r["process_s"])
    own = sum(v["own_s"] for v in stages.values())
    prefect = sum(v["prefect_s"] for v in stages.values())
    mlflow_s = sum(v["mlflow_s"] for v in stages.values())
    dvc = wall - sum(v["process_s"] for v in stages.values())
    overhead = wall - own
    per_stage = sorted(v["overhead_s"] for v in stages.values())
    return {"wall_s": round(wall, 1), "stage_own_s": round(own, 1), "overhead_s": round(overhead, 1),
            "overhead_fraction": round(overhead / wall, 4) if wall else None,
            "prefect_s": round(prefect, 1), "mlflow_s": round(mlflow_s, 1), "dvc_and_exit_s": round(dvc, 1),
            "startup_s": round(sum(v["startup_s"] for v in stages.values()), 1),
            "median_stage_overhead_s": round(statistics.median(per_stage), 2) if per_stage else None,
            "stages": stages}


def summary_lines(report: dict) -> list[str]:
    lines = [f"{'stage':<22}{'process s':>10}{'imports s':>10}{'own work s':>12}{'Prefect s':>11}{'MLflow s':>10}"
             f"{'DVC s':>8}"]
    for name, v in report["stages"].items():
        lines.append(f"{name:<22}{v['process_s']:>10.1f}{v['startup_s']:>10.1f}{v['own_s']:>12.1f}"
                     f"{v['prefect_s']:>11.1f}{v['mlflow_s']:>10.1f}{v['dvc_s']:>8.1f}")
    frac = 100 * (report["overhead_fraction"] or 0)
    lines.append(f"pipeline: {report['wall_s']} s wall, {report['stage_own_s']} s the stages' own work "
                 f"(of which {report['startup_s']} s interpreter start + imports); orchestration overhead "
                 f"{report['overhead_s']} s ({frac:.1f}%) = Prefect {report['prefect_s']} s + MLflow "
                 f"{report['mlflow_s']} s + DVC and process exits {report['dvc_and_exit_s']} s; median per stage "
                 f"{report['median_stage_overhead_s']} s")
    return lines


def markdown(report: dict) -> str:
    """The per-stage table and the overhead figure as Markdown (for bench/results/)."""
    out = ["| stage | process s | interpreter + imports s | own work s | Prefect s | MLflow s | DVC s | "
           "orchestration s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in report["stages"].items():
        out.append(f"| {name} | {v['process_s']:.1f} | {v['startup_s']:.1f} | {v['own_s']:.1f} | "
                   f"{v['prefect_s']:.1f} | {v['mlflow_s']:.1f} | {v['dvc_s']:.1f} | {v['overhead_s']:.1f} |")
    frac = 100 * (report["overhead_fraction"] or 0)
    out += ["", f"Wall {report['wall_s']} s; the stages' own work {report['stage_own_s']} s; orchestration "
                f"overhead {report['overhead_s']} s = **{frac:.1f}%** (Prefect {report['prefect_s']} s, MLflow "
                f"{report['mlflow_s']} s, DVC and process exits {report['dvc_and_exit_s']} s); median per stage "
                f"{report['median_stage_overhead_s']} s."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--since", type=float, required=True, help="epoch seconds when the pipeline started")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the report as a Markdown table")
    args = ap.parse_args(argv)
    report = overhead_report(args.since, time.time() - args.since)
    (PROJECT_ROOT / STATE).mkdir(exist_ok=True)
    (PROJECT_ROOT / STATE / "last_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["stages"]:
        print("timings: no stage ran (everything was up to date)")
        return
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.markdown:
        print(markdown(report), end="")
    else:
        print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    sys.exit(main())
