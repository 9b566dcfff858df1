"""The default variants compared on several datasets, the way a user runs them: `dvc repro`.

    python -m bench.fair_comparison                       # default data, TREC, SST-2; ~25-40 min on 2 cores
    python -m bench.fair_comparison --datasets trec --tag before
    python -m bench.fair_comparison --set train.lr_search.enabled=true --tag search

For each dataset: a clean clone of this repository's HEAD in a temporary folder (the venv linked),
HEAD's params.yaml with its `data` section pointed at the dataset (every other key as committed, plus --set
overrides), a cold `dvc repro` of the whole pipeline, then one table row per variant read from the
records the pipeline wrote (metrics/train/<v>.json, metrics/eval/<v>.json) and the report's
sentence from reports/comparison.json. Writes bench/results/fair-<device>-<date>[-tag].{json,md}.

Datasets (offline, from ../shared/data; nothing copied into the repository):
  default  params.yaml as committed (the builtin Rotten Tomatoes, 2,000 / 1,000 / 1,000)
  trec     TREC coarse, 6 classes: TREC.train.all (validation split off it), TREC.test.all (500)
  sst2     SST-2: train.tsv, dev.tsv, test.tsv (872 full sentences), quoting off
  clinc150 CLINC150 in-scope intents, 150 classes: train.csv (validation split off it), test.csv (4,500)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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

DATASETS = {
    "default": {},
    "trec": {"source": "local", "format": "labeltext", "encoding": "latin-1",
             "files": {"train": "{shared}/trec/TREC.train.all", "test": "{shared}/trec/TREC.test.all"},
             "labels": ["0", "1", "2", "3", "4", "5"]},
    "sst2": {"source": "local", "format": "tsv", "quoting": False, "text_column": "sentence",
             "files": {"train": "{shared}/sst2/train.tsv", "validation": "{shared}/sst2/dev.tsv",
                       "test": "{shared}/sst2/test.tsv"}},
    "clinc150": {"source": "local", "format": "csv",
                 "files": {"train": "{shared}/clinc150/train.csv", "test": "{shared}/clinc150/test.csv"}},
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def parse_value(text: str):
    """A --set value as YAML reads it: true -> True, 3e-4 -> 0.0003, [1, 2] -> a list."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    return value


def set_dotted(params: dict, key: str, value) -> None:
    node = params
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def make_params(base: dict, dataset: str, overrides: list[str]) -> dict:
    """params.yaml for one run: the committed file, the dataset's data keys, then the --set overrides."""
    params = json.loads(json.dumps(base))
    for key, value in DATASETS[dataset].items():
        if key == "files":
            value = {split: path.format(shared=SHARED_DATA) for split, path in value.items()}
        params["data"][key] = value
    for item in overrides:
        key, _, text = item.partition("=")
        set_dotted(params, key, parse_value(text))
    return params


def run_pipeline(project: Path, params: dict) -> float:
    """Clone HEAD into `project`, write params.yaml, run `dvc repro`; wall seconds."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    (project / ".venv").symlink_to(REPO / ".venv")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **ENV, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    with open(project / "repro.log", "w") as log:
        done = subprocess.run(["dvc", "repro"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=project, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if done.returncode:
        tail = (project / "repro.log").read_text().splitlines()[-15:]
        raise SystemExit(f"dvc repro failed in {project} (rc {done.returncode}):\n" + "\n".join(tail))
    return wall


def variant_row(project: Path, name: str) -> dict:
    """One variant's figures from its train and eval records."""
    train = json.loads((project / "metrics" / "train" / f"{name}.json").read_text())
    ev = json.loads((project / "metrics" / "eval" / f"{name}.json").read_text())
    search = train.get("lr_search") or {}
    lr = train["config"]["lr"]  # what it trained with: its own, train.lr, its kind's default or the searched one
    return {"variant": name, "trainable_params": train.get("trainable_params"),
            "accuracy": ev["accuracy"], "accuracy_ci": ev.get("accuracy_ci"), "macro_f1": ev.get("macro_f1"),
            "lr": lr, "lr_searched": bool(search), "lr_search_s": search.get("seconds"),
            "lr_at_edge": search.get("at_edge"), "epochs_run": train.get("epochs_run"),
            "best_epoch": train.get("best_epoch"), "best_step": train.get("best_step"), "steps": train.get("steps"),
            "stopped_early": train.get("stopped_early"), "not_converged": train.get("not_converged"),
            "convergence": train.get("convergence"), "rise": train.get("rise"), "near_chance": train.get("near_chance"),
            "extensions": train.get("extensions"), "head_lr": train["config"].get("head_lr"),
            "train_time_s": train.get("train_time_s"), "test_examples": len(ev.get("references") or [])}


