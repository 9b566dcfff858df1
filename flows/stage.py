"""Run one DVC stage as a thin Prefect flow: `python -m flows.stage <stage> [stage args]`.

dvc.yaml calls this for every stage, so each stage run shows up in the Prefect
UI/API with its state and logs; the stage itself is `stages.<stage>.main(argv)`,
which runs the same way without Prefect (`python -m stages.<stage> ...`).
PREFECT_API_URL, when set, is used as it is (a team server); otherwise one
project-local server is started once and reused by every stage (flows/server.py).
DEPTHTUNE_PREFECT=0 runs the stage function directly, without Prefect.

Each stage process appends its timings to .depthtune/timings.jsonl: interpreter start
+ the stage's imports (`startup_s`), its main() (`work_s`, of which `mlflow_s` in MLflow)
and the whole process up to the end of the flow (`process_s`); Prefect's share is
process_s - startup_s - work_s. `python -m flows.timings` turns them into the table.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback

from depthtune import layout, runtime, stopwatch
from depthtune.errors import DepthtuneError
from depthtune.files import run_main


def process_age() -> tuple[float, float]:
    """(process start as epoch seconds, seconds since then): the interpreter start counts too.

    The age comes from the kernel's boot-time clock (/proc/self/stat start tick vs /proc/uptime),
    not from psutil's create_time (boot time rounded to whole seconds + ticks): that one is shifted
    by up to a second, and differently after the wall clock is adjusted.
    """
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux
        import psutil

        age = time.time() - psutil.Process().create_time()
    return time.time() - age, age


def record_timing(run_name: str, *, startup_s: float, work_s: float, prefect_ready_s: float) -> None:
    """Append this stage process's timings to .depthtune/timings.jsonl."""
    path = layout.PROJECT_ROOT / layout.STATE / "timings.jsonl"
    path.parent.mkdir(exist_ok=True)
    started, age = process_age()
    row = {"stage": run_name, "process_start": started, "process_s": round(age, 3),
           "startup_s": round(startup_s, 3), "work_s": round(work_s, 3),
           "mlflow_s": round(stopwatch.total("mlflow"), 3), "prefect_ready_s": round(prefect_ready_s, 3)}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


class ServerStart(threading.Thread):
    """Find or start the project's Prefect server while the stage's imports run (they overlap)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.url: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from flows.server import ensure_server

        try:
            self.url = ensure_server()
        except Exception as exc:  # noqa: BLE001  (re-raised in the stage's thread)
            self.error = exc

    def wait(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        return self.url


def keep_server_alive() -> None:
    """A long stage (a 20-minute fine-tune) must not look idle to the server's keeper."""
    from flows.server import touch

    def loop():
        while True:
            touch()
            time.sleep(30)

    threading.Thread(target=loop, daemon=True).start()


def run_as_flow(module, stage: str, run_name: str, argv: list[str], server: ServerStart | None) -> float:
    """Run `module.main(argv)` as a Prefect task inside a flow; returns the seconds main() took."""
    t0 = time.perf_counter()
    if server is not None:
        os.environ["PREFECT_API_URL"] = server.wait()  # before Prefect is imported: it reads settings then
    keep_server_alive()
    from prefect import flow, task
    from prefect.states import Failed

    work = {"s": 0.0}

    @task(name=f"{stage}.main", retries=0)
    def stage_task():
        t = time.perf_counter()
        try:
            module.main(argv)
        except DepthtuneError as exc:  # bad input: one line, not a Prefect traceback
            return str(exc)
        finally:
            work["s"] = time.perf_counter() - t
        return None

    # An async flow around the (sync) task: Prefect's sync flow engine joins its heartbeat thread
    # at exit, and that thread sleeps in 1 s steps (~0.5-1 s lost per stage). The task runs on this thread.
    @flow(name=f"depthtune-{stage}", flow_run_name=run_name, log_prints=True, validate_parameters=False)
    async def stage_flow():
        error = stage_task()
        return Failed(message=error) if error else None

    print(f"[{run_name}] Prefect ready in {time.perf_counter() - t0:.1f} s ({os.environ['PREFECT_API_URL']})",
          file=sys.stderr)
    import asyncio
    import logging

    state = asyncio.run(stage_flow(return_state=True))
    # events still queued are sent at exit anyway; Prefect's "Still processing items" note is noise here
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        sys.exit(2)
    return work["s"]


def main(args: list[str]) -> None:
    if not args or args[0] not in layout.STAGES:
        print(f"usage: python -m flows.stage <stage> [args]; stages: {', '.join(layout.STAGES)}", file=sys.stderr)
        sys.exit(2)
    stage, argv = args[0], args[1:]
    runtime.configure_process()
    use_prefect = os.environ.get("DEPTHTUNE_PREFECT", "1") != "0"
    server = ServerStart() if use_prefect and not os.environ.get("PREFECT_API_URL") else None
    if server is not None:
        server.start()  # ~6 s on 2 cores for the first stage of a run; meanwhile the imports below
    module = importlib.import_module(f"stages.{stage}")
    startup_s = process_age()[1]
    variant = argv[argv.index("--variant") + 1] if "--variant" in argv[:-1] else None
    run_name = f"{stage}@{variant}" if variant else stage
    t0, work_s = time.perf_counter(), 0.0
    try:
        if use_prefect:
            work_s = run_as_flow(module, stage, run_name, argv, server)
        else:
            run_main(lambda: module.main(argv))
            work_s = time.perf_counter() - t0
    finally:
        prefect_ready_s = max(0.0, time.perf_counter() - t0 - work_s) if use_prefect else 0.0
        record_timing(run_name, startup_s=startup_s, work_s=work_s or time.perf_counter() - t0,
                      prefect_ready_s=prefect_ready_s)


def run_process(args: list[str]) -> int:
    """main() as a process: its exit code, with a traceback only for a bug (errors of input are one line)."""
    try:
        main(args)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException:  # noqa: BLE001  (a bug: show where)
        traceback.print_exc()
        return 1


def exit_without_teardown(code: list[int]):
    """An exit hook that ends the process once every other exit hook has run.

    Registered first, it runs last (hooks run in reverse order): Prefect's hooks have sent their
    last logs and events, logging is flushed, outputs are closed. Then os._exit skips the
    interpreter's module-by-module teardown, which costs 1.3 s per stage process here after
    torch, transformers, MLflow and Prefect were imported (0.03 s with this hook).
    """
    def hook():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code[0])
    return hook


if __name__ == "__main__":
    exit_code = [1]
    atexit.register(exit_without_teardown(exit_code))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # stage prints reach the console and the run's logs
    exit_code[0] = run_process(sys.argv[1:])
    sys.exit(exit_code[0])
