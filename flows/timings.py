"""Where a pipeline run's wall time went: the stages' own work vs DVC + Prefect + MLflow.

    start=$(date +%s.%N); dvc repro; python -m flows.timings --since "$start"   # what `make repro` does
    python -m flows.timings --since 1795400000 --json

Every stage process appends one row to .depthtune/timings.jsonl (flows/stage.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from depthtune.layout import PROJECT_ROOT, STATE

TIMINGS = PROJECT_ROOT / STATE / "timings.jsonl"


def overhead_report(t_start: float, wall: float) -> dict:
    """Split the pipeline's wall time into the stages' own work and what orchestration adds.

    A stage's own work is what running it by hand without Prefect or MLflow would cost:
    interpreter start + its imports (torch, transformers, ...) + its main(), less the time
    main() spent in MLflow. Orchestration = Prefect (its import, server check, flow and task
    runs) + MLflow (import, store, logging) + DVC (everything between stage processes: dvc's
    own start-up, hashing, dvc.lock, process exit).
    """
    rows = []
    if TIMINGS.exists():
        for line in TIMINGS.read_text().splitlines():
            row = json.loads(line)
            if row["process_start"] >= t_start - 1:
                rows.append(row)
    stages = {}
    for r in rows:
        startup, work, mlflow_s = r.get("startup_s", 0.0), r["work_s"], r.get("mlflow_s", 0.0)
        stages[r["stage"]] = {"process_s": r["process_s"], "startup_s": startup, "work_s": work,
                              "mlflow_s": mlflow_s, "own_s": round(startup + work - mlflow_s, 3),
                              "prefect_s": round(max(0.0, r["process_s"] - startup - work), 3)}
    own = sum(v["own_s"] for v in stages.values())
    prefect = sum(v["prefect_s"] for v in stages.values())
    mlflow_s = sum(v["mlflow_s"] for v in stages.values())
    dvc = wall - sum(v["process_s"] for v in stages.values())
    overhead = wall - own
    return {"wall_s": round(wall, 1), "stage_own_s": round(own, 1), "overhead_s": round(overhead, 1),
            "overhead_fraction": round(overhead / wall, 4) if wall else None,
            "prefect_s": round(prefect, 1), "mlflow_s": round(mlflow_s, 1), "dvc_and_exit_s": round(dvc, 1),
            "startup_s": round(sum(v["startup_s"] for v in stages.values()), 1),
            "stages": stages}


def summary_lines(report: dict) -> list[str]:
    lines = [f"{'stage':<22}{'process s':>10}{'own work s':>12}{'Prefect s':>11}{'MLflow s':>10}"]
    for name, v in report["stages"].items():
        lines.append(f"{name:<22}{v['process_s']:>10.1f}{v['own_s']:>12.1f}{v['prefect_s']:>11.1f}{v['mlflow_s']:>10.1f}")
    frac = 100 * (report["overhead_fraction"] or 0)
    lines.append(f"pipeline: {report['wall_s']} s wall, {report['stage_own_s']} s the stages' own work "
                 f"(of which {report['startup_s']} s interpreter start + imports); orchestration overhead "
                 f"{report['overhead_s']} s ({frac:.1f}%) = Prefect {report['prefect_s']} s + MLflow "
                 f"{report['mlflow_s']} s + DVC and process exits {report['dvc_and_exit_s']} s")
    return lines


def markdown(report: dict) -> str:
    """The per-stage table and the overhead figure as Markdown (for bench/results/)."""
    out = ["| stage | process s | interpreter + imports s | own work s | Prefect s | MLflow s |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, v in report["stages"].items():
        out.append(f"| {name} | {v['process_s']:.1f} | {v['startup_s']:.1f} | {v['own_s']:.1f} | "
                   f"{v['prefect_s']:.1f} | {v['mlflow_s']:.1f} |")
    frac = 100 * (report["overhead_fraction"] or 0)
    out += ["", f"Wall {report['wall_s']} s; the stages' own work {report['stage_own_s']} s; orchestration "
                f"overhead {report['overhead_s']} s = **{frac:.1f}%** (Prefect {report['prefect_s']} s, MLflow "
                f"{report['mlflow_s']} s, DVC and process exits {report['dvc_and_exit_s']} s)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--since", type=float, required=True, help="epoch seconds when the pipeline started")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the report as a Markdown table")
    args = ap.parse_args(argv)
    report = overhead_report(args.since, time.time() - args.since)
    (PROJECT_ROOT / ".depthtune").mkdir(exist_ok=True)
    (PROJECT_ROOT / ".depthtune" / "last_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
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
