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


def record_timing(run_name: str, **fields) -> None:
    """Append this stage's timings to .depthtune/timings.jsonl (for the orchestration-overhead figure)."""
    import json

    import psutil

    from depthtune.files import PROJECT_ROOT

    path = PROJECT_ROOT / ".depthtune" / "timings.jsonl"
    path.parent.mkdir(exist_ok=True)
    started = psutil.Process().create_time()
    row = {"stage": run_name, "process_start": started, "process_s": round(time.time() - started, 3),
           **{k: round(v, 3) for k, v in fields.items()}}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def run_stage(stage: str, argv: list[str]) -> None:
    from depthtune.files import run_main

    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}, expected one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"stages.{stage}")
    if os.environ.get("DEPTHTUNE_PREFECT", "1") == "0":
        t = time.perf_counter()
        try:
            run_main(lambda: module.main(argv))
        finally:
            record_timing(stage + (f"@{argv[argv.index('--variant') + 1]}" if "--variant" in argv else ""),
                          work_s=time.perf_counter() - t, prefect_ready_s=0.0)
        return
    t0 = time.perf_counter()
    from flows.server import ensure_server, touch
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = ensure_server()
    touch()  # a stage is using the project server: keep its keeper from stopping it

    import threading

    def keep_alive():  # long stages (a 20-minute fine-tune) must not look idle to the keeper
        while True:
            time.sleep(30)
            touch()

    threading.Thread(target=keep_alive, daemon=True).start()
    from prefect import flow, task
    from prefect.states import Failed

    from depthtune.errors import DepthtuneError

    variant = argv[argv.index("--variant") + 1] if "--variant" in argv else None
    run_name = f"{stage}@{variant}" if variant else stage

    @task(name=f"{stage}.main", retries=0)
    def stage_task():
        t = time.perf_counter()
        try:
            module.main(argv)
        except DepthtuneError as exc:  # bad input: one line, not a Prefect traceback
            return f"{exc}"
        finally:
            touch()
            record_timing(run_name, work_s=time.perf_counter() - t, prefect_ready_s=ready_s)
        return None

    @flow(name=f"depthtune-{stage}", flow_run_name=run_name, log_prints=True, validate_parameters=False)
    def stage_flow():
        error = stage_task()
        if error:
            return Failed(message=error)
        return None

    ready_s = time.perf_counter() - t0
    print(f"[{run_name}] Prefect ready in {ready_s:.1f} s ({os.environ['PREFECT_API_URL']})",
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
