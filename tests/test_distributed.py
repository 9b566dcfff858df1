"""From one machine to many, with the real parts (issue 18).

A private PostgreSQL cluster (Debian's package, started as the `postgres` user in a temp dir) under a
real `mlflow server` with proxied artifacts; a real `prefect server`; two real `prefect worker`
processes (`python -m flows.distributed worker`), each in its own git clone of a tiny project, sharing
a local-directory DVC remote with the coordinator. Everything on 127.0.0.1.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import make_project, project_env, tiny_params
from flows import team_server

pytestmark = pytest.mark.timeout(900)

POOL = "tiny-pool"
VARIANTS = {"full": {}, "top1": {"train_top": 1, "train": {"lr": 2e-3}},
            "probe": {"train_top": 0, "train": {"lr": 5e-3}}}


def run(args, cwd, env, timeout=600):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def team():
    """PostgreSQL + mlflow server in a directory the `postgres` user can reach (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="depthtune-team-"))
    root.chmod(0o755)
    server = team_server.start(root / "server")
    yield server
    team_server.stop(root / "server")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_data, team):
    """A coordinator clone with a DVC remote, a Prefect server, two workers in their own clones."""
    base = tmp_path_factory.mktemp("cluster")
    params = tiny_params(shared_data, variants=VARIANTS, tracking={"enabled": True, "uri": team.tracking_uri})
    coord = make_project(base / "coordinator", params)
    env0 = project_env(coord)
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(base / "dvc-remote")], coord, env0)
    run(["git", "commit", "-qam", "team remote"], coord, env0)
    prefect_env = {**env0, "DEPTHTUNE_PREFECT_DIR": str(base / "prefect"), "DEPTHTUNE_PREFECT_IDLE_S": "900"}
    url = run([sys.executable, "-m", "flows.server", "start"], coord, prefect_env).strip().splitlines()[-1]
    workers = {}
    for name in ("worker-a", "worker-b"):
        clone = base / name
        run(["git", "clone", "-q", str(coord), str(clone)], base, env0)
        log = open(base / f"{name}.log", "ab")
        workers[name] = subprocess.Popen(
            [sys.executable, "-m", "flows.distributed", "worker", "--pool", POOL, "--name", name, "--heartbeat", "2"],
            cwd=clone, env=project_env(clone, PREFECT_API_URL=url), stdout=log, stderr=log, start_new_session=True)
    yield {"base": base, "coord": coord, "url": url, "workers": workers, "params": params}
    for proc in workers.values():
        kill_tree(proc.pid)
    subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=coord, env=prefect_env, capture_output=True)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every descendant (the worker, its flow-run process, dvc, the stage)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


def coordinate(cluster, timeout=600):
    env = project_env(cluster["coord"], PREFECT_API_URL=cluster["url"])
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--pool", POOL], cwd=cluster["coord"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def last_report(coord: Path) -> dict:
    return json.loads((coord / ".depthtune" / "last_distributed.json").read_text())


def eval_metric(project: Path, variant: str) -> float:
    return json.loads((project / "metrics" / "eval" / f"{variant}.json").read_text())["accuracy"]


def mlflow_variant_runs(uri: str, key: str) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("depthtune")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`depthtune.pipeline_key` = '{key}'",
                              run_view_type=ViewType.ACTIVE_ONLY)
    out: dict = {}
    for r in runs:
        if r.data.tags.get("depthtune.role") == "variant":
            out.setdefault(r.data.tags["depthtune.variant"], []).append(r)
    return out


