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

FORKED = False  # True in a child of the warm stage worker (flows/worker.py)
STAGES = ("prepare", "tokenization", "audit", "finetune", "evaluation", "compare", "promote")


def process_age() -> tuple[float, float]:
    """(process start as epoch seconds, seconds since then): the interpreter start counts too."""
    import psutil

    started = psutil.Process().create_time()
    return started, time.time() - started


def record_timing(run_name: str, **fields) -> None:
    """Append this stage's timings to .depthtune/timings.jsonl (for the orchestration-overhead figure).

    startup_s: interpreter start + the stage module's imports (torch, transformers, ...), before Prefect;
    work_s: the stage's main(); mlflow_s: the part of work_s spent in depthtune.tracking (mlflow import,
    store, logging); process_s: start to the end of the Prefect flow. Prefect's share is
    process_s - startup_s - work_s; what DVC and process exit cost shows up between processes.
    """
    import json

    from depthtune.files import PROJECT_ROOT

    path = PROJECT_ROOT / ".depthtune" / "timings.jsonl"
    path.parent.mkdir(exist_ok=True)
    started, age = process_age()
    tracking = sys.modules.get("depthtune.tracking")
    fields.setdefault("mlflow_s", tracking.seconds_spent() if tracking else 0.0)
    row = {"stage": run_name, "process_start": started, "process_s": round(age, 3), "worker": FORKED,
           **{k: round(v, 3) for k, v in fields.items()}}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


_SERVER: dict = {}


def begin_server_start():
    """Start (or find) the project's Prefect server in a background thread, once per process.

    The first stage of a run starts the server (~6 s on 2 cores); its imports (the stage
    module, Prefect) run meanwhile. Returns the thread to join, or None with PREFECT_API_URL set.
    """
    if os.environ.get("PREFECT_API_URL") or os.environ.get("DEPTHTUNE_PREFECT", "1") == "0":
        return None
    if "thread" not in _SERVER:
        import threading

        from flows.server import ensure_server

        def start():
            try:
                _SERVER["url"] = ensure_server()
            except Exception as exc:  # noqa: BLE001  (re-raised by the caller's thread)
                _SERVER["error"] = exc

        _SERVER["thread"] = threading.Thread(target=start, daemon=True)
        _SERVER["thread"].start()
    return _SERVER["thread"]


def run_stage(stage: str, argv: list[str]) -> None:
    from depthtune.files import run_main

    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}, expected one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"stages.{stage}")
    startup_s = process_age()[1]
    variant = argv[argv.index("--variant") + 1] if "--variant" in argv and argv.index("--variant") + 1 < len(argv) else None
    run_name = f"{stage}@{variant}" if variant else stage
    from flows import worker

    if os.environ.get("DEPTHTUNE_PREFECT", "1") == "0":
        worker.start_pending()
        t = time.perf_counter()
        try:
            run_main(lambda: module.main(argv))
        finally:
            record_timing(run_name, startup_s=startup_s, work_s=time.perf_counter() - t, prefect_ready_s=0.0)
        return
    t0 = time.perf_counter()
    from flows.server import touch
    import threading

    starter = begin_server_start()
    from prefect import flow, task
    from prefect.states import Failed

    if starter is not None:
        starter.join()
        if "error" in _SERVER:
            raise _SERVER["error"]
        os.environ["PREFECT_API_URL"] = _SERVER["url"]
    worker.start_pending()  # after the server: see flows/worker.py
    # Prefect read its settings when it was imported (here or in the warm worker): re-read them
    sys.modules["prefect.context"].refresh_global_settings_context()
    touch()  # a stage is using the project server: keep its keeper from stopping it

    def keep_alive():  # long stages (a 20-minute fine-tune) must not look idle to the keeper
        while True:
            time.sleep(30)
            touch()

    threading.Thread(target=keep_alive, daemon=True).start()

    from depthtune.errors import DepthtuneError

    work = {"s": 0.0}

    @task(name=f"{stage}.main", retries=0)
    def stage_task():
        t = time.perf_counter()
        try:
            module.main(argv)
        except DepthtuneError as exc:  # bad input: one line, not a Prefect traceback
            return f"{exc}"
        finally:
            touch()
            work["s"] = time.perf_counter() - t
        return None

    # An async flow around the (sync) task: Prefect's sync flow engine joins its heartbeat thread
    # at exit, and that thread sleeps in 1 s steps: ~0.5-1 s lost per stage. The async engine does
    # not wait for it; heartbeats still mark a killed stage as crashed. The task itself runs on
    # this thread, as before.
    @flow(name=f"depthtune-{stage}", flow_run_name=run_name, log_prints=True, validate_parameters=False)
    async def stage_flow():
        error = stage_task()
        if error:
            return Failed(message=error)
        return None

    ready_s = time.perf_counter() - t0
    print(f"[{run_name}] Prefect ready in {ready_s:.1f} s ({os.environ['PREFECT_API_URL']})",
          file=sys.stderr)
    try:
        import asyncio

        state = asyncio.run(stage_flow(return_state=True))
    finally:
        record_timing(run_name, startup_s=startup_s, work_s=work["s"], prefect_ready_s=ready_s)
        import logging
        # Events still queued are sent at exit anyway; Prefect's "Still processing items" note is noise here
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        sys.exit(2)


def main_in_process(args: list[str], forked: bool = False) -> None:
    """Run the stage in this process (a fresh one, or a child forked by the warm worker)."""
    from depthtune import runtime  # offline defaults before prefect is imported

    global FORKED
    if forked:  # the environment was just replaced by the caller's: apply the defaults again
        FORKED = True
        runtime.configure_offline()
    run_stage(args[0], args[1:])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m flows.stage <stage> [args]", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # stage prints reach the console and the run's logs
    from flows import worker  # stdlib only: asking the warm worker costs milliseconds

    code = worker.run_in_worker(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    begin_server_start()  # before the heavy imports: they overlap the server's start-up
    try:
        main_in_process(sys.argv[1:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Outputs are written and closed; run the exit hooks (Prefect sends its last logs and events),
    # then skip tearing down torch & co. module by module (~0.5-1 s per stage process).
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
