"""Variants on Prefect work-pool workers, sharing data and models through a DVC remote (docs/scale-out.md).

    # once per project: a DVC remote every machine reaches (S3, SSH, a shared directory), committed
    dvc remote add -d team s3://bucket/depthtune && git commit -am "team remote" && git push
    # on every machine, in its own clone of the project; one worker per GPU (or one per CPU machine)
    export PREFECT_API_URL=http://prefect-host:4200/api
    python -m flows.distributed worker --pool gpus --gpu 0
    # where the pipeline is driven, at the commit to run (pushed where the workers fetch from):
    python -m flows.pipeline --pool gpus              # = python -m flows.distributed run --pool gpus

The coordinator (`run`) runs the shared stages here (prepare .. audit: `dvc repro audit`), pushes
their outputs to the DVC remote (the few DVC keeps out of its cache, such as audit/, go with the
flow run), submits one flow run per variant to the work pool (deployment
`depthtune-variant/<pool>`, a process-type pool) and waits. A worker takes one variant at a time
(`prefect worker start --limit 1`); its flow run checks the commit out in the worker's own clone,
takes the coordinator's dvc.lock, pulls the variant's inputs, runs `finetune@v` and `evaluation@v`
through DVC and pushes their outputs, then hands the two dvc.lock entries (and the uncached metrics
and plots) back as a Prefect artifact.
The coordinator writes those entries into its dvc.lock, pulls the outputs (`dvc pull`: nothing is
re-run) and runs the rest of the DAG (compare, promote) with plain `dvc repro`: the same dvc.lock,
reports and registry a local run gives.

A worker that dies (SIGKILL, a lost machine) stops heartbeating; its variant's flow run is marked
Crashed and submitted again (another worker takes it), up to --attempts times. The variant's MLflow
run is keyed by (pipeline, variant), so the new attempt re-attaches to the same run: one run per
variant. DVC's remote is content-addressed: nothing already pushed is lost.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from prefect import flow

from depthtune import layout
from depthtune.layout import PROJECT_ROOT

FLOW_NAME = "depthtune-variant"
VARIANT_STAGES = layout.PER_VARIANT  # finetune, evaluation: on the workers
SHARED_STAGES = layout.STAGES[:layout.STAGES.index(VARIANT_STAGES[0])]  # prepare .. audit: on the coordinator
COMMITTED = ("params.yaml", "dvc.yaml", "depthtune", "stages", "flows")  # what a worker checks out must be this
HEARTBEAT_S, QUERY_S = 10, 2  # worker defaults: dead after 3 missed heartbeats (~30 s); polls for work every 2 s
RESULT_FENCE = re.compile(r"```json\n(.*?)\n```", re.S)


# ----------------------------------------------------------------------------- small helpers


def tool(name: str) -> str:
    """A console script of this environment (dvc, prefect), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def sh(args: list[str], cwd: Path, env: Optional[dict] = None) -> None:
    print("$ " + " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {proc.returncode} (in {cwd})")


def git(root: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


class Clock:
    """Seconds per phase: `with clock("pull"): ...`."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.s[phase] = round(self.s.get(phase, 0.0) + time.perf_counter() - t, 3)


def stage_names(variant: str) -> list[str]:
    return [f"{s}@{variant}" for s in VARIANT_STAGES]


def lock_entries(lock_text: str, stages: list[str]) -> dict:
    """The dvc.lock entries of `stages` (a stage missing from the lock is left out)."""
    lock = yaml.safe_load(lock_text) or {}
    return {s: lock["stages"][s] for s in stages if s in (lock.get("stages") or {})}


def merge_lock(lock_path: Path, entries: dict) -> None:
    """Write `entries` (stage -> dvc.lock entry) into dvc.lock, keeping every other stage's entry."""
    lock = (yaml.safe_load(lock_path.read_text()) if lock_path.exists() else None) or {"schema": "2.0"}
    lock.setdefault("stages", {}).update(entries)
    tmp = lock_path.with_suffix(".lock.tmp")
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False))
    tmp.replace(lock_path)


def uncached_paths(dvc_yaml: dict, stage: str) -> list[str]:
    """The outputs dvc.yaml keeps out of DVC's cache (`cache: false`) for `stage` (`name` or `name@variant`)."""
    name, _, variant = stage.partition("@")
    spec = (dvc_yaml.get("stages") or {}).get(name) or {}
    body = spec.get("do", spec)  # foreach stages: the template under `do`, the variant as ${key}
    return [path.replace("${key}", variant)
            for section in ("outs", "metrics", "plots") for item in body.get(section) or [] if isinstance(item, dict)
            for path, opts in item.items() if isinstance(opts, dict) and opts.get("cache") is False]