def flow_runs(api_url: str, states: list[str]) -> list[dict]:
    """The Prefect server's flow runs in `states`, through its REST API."""
    import urllib.request

    body = json.dumps({"flow_runs": {"state": {"type": {"any_": states}}}}).encode()
    req = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def kill_a_worker_in_its_second_variant(cluster, proc) -> tuple[str, str]:
    """Both workers start a variant; the third starts on whichever finished first: SIGKILL that worker (and its
    flow-run process, dvc, the stage) 3 s into it. Returns (worker, variant)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = flow_runs(cluster["url"], ["RUNNING", "COMPLETED"])
        worker = {fr["id"]: (fr.get("labels") or {}).get("prefect.worker.name") for fr in runs}
        finished_one = {worker[fr["id"]] for fr in runs if fr["state_type"] == "COMPLETED"}
        for fr in runs:
            if fr["state_type"] == "RUNNING" and worker[fr["id"]] in finished_one & set(cluster["workers"]):
                time.sleep(3)  # into its finetune stage
                assert len(kill_tree(cluster["workers"][worker[fr["id"]]].pid)) >= 2  # the worker + its flow run
                return worker[fr["id"]], fr["name"].rsplit("-attempt", 1)[0]
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"no worker started a second variant: {proc.communicate()[0][-4000:]}")


def test_variants_on_two_workers_survive_a_killed_worker_and_give_what_a_local_run_gives(cluster, shared_data,
                                                                                        local_pipeline):
    coord = cluster["coord"]
    proc = coordinate(cluster)
    victim, variant = kill_a_worker_in_its_second_variant(cluster, proc)
    out = finish(proc)
    rep = last_report(coord)
    assert set(rep["variants"]) == set(VARIANTS)
    # the killed worker's variant: marked crashed once its heartbeats stopped, then run on the other worker
    attempts = rep["variants"][variant]["attempts"]
    assert len(attempts) == 2, out[-3000:]
    assert attempts[0]["worker"] == victim and attempts[0]["state"] == "CRASHED"
    assert "stopped heartbeating" in attempts[0]["reason"]
    survivor = next(n for n in cluster["workers"] if n != victim)
    assert attempts[1]["worker"] == survivor == rep["variants"][variant]["worker"]
    # both workers did work: the victim finished its first variant before it was killed
    assert {r["worker"] for r in rep["variants"].values()} == {"worker-a", "worker-b"}, out[-3000:]
    assert sorted(len(r["attempts"]) for r in rep["variants"].values()) == [1, 1, 2]
    # the lock records every stage as made: nothing left to run, the outputs are here
    status = run([sys.executable, "-m", "dvc", "status"], coord, project_env(coord))
    assert "up to date" in status, status
    for v in VARIANTS:
        assert (coord / "models" / v / "model.safetensors").is_file()

    # the same params run locally (SQLite MLflow, plain dvc repro): the same models, metrics and promotion
    local = local_pipeline["made"]
    assert tiny_params(shared_data, variants=VARIANTS) == tiny_params(shared_data)  # the local run's params
    lock_d = yaml.safe_load((coord / "dvc.lock").read_text())["stages"]
    assert set(lock_d) == set(local["lock"])
    for v in VARIANTS:
        assert eval_metric(coord, v) == local["eval"][v]["accuracy"]
        model_d, model_l = ([o for o in lock[f"finetune@{v}"]["outs"] if o["path"] == f"models/{v}"]
                            for lock in (lock_d, local["lock"]))
        assert model_d and model_d == model_l  # bit-identical models (timings in the metrics files differ)
    prom_d = json.loads((coord / "reports" / "promotion.json").read_text())
    assert prom_d["candidate"]["variant"] == local["promotion"]["candidate"]["variant"]
    assert prom_d["decision"] == local["promotion"]["decision"] == "promoted"

    # one MLflow server on PostgreSQL holds it all: one finished run per variant (the re-run re-attached to
    # the killed attempt's run), the champion in its registry
    from mlflow import MlflowClient

    runs = mlflow_variant_runs(cluster["params"]["tracking"]["uri"], rep["pipeline_key"])
    assert {v: [r.info.status for r in rs] for v, rs in runs.items()} == {v: ["FINISHED"] for v in VARIANTS}
    client = MlflowClient(tracking_uri=cluster["params"]["tracking"]["uri"])
    champ = client.get_model_version_by_alias("tiny-classifier", "champion")
    assert champ.tags["depthtune.variant"] == prom_d["candidate"]["variant"]


LOCK_TAKER = """
import sys, time
from mlflow import MlflowClient
from depthtune.tracking.store import store_lock
uri, log, hold_s, times = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
for _ in range(times):
    with store_lock(client, "promote-tiny", timeout_s=60, lease_s=3):
        with open(log, "a") as f:
            f.write(f"in {time.time()}\\n")
            f.flush()
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"out {time.time()}\\n")
"""


def test_the_promotion_lock_in_the_store_serialises_processes_and_outlives_a_dead_holder(team, tmp_path):
    from mlflow import MlflowClient

    env = project_env(Path.cwd())
    log = tmp_path / "lock.log"
    # three takers, short holds: a release often lands between another's insert and the store's read of the
    # name it collided with (the store then answers RESOURCE_DOES_NOT_EXIST: store_lock retries, not raises)
    takers = [subprocess.Popen([sys.executable, "-c", LOCK_TAKER, team.tracking_uri, str(log), "0.1", "4"], env=env)
              for _ in range(3)]
    assert [p.wait(timeout=120) for p in takers] == [0, 0, 0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 24
    assert [e[0] for e in events] == ["in", "out"] * 12  # never two holders at once
    # a holder killed while it holds: the lock stays until its lease (3 s) runs out, then the next taker breaks it
    dead = subprocess.Popen([sys.executable, "-c", LOCK_TAKER, team.tracking_uri, str(tmp_path / "dead.log"), "60", "1"],
                            env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "dead.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    dead.kill()
    dead.wait()
    client = MlflowClient(tracking_uri=team.tracking_uri)
    assert client.get_registered_model("promote-tiny--lock")  # left behind by the dead holder
    t = time.monotonic()
    assert subprocess.run([sys.executable, "-c", LOCK_TAKER, team.tracking_uri, str(log), "0", "1"], env=env,
                          timeout=120).returncode == 0
    assert 0.5 < time.monotonic() - t < 30
    assert log.read_text().count("in ") == 13
    assert not [m for m in client.search_registered_models() if m.name == "promote-tiny--lock"]  # released