def collect(project: Path, params: dict) -> dict:
    comparison = json.loads((project / "reports" / "comparison.json").read_text())
    rows = [variant_row(project, name) for name in params["variants"]]
    labels = json.loads((project / "data" / "prepared" / "labels.json").read_text())
    return {"rows": rows, "sentence": comparison["verdict"]["sentence"], "num_labels": len(labels["names"])}


def fmt_ci(row: dict) -> str:
    ci = row.get("accuracy_ci")
    inner = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{row['accuracy']:.3f}{inner}"


def converged_text(r: dict) -> str:
    """Converged by which rule (records before the plateau test: by the old one), with the near-chance flag."""
    how = r.get("convergence")
    if how is None:  # a record from before depthtune.evaluation.convergence
        text = "**no**" if r["not_converged"] else ("yes (stopped early)" if r["stopped_early"] else "yes")
    else:
        rise = r.get("rise") or {}
        figures = f", {rise['before']:.3f} -> {rise['within']:.3f} p={rise['p']:.2g}" if rise else ""
        text = ("**no** (still rising" + figures + ")" if r["not_converged"] else
                f"yes ({how}{figures if how == 'plateau' else ''})")
        text += f", {r['extensions']} ext." if r.get("extensions") else ""
    return text + (" **near chance**" if r.get("near_chance") else "")


def markdown(result: dict) -> str:
    lines = [f"# Fair comparison, {result['date']} ({result['device']}, tag {result['tag'] or '-'})", "",
             f"Commit {result['commit']}; overrides: {', '.join(result['overrides']) or 'none'}.", ""]
    for name, ds in result["datasets"].items():
        lines += [f"## {name}: {ds['num_labels']} classes, {ds['rows'][0]['test_examples']} test texts, "
                  f"`dvc repro` {ds['wall_s']:.0f} s", "",
                  "| variant | trainable | test accuracy [95% CI] | macro-F1 | lr | epochs run | best epoch | "
                  "converged | train s | lr search s |", "|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in ds["rows"]:
            conv = converged_text(r)
            lr = f"{r['lr']:.3g}" + (" (searched" + (", at edge)" if r["lr_at_edge"] else ")") if r["lr_searched"] else "")
            lr += f", head {r['head_lr']:.3g}" if r.get("head_lr") and r["head_lr"] != r["lr"] else ""
            lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {fmt_ci(r)} | {r['macro_f1']:.3f} | {lr} | "
                         f"{r['epochs_run']:.3g} | {r['best_epoch']:.3g} | {conv} | {r['train_time_s']:.1f} | "
                         f"{r['lr_search_s'] if r['lr_search_s'] is not None else '-'} |")
        lines += ["", f"Report: {ds['sentence']}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (printed)")
    ap.add_argument("--collect", metavar="DIR", help="read an already-run project (one dataset) instead of running")
    args = ap.parse_args(argv)
    # params.yaml as committed: the clone runs HEAD, so uncommitted edits in the working tree must not leak in
    base = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    result = {"date": date.today().isoformat(), "device": "cpu", "tag": args.tag, "commit": commit,
              "overrides": args.overrides, "datasets": {}}
    suffix = f"-{args.tag}" if args.tag else ""
    out = RESULTS / f"fair-cpu-{result['date']}{suffix}"
    for name in args.datasets:
        params = make_params(base, name, args.overrides)
        if args.collect:
            project, wall = Path(args.collect), float("nan")
            params = yaml.safe_load((project / "params.yaml").read_text())
        else:
            project = Path(tempfile.mkdtemp(prefix=f"fair-{name}-"))
            shutil.rmtree(project)
            print(f"{name}: dvc repro in {project} ...", flush=True)
            wall = run_pipeline(project, params)
        result["datasets"][name] = {"wall_s": round(wall, 1), **collect(project, params)}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown({**result, "datasets": {name: result["datasets"][name]}}), flush=True)
        if not (args.keep or args.collect):
            shutil.rmtree(project, ignore_errors=True)
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main()