def uncached_files(root: Path, stages: list[str]) -> dict[str, str]:
    """The uncached outputs of `stages` (metrics, plots, the audit: the small files a local run leaves to
    git), base64 by path: they travel with the flow run, everything else through the DVC remote."""
    dvc_yaml, files = yaml.safe_load((root / "dvc.yaml").read_text()) or {}, {}
    for stage in stages:
        for rel in uncached_paths(dvc_yaml, stage):
            path = root / rel
            for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                files[str(f.relative_to(root))] = base64.b64encode(f.read_bytes()).decode()
    return files


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, data in files.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise RuntimeError(f"{rel}: outside the project; refusing to write it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


def shared_stage_names(root: Path) -> list[str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    return [s for s in (lock.get("stages") or {}) if s.split("@")[0] in SHARED_STAGES]


def child_env(**extra: str) -> dict:
    """This environment for dvc children: this venv first on PATH, no Prefect flow-run id of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- the worker's side


def worker_checkout() -> Path:
    path = os.environ.get("DEPTHTUNE_CHECKOUT")
    if not path:
        raise RuntimeError("DEPTHTUNE_CHECKOUT is not set: start workers with `python -m flows.distributed worker`")
    return Path(path)


def checkout_commit(checkout: Path, repo: str, commit: str) -> None:
    """Put the worker's clone at `commit` (fetched from `repo` when it does not have it yet)."""
    have = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=checkout, capture_output=True)
    if have.returncode != 0:
        if subprocess.run(["git", "fetch", "--quiet", repo, commit], cwd=checkout, capture_output=True).returncode:
            git(checkout, "fetch", "--quiet", repo, "+refs/heads/*:refs/remotes/depthtune-coordinator/*")
    git(checkout, "checkout", "--quiet", "--force", "--detach", commit)


@flow(name=FLOW_NAME, log_prints=True, validate_parameters=False)
def variant_run(repo: str, commit: str, variant: str, dvc_lock: str, pipeline_key: str,
                files: Optional[dict] = None) -> dict:
    """One variant on this worker: checkout, pull, finetune + evaluation through DVC, push, lock entries back."""
    from prefect.artifacts import create_markdown_artifact

    checkout, clock = worker_checkout(), Clock()
    worker = os.environ.get("DEPTHTUNE_WORKER_NAME", socket.gethostname())
    print(f"{variant} on {worker} ({os.environ.get('CUDA_VISIBLE_DEVICES') or 'CPU'}) in {checkout} at {commit[:10]}")
    env = child_env(DEPTHTUNE_PIPELINE_KEY=pipeline_key)
    dvc = tool("dvc")
    with clock("checkout"):
        checkout_commit(checkout, repo, commit)
        (checkout / "dvc.lock").write_text(dvc_lock)  # the shared stages as the coordinator ran them
        write_files(checkout, files or {})  # and their uncached outputs (the audit)
    with clock("pull"):  # the variant's inputs (and its outputs, when an earlier run already made them)
        sh([dvc, "pull", "--quiet", "--allow-missing", "--with-deps", f"evaluation@{variant}"], checkout, env)
    for stage in VARIANT_STAGES:
        with clock(stage):
            sh([dvc, "repro", "--single-item", f"{stage}@{variant}"], checkout, env)
    with clock("push"):
        sh([dvc, "push", "--quiet", *stage_names(variant)], checkout, env)
    result = {"variant": variant, "worker": worker, "commit": commit,
              "lock": lock_entries((checkout / "dvc.lock").read_text(), stage_names(variant)),
              "files": uncached_files(checkout, stage_names(variant)), "timings_s": clock.s}
    create_markdown_artifact(
        markdown=f"# {variant} on {worker}\n\ndvc.lock entries of {', '.join(stage_names(variant))} "
                 f"(outputs pushed to the DVC remote):\n\n```json\n{json.dumps(result, indent=1)}\n```\n",
        description=f"depthtune: {variant}'s dvc.lock entries")
    return result


def worker(pool: str, gpu: Optional[str], name: Optional[str], checkout: Optional[str],
           heartbeat_s: int = HEARTBEAT_S, query_s: int = QUERY_S) -> None:
    """Exec `prefect worker start` for `pool`: one flow run at a time, this clone, this GPU."""
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("PREFECT_API_URL is not set: export the team's Prefect server "
                           "(the coordinator prints it), e.g. http://prefect-host:4200/api")
    root = Path(checkout or os.getcwd()).resolve()
    if not (root / "dvc.yaml").is_file() or not (root / ".git").exists():
        raise RuntimeError(f"{root}: not a clone of a depthtune project (no dvc.yaml or .git); "
                           "start the worker in its own clone (git clone <project> && cd <clone>)")
    name = name or f"{socket.gethostname()}-{'gpu' + gpu if gpu is not None else 'cpu'}"
    env = {**child_env(), "DEPTHTUNE_CHECKOUT": str(root), "DEPTHTUNE_WORKER_NAME": name,
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           "PREFECT_WORKER_HEARTBEAT_SECONDS": str(heartbeat_s), "PREFECT_WORKER_QUERY_SECONDS": str(query_s)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    print(f"worker {name}: pool {pool}, checkout {root}, {'GPU ' + gpu if gpu is not None else 'CPU'}, "
          f"server {os.environ['PREFECT_API_URL']}", flush=True)
    args = [tool("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1", "--name", name]
    os.execvpe(args[0], args, env)  # this process becomes the worker: a signal to it reaches Prefect


# ----------------------------------------------------------------------------- the coordinator's side


@dataclass
class Job:
    variant: str
    attempts: list = field(default_factory=list)  # {"flow_run": id, "submitted": t, "worker": .., "state": ..}
    result: Optional[dict] = None

    @property
    def current(self) -> Optional[dict]:
        return self.attempts[-1] if self.attempts else None


def require_committed(root: Path) -> str:
    """HEAD, refusing when params, dvc.yaml or code differ from it (workers check HEAD out)."""
    commit = git(root, "rev-parse", "HEAD")
    changed = git(root, "status", "--porcelain", "--untracked-files=no", "--", *COMMITTED)
    if changed:
        first = changed.splitlines()[0][3:]
        raise RuntimeError(f"{first}: changed since the last commit; workers run commit {commit[:10]}, "
                           "so commit (and push) params.yaml, dvc.yaml and the code first")
    return commit


def require_remote(root: Path) -> str:
    remote = subprocess.run([tool("dvc"), "remote", "default"], cwd=root, capture_output=True, text=True)
    name = remote.stdout.strip()
    if remote.returncode != 0 or not name:
        raise RuntimeError("no default DVC remote: workers share data and models through one; "
                           "`dvc remote add -d team <s3://..., ssh://..., /shared/dir>` and commit .dvc/config")
    return name


def default_repo(root: Path) -> str:
    """Where workers fetch the commit from: the `origin` remote, else this clone's own path."""
    return git(root, "remote", "get-url", "origin", check=False) or str(root)


def changed_variants(root: Path, variants: list[str]) -> list[str]:
    """Variants whose finetune or evaluation is not up to date here (the others need no worker)."""
    proc = subprocess.run([tool("dvc"), "status", "--json", *[s for v in variants for s in stage_names(v)]],
                          cwd=root, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        return list(variants)
    status = json.loads(proc.stdout or "{}")
    return [v for v in variants if any(s in status for s in stage_names(v))]


def ensure_deployment(client, pool: str):
    """The process-type work pool (created if missing) and the variant flow's deployment on it."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.types.entrypoint import EntrypointType
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    deployment = variant_run.to_deployment(name=pool, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH)
    return deployment.apply()


def submit(client, deployment_id, job: Job, params: dict) -> None:
    t = time.perf_counter()
    run = client.create_flow_run_from_deployment(deployment_id, parameters={**params, "variant": job.variant},
                                                 name=f"{job.variant}-attempt{len(job.attempts) + 1}")
    job.attempts.append({"flow_run": str(run.id), "submitted": time.time(), "submit_s": time.perf_counter() - t,
                         "worker": None, "state": "SCHEDULED"})
    print(f"{job.variant}: submitted (attempt {len(job.attempts)}, flow run {run.name})", flush=True)


def dead_workers(client, pool: str) -> set[str]:
    """Workers of the pool that missed three heartbeats (killed, or their machine is gone)."""
    now, dead = dt.datetime.now(dt.timezone.utc), set()
    for w in client.read_workers_for_work_pool(pool):
        interval = w.heartbeat_interval_seconds or 30
        if w.last_heartbeat_time is None or (now - w.last_heartbeat_time).total_seconds() > 3 * interval + 2:
            dead.add(w.name)
    return dead


def read_result(client, flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    for art in arts:
        m = RESULT_FENCE.search(str(art.data or ""))
        if m:
            return json.loads(m.group(1))
    raise RuntimeError(f"flow run {flow_run_id} completed without its dvc.lock entries (no artifact)")


def wait(client, pool: str, deployment_id, jobs: dict[str, Job], params: dict, max_attempts: int,
         timeout_s: float, poll_s: float = 1.0) -> None:
    """Until every job has a result: resubmit crashed / failed runs and runs of dead workers."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    deadline = time.monotonic() + timeout_s
    while any(j.result is None for j in jobs.values()):
        if time.monotonic() > deadline:
            pending = [j.variant for j in jobs.values() if j.result is None]
            raise RuntimeError(f"variants not done within {timeout_s:.0f} s: {', '.join(pending)} "
                               f"(are workers running on pool {pool!r}?)")
        dead = None
        for job in jobs.values():
            if job.result is not None:
                continue
            att = job.current
            run = client.read_flow_run(uuid.UUID(att["flow_run"]))
            state = run.state.type if run.state else StateType.SCHEDULED
            att["worker"] = (run.labels or {}).get("prefect.worker.name") or att["worker"]
            att["state"] = state.value
            if run.start_time and "started" not in att:
                att["started"] = run.start_time.timestamp()
            retry_reason = None
            if state == StateType.COMPLETED:
                job.result = read_result(client, att["flow_run"])
                att["ended"] = run.end_time.timestamp() if run.end_time else time.time()
                print(f"{job.variant}: done on {job.result['worker']} ({run.total_run_time.total_seconds():.1f} s)",
                      flush=True)
            elif state in (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
                retry_reason = f"{state.value.lower()}: {run.state.message or ''}".strip()
            elif state in (StateType.RUNNING, StateType.PENDING) and att["worker"]:
                dead = dead_workers(client, pool) if dead is None else dead
                if att["worker"] in dead:
                    retry_reason = f"worker {att['worker']} stopped heartbeating"
                    client.set_flow_run_state(run.id, Crashed(message=retry_reason), force=True)
                    att["state"] = "CRASHED"
            if retry_reason:
                att["reason"] = retry_reason
                if len(job.attempts) >= max_attempts:
                    raise RuntimeError(f"variant {job.variant} failed {len(job.attempts)} times; "
                                       f"last: {retry_reason} (flow run {att['flow_run']})")
                print(f"{job.variant}: attempt {len(job.attempts)} {retry_reason}; submitting again", flush=True)
                submit(client, deployment_id, job, params)
        time.sleep(poll_s)


def coordinate(pool: str, repo: Optional[str] = None, max_attempts: int = 3, timeout_s: float = 86400.0,
               root: Path = PROJECT_ROOT) -> dict:
    """The whole pipeline with the variants on the pool's workers; returns the run's report."""
    from depthtune.config import load_params
    from prefect.client.orchestration import get_client

    t0, clock = time.perf_counter(), Clock()
    commit, remote = require_committed(root), require_remote(root)
    repo = repo or default_repo(root)
    key = os.environ.setdefault("DEPTHTUNE_PIPELINE_KEY", uuid.uuid4().hex[:16])  # one MLflow parent run
    dvc, env = tool("dvc"), child_env()
    with clock("shared_stages"):
        sh([dvc, "repro", SHARED_STAGES[-1]], root, env)
    with clock("push_shared"):
        sh([dvc, "push", "--quiet"], root, env)
    variants = list(load_params(root / "params.yaml").variants)
    todo = changed_variants(root, variants)
    print(f"{len(todo)} of {len(variants)} variants to train on pool {pool!r} "
          f"(commit {commit[:10]} from {repo}, DVC remote {remote!r}, Prefect {os.environ.get('PREFECT_API_URL')})",
          flush=True)
    params = {"repo": repo, "commit": commit, "dvc_lock": (root / "dvc.lock").read_text(), "pipeline_key": key,
              "files": uncached_files(root, shared_stage_names(root))}
    jobs = {v: Job(v) for v in todo}
    with get_client(sync_client=True) as client, clock("variants"):
        deployment_id = ensure_deployment(client, pool)
        for job in jobs.values():
            submit(client, deployment_id, job, params)
        wait(client, pool, deployment_id, jobs, params, max_attempts, timeout_s)
    with clock("record"):  # the workers' lock entries, then their outputs from the remote: nothing re-runs
        merge_lock(root / "dvc.lock", {s: e for j in jobs.values() for s, e in j.result["lock"].items()})
        for job in jobs.values():
            write_files(root, job.result.get("files") or {})
        stages = [s for v in todo for s in stage_names(v)]
        if stages:
            sh([dvc, "pull", "--quiet", *stages], root, env)
    with clock("rest"):  # compare, promote: everything else is up to date
        sh([dvc, "repro"], root, env)
    return {**report(jobs, variants, clock.s, time.perf_counter() - t0, pool, commit), "pipeline_key": key}


def report(jobs: dict[str, Job], variants: list[str], phases: dict, wall_s: float, pool: str, commit: str) -> dict:
    """Per variant: worker, attempts, queue wait, work (finetune + evaluation), distribution overhead."""
    rows = {}
    record_share = phases.get("record", 0.0) / max(1, len(jobs))
    for v, job in jobs.items():
        att, t = job.current, job.result["timings_s"]
        work = sum(t.get(s, 0.0) for s in VARIANT_STAGES)
        run_s = att.get("ended", 0) - att.get("started", att.get("ended", 0))
        # submit + the worker's checkout/pull/push + the flow-run process around them + this side's pull/commit share
        overhead = att["submit_s"] + max(0.0, run_s - work) + record_share
        rows[v] = {"worker": job.result["worker"], "attempts": [{k: a.get(k) for k in ("worker", "state", "reason")}
                                                               for a in job.attempts],
                   "queued_s": round(att.get("started", att["submitted"]) - att["submitted"], 2),
                   "work_s": round(work, 2), "overhead_s": round(overhead, 2), "worker_timings_s": t}
    return {"pool": pool, "commit": commit, "wall_s": round(wall_s, 2), "phases_s": phases,
            "up_to_date": [v for v in variants if v not in jobs], "variants": rows}


def summary_lines(rep: dict) -> list[str]:
    lines = [f"distributed run on pool {rep['pool']}: {rep['wall_s']:.1f} s "
             f"({', '.join(f'{k} {v:.1f} s' for k, v in rep['phases_s'].items())})",
             f"{'variant':<14} {'worker':<22} {'attempts':>8} {'queued s':>9} {'work s':>8} {'overhead s':>10}"]
    for v, r in rep["variants"].items():
        lines.append(f"{v:<14} {r['worker']:<22} {len(r['attempts']):>8} {r['queued_s']:>9.1f} {r['work_s']:>8.1f} "
                     f"{r['overhead_s']:>10.1f}")
    if rep["up_to_date"]:
        lines.append(f"up to date (not sent): {', '.join(rep['up_to_date'])}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="coordinate: shared stages here, variants on the pool's workers")
    run.add_argument("--pool", required=True, help="the Prefect work pool (process type; created if missing)")
    run.add_argument("--repo", default=None, help="where workers fetch the commit (default: origin, else this clone)")
    run.add_argument("--attempts", type=int, default=3, help="tries per variant when a worker dies (default 3)")
    run.add_argument("--timeout", type=float, default=86400.0, help="seconds to wait for the variants")
    wk = sub.add_parser("worker", help="run a worker of the pool in this clone")
    wk.add_argument("--pool", required=True)
    wk.add_argument("--gpu", default=None, help="the one GPU this worker uses (CUDA_VISIBLE_DEVICES); none: CPU")
    wk.add_argument("--name", default=None, help="worker name (default <host>-gpu<N> / <host>-cpu)")
    wk.add_argument("--checkout", default=None, help="the worker's clone (default: the current directory)")
    wk.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds between heartbeats (dead after 3 missed)")
    args = ap.parse_args(argv)
    if args.command == "worker":
        worker(args.pool, args.gpu, args.name, args.checkout, args.heartbeat)
        return
    run_pool(args.pool, args.repo, args.attempts, args.timeout)


def run_pool(pool: str, repo: Optional[str], attempts: int, timeout_s: float) -> dict:
    """`coordinate` with a Prefect server (PREFECT_API_URL, else the project's own), report printed and kept."""
    from depthtune import runtime

    runtime.configure_process()
    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import ensure_server
        os.environ["PREFECT_API_URL"] = ensure_server()
    rep = coordinate(pool, repo, attempts, timeout_s)
    print("\n".join(summary_lines(rep)), flush=True)
    state = PROJECT_ROOT / ".depthtune"
    state.mkdir(exist_ok=True)
    (state / "last_distributed.json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
