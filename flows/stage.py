"""Run one DVC stage as a Prefect flow: `python -m flows.stage <stage> [stage args]`.

dvc.yaml calls this for every stage, so each stage run shows up in the Prefect
UI/API with its state and logs. PREFECT_API_URL, when set, is used as it is
(a team server); otherwise one project-local server is started once and reused
by every stage (flows/server.py). DEPTHTUNE_PREFECT=0 runs the stage function
directly, without Prefect.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

STAGES = ("prepare", "tokenization", "audit", "finetune", "evaluation", "compare", "promote")


def run_stage(stage: str, argv: list[str]) -> None:
    from depthtune.files import run_main

    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}, expected one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"stages.{stage}")
    if os.environ.get("DEPTHTUNE_PREFECT", "1") == "0":
        run_main(lambda: module.main(argv))
        return
    t0 = time.perf_counter()
    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import ensure_server
        os.environ["PREFECT_API_URL"] = ensure_server()
    from prefect import flow, task
    from prefect.states import Failed

    from depthtune.errors import DepthtuneError

    variant = argv[argv.index("--variant") + 1] if "--variant" in argv else None
    run_name = f"{stage}@{variant}" if variant else stage

    @task(name=f"{stage}.main", retries=0)
    def stage_task():
        try:
            module.main(argv)
        except DepthtuneError as exc:  # bad input: one line, not a Prefect traceback
            return f"{exc}"
        return None

    @flow(name=f"depthtune-{stage}", flow_run_name=run_name, log_prints=True, validate_parameters=False)
    def stage_flow():
        error = stage_task()
        if error:
            return Failed(message=error)
        return None

    print(f"[{run_name}] Prefect ready in {time.perf_counter() - t0:.1f} s ({os.environ['PREFECT_API_URL']})",
          file=sys.stderr)
    state = stage_flow(return_state=True)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m flows.stage <stage> [args]", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # stage prints reach the console and the run's logs
    from depthtune import runtime  # noqa: F401  (offline defaults before prefect is imported)
    run_stage(sys.argv[1], sys.argv[2:])
