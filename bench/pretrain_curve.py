"""Downstream accuracy against the pretraining budget: an example's pretraining at several max_steps, one variant.

    python -m bench.pretrain_curve --example from-zero-zh --steps 500 3000 --variant full   # ~35 min on 2 cores

For each budget: a clean clone of this repository's HEAD in a temporary folder, examples/<example>/params.yaml
as params.yaml with `pretrain.max_steps` set (the lr schedule spans it: each budget is a whole run, not a
snapshot of a longer one) and only `--variant` kept, MLflow off, stages without Prefect; `dvc repro`. (Budget 0, random init with
the same tokenizer, is the example's own `scratch` variant.) One row per budget: pretraining steps,
tokens, minutes, held-out perplexity, the variant's test accuracy with its 95% interval.
Writes bench/results/pretrain-curve-<example>-<date>[-<tag>].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DEPTHTUNE_PREFECT": "0"}


def one_budget(base: Path, example: str, steps: int, variant: str) -> dict:
    proj = base / f"steps-{steps}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
    params = yaml.safe_load((REPO / "examples" / example / "params.yaml").read_text())
    params["pretrain"]["max_steps"] = steps
    params["pretrain"]["max_minutes"] = None  # the steps decide, whatever else runs on the machine
    params["variants"] = {variant: params["variants"][variant]}
    params["tracking"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(proj)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro at {steps} steps failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    pre = json.loads((proj / "metrics" / "pretrain.json").read_text())
    ev = json.loads((proj / "metrics" / "eval" / f"{variant}.json").read_text())
    return {"steps": steps, "tokens": pre["tokens"], "pretrain_s": pre["train_time_s"],
            "perplexity": pre["final_perplexity"], "accuracy": ev["accuracy"], "accuracy_ci": ev["accuracy_ci"],
            "wall_s": round(time.perf_counter() - t, 1)}


def markdown(res: dict) -> str:
    lines = [f"# {res['example']}: {res['variant']}'s test accuracy against the pretraining budget "
             f"({res['machine']}, {res['date']}, commit {res.get('commit', '?')})", "",
             "Each budget a whole pretraining run (its lr schedule spans max_steps), then the variant fine-tuned "
             "from it; the same splits and seed as the example.", "",
             "| pretraining steps | tokens | pretraining min | held-out perplexity | accuracy (95% CI) | repro wall s |",
             "|---:|---:|---:|---:|---|---:|"]
    for r in res["rows"]:
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['steps']:,} | {r['tokens']:,} | {r['pretrain_s'] / 60:.1f} | {r['perplexity']:,.1f} | "
                     f"{r['accuracy']:.4f} [{lo:.3f}, {hi:.3f}] | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="from-zero-zh")
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 3000])
    ap.add_argument("--variant", default="full")
    ap.add_argument("--tag", default="", help="appended to the results file names (runs of one day kept apart)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="depthtune-curve-"))
    rows = []
    try:
        for steps in args.steps:
            rows.append(one_budget(base, args.example, steps, args.variant))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    res = {"example": args.example, "variant": args.variant, "date": str(date.today()), "commit": commit,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"pretrain-curve-{args.example}-{date.today()}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
