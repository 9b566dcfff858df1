"""The whole DAG as one Prefect flow, for users who start from Prefect rather than DVC.

    python -m flows.pipeline                          # = dvc repro, observed in Prefect
    python -m flows.pipeline --parallel 2             # variants' finetune/evaluation side by side
    python -m flows.pipeline -S 'variants.top2.train.lr=3e-4'   # dvc exp run with overrides
    python -m flows.pipeline --pool gpus              # variants on a Prefect work pool's workers
                                                      # (flows/distributed.py, docs/scale-out.md)

DVC stays the single source of truth: this flow only drives `dvc repro` / `dvc exp run`,
so the cache and dvc.lock decide what re-runs. One local Prefect server is started (or
PREFECT_API_URL reused) and exported to every stage process, and the MLflow parent run
is keyed to this flow run, so all variants of one execution nest under one parent.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from depthtune import runtime
from depthtune.layout import PROJECT_ROOT
from flows.gpu_slots import GpuSlots, child_env
from flows.timings import overhead_report, summary_lines



def sh(args: list[str], env: Optional[dict] = None) -> None:
    print("$ " + " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=PROJECT_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {proc.returncode}")


def variant_names(params_path: Path = PROJECT_ROOT / "params.yaml") -> list[str]:
    from depthtune.config import load_params
    return list(load_params(params_path).variants)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set-param", action="append", default=[], help="dvc exp run -S override (repeatable)")
    ap.add_argument("--parallel", type=int, default=1, help="variants trained side by side (default 1)")
    ap.add_argument("--force", action="store_true", help="dvc repro --force")
    ap.add_argument("--pool", default=None, help="train the variants on this Prefect work pool's workers, "
                                                 "sharing outputs through the DVC remote (flows/distributed.py)")
    ap.add_argument("--repo", default=None, help="with --pool: where workers fetch the commit (default: origin)")
    ap.add_argument("--attempts", type=int, default=3, help="with --pool: tries per variant when a worker dies")
    args = ap.parse_args(argv)
    if args.pool:
        from flows.distributed import run_pool
        run_pool(args.pool, args.repo, args.attempts, timeout_s=86400.0)
        return
    runtime.configure_process()

    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import ensure_server
        os.environ["PREFECT_API_URL"] = ensure_server()  # children inherit it: one server for every stage
    from prefect import flow, task
    from prefect.runtime import flow_run
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(name="dvc")
    def dvc(cmd: list[str]):
        sh(["dvc", *cmd])

    gpus = GpuSlots.of_this_machine()

    @task(name="variant")
    def variant(v: str):
        with gpus.take() as gpu:  # one GPU per concurrent variant (none: the CPU)
            print(f"{v}: {'GPU ' + gpu if gpu is not None else 'CPU'}", flush=True)
            sh(["dvc", "repro", "--single-item", f"finetune@{v}"], env=child_env(gpu))
            sh(["dvc", "repro", "--single-item", f"evaluation@{v}"], env=child_env(gpu))

    @flow(name="depthtune-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=max(1, args.parallel)))
    def pipeline() -> dict:
        os.environ["DEPTHTUNE_PIPELINE_KEY"] = str(flow_run.get_id() or uuid.uuid4())
        t_start, t0 = time.time(), time.perf_counter()
        if args.set_param:
            dvc(["exp", "run", *[a for s in args.set_param for a in ("-S", s)]])
        elif args.parallel > 1:
            dvc(["repro", "audit"] + (["--force"] if args.force else []))
            print(gpus.describe(args.parallel), flush=True)
            futures = []
            for v in variant_names():
                # different stages in parallel keep dvc.lock consistent (shared/STACK.md)
                futures.append(variant.submit(v))
            for f in futures:
                f.result()
            dvc(["repro"])
        else:
            dvc(["repro"] + (["--force"] if args.force else []))
        report = overhead_report(t_start, time.perf_counter() - t0)
        print("\n".join(summary_lines(report)))
        return report

    report = pipeline()
    (PROJECT_ROOT / ".depthtune" / "last_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
