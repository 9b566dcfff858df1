"""Variants on 1 worker vs 2 workers: the variant phase of a tiny 4-variant pipeline, and the overhead.

    python -m bench.distributed                 # ~6 min on 2 cores
    python -m bench.distributed --workers 1 2 3 --variants 6

For each worker count: a clean clone of this repository's HEAD in a temporary folder (the coordinator)
with a tiny params.yaml (random-init 4-layer BERT, hidden 32, 240 SST-2 phrases, 2 epochs), a
local-directory DVC remote, a fresh Prefect server, N workers (`python -m flows.distributed worker`)
each in its own clone, and one MLflow team server (PostgreSQL + `mlflow server`, flows/team_server.py)
shared by the runs. Then `python -m flows.pipeline --pool bench`; the coordinator's report
(.depthtune/last_distributed.json) gives the variant phase (submit .. last variant done), each
variant's work (finetune + evaluation under DVC on the worker) and its distribution overhead (submit,
the worker's checkout/pull/push, the flow-run process around them, this side's pull and lock update).
Writes bench/results/distributed-cpu-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
VARIANTS = {"full": {}, "top1": {"train_top": 1, "train": {"lr": 2e-3}}, "probe": {"train_top": 0, "train": {"lr": 5e-3}},
            "depth2": {"depth": 2}, "top2": {"train_top": 2, "train": {"lr": 2e-3}}, "bitfit": {"bitfit": True}}


def tiny_params(n_variants: int, tracking_uri: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    sst2 = SHARED_DATA / "sst2"
    params["model"].update(source="scratch", scratch={**params["model"]["scratch"], "model_type": "bert",
                                                      "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
                                                      "num_attention_heads": 2, "intermediate_size": 64,
                                                      "max_position_embeddings": 128})
    params["data"].update(source="local", format="tsv", text_column="sentence", label_column="label", quoting=False,
                          files={"train": str(sst2 / "train.tsv"), "validation": str(sst2 / "dev.tsv"),
                                 "test": str(sst2 / "test.tsv")}, max_train_samples=240, max_eval_samples=80)
    params["tokenization"]["max_unk_fraction"] = 0.2
    params["variants"] = dict(list(VARIANTS.items())[:n_variants])
    params["train"].update(epochs=2, batch_size=16, lr=1e-3, max_length=48, checkpoint_every=0, num_threads=1,
                           patience=0, evals_per_epoch=1)
    params["tracking"].update(enabled=True, uri=tracking_uri)
    params["registry"].update(model_name="bench-distributed", min_metric=0.0, min_delta=0.0)
    return params


def env_for(project: Path, **extra) -> dict:
    env = {**os.environ, **ENV, "PYTHONPATH": str(project),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sh(args, cwd, env) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def one_run(base: Path, n_workers: int, n_variants: int, tracking_uri: str) -> dict:
    coord = base / "coordinator"
    sh(["git", "clone", "-q", str(REPO), str(coord)], base, env_for(base))
    env = env_for(coord)
    (coord / "params.yaml").write_text(yaml.safe_dump(tiny_params(n_variants, tracking_uri), sort_keys=False))
    sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(base / "dvc-remote")], coord, env)
    sh(["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", "commit", "-qam", "bench params"], coord, env)
    penv = {**env, "DEPTHTUNE_PREFECT_DIR": str(base / "prefect")}
    url = sh([sys.executable, "-m", "flows.server", "start"], coord, penv).strip().splitlines()[-1]
    workers = []
    try:
        for i in range(n_workers):
            clone = base / f"worker-{i}"
            sh(["git", "clone", "-q", str(coord), str(clone)], base, env)
            log = open(base / f"worker-{i}.log", "ab")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "flows.distributed", "worker", "--pool", "bench", "--name", f"worker-{i}"],
                cwd=clone, env=env_for(clone, PREFECT_API_URL=url), stdout=log, stderr=log, start_new_session=True))
        time.sleep(3)  # the workers register before the first submission
        t = time.perf_counter()
        sh([sys.executable, "-m", "flows.pipeline", "--pool", "bench"], coord, {**env, "PREFECT_API_URL": url})
        wall = time.perf_counter() - t
    finally:
        for w in workers:
            kill_tree(w.pid)
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=coord, env=penv, capture_output=True)
    rep = json.loads((coord / ".depthtune" / "last_distributed.json").read_text())
    return {"workers": n_workers, "wall_s": round(wall, 1), "report": rep}


def markdown(res: dict) -> str:
    runs = res["runs"]
    base = runs[0]["report"]["phases_s"]["variants"]
    lines = [f"# Distributed variants: {res['variants']} tiny variants on 1..{runs[-1]['workers']} workers "
             f"({res['machine']}, {res['date']})", "",
             "Variant phase = from the first submission to the last variant done (the coordinator's `variants` "
             "phase). Work = finetune + evaluation under DVC on the worker. Overhead per variant = submit + the "
             "worker's checkout, pull and push + the flow-run process around them + the coordinator's pull and "
             "lock update (its share).", "",
             "| workers | whole run s | shared stages s | variant phase s | vs 1 worker | rest (compare, promote) s | "
             "work per variant s (mean) | overhead per variant s (mean / max) | variants per worker |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        rep, ph = r["report"], r["report"]["phases_s"]
        rows = list(rep["variants"].values())
        work = sum(v["work_s"] for v in rows) / len(rows)
        over = [v["overhead_s"] for v in rows]
        per = {}
        for v in rows:
            per[v["worker"]] = per.get(v["worker"], 0) + 1
        lines.append(f"| {r['workers']} | {r['wall_s']:.1f} | {ph['shared_stages']:.1f} | {ph['variants']:.1f} | "
                     f"{ph['variants'] / base:.2f}x | {ph['rest']:.1f} | {work:.1f} | "
                     f"{sum(over) / len(over):.1f} / {max(over):.1f} | "
                     f"{', '.join(f'{k}: {n}' for k, n in sorted(per.items()))} |")
    lines += ["", "Per variant (last run):", "", "| variant | worker | queued s | work s | overhead s | "
              "checkout | pull | push |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in runs[-1]["report"]["variants"].items():
        t = v["worker_timings_s"]
        lines.append(f"| {name} | {v['worker']} | {v['queued_s']:.1f} | {v['work_s']:.1f} | {v['overhead_s']:.1f} | "
                     f"{t.get('checkout', 0):.2f} | {t.get('pull', 0):.2f} | {t.get('push', 0):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from flows import team_server

    root = Path(tempfile.mkdtemp(prefix="depthtune-bench-dist-"))
    root.chmod(0o755)
    server = team_server.start(root / "team")
    runs = []
    try:
        for n in args.workers:
            base = root / f"w{n}"
            base.mkdir()
            runs.append(one_run(base, n, args.variants, server.tracking_uri))
            print(f"{n} worker(s): variant phase {runs[-1]['report']['phases_s']['variants']:.1f} s, "
                  f"whole run {runs[-1]['wall_s']:.1f} s", flush=True)
    finally:
        team_server.stop(root / "team")
    res = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "variants": args.variants, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"distributed-cpu-{date.today()}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
