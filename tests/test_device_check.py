"""bench/device_check.sh: the GPU check's CPU dry run (same code path, tiny sizes) and its wheel list.

The dry run takes ~20-40 s on 2 cores; no timing thresholds, only structure and sanity.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["bert-full", "qwen-lora", "bert-top2", "qwen-top2"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_writes_the_results(tmp_path):
    out, env_out = tmp_path / "results", tmp_path / "OUT"
    env_out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(env_out)}
    proc = subprocess.run(["bash", "bench/device_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons, mds = sorted(out.glob("device-*-dry-run.json")), sorted(out.glob("device-*-dry-run.md"))
    assert len(jsons) == 1 and len(mds) == 1, list(out.iterdir())
    # $OUT (the GPU machine's folder that comes back) gets a copy of both
    assert sorted(p.name for p in env_out.iterdir()) == sorted([jsons[0].name, mds[0].name])
    assert "DRY RUN" in mds[0].read_text()

    res = json.loads(jsons[0].read_text())
    assert res["schema"] == "depthtune.bench.device_check/1" and res["dry_run"] is True and res["complete"] is True
    assert res["skipped"] == [] and "FAILED" not in mds[0].read_text()
    assert res["plan"]["device"] == "cpu" and res["plan"]["precision"] == "fp32"
    assert positive(res["gemm"]["peak_flops"]) and positive(res["gemm_end"]["peak_flops"])
    assert res["mfu_peak_flops"] == max(res["gemm"]["peak_flops"], res["gemm_end"]["peak_flops"])
    assert not set(res["imports"]["heavy_imported"]) & {"mlflow", "prefect", "dvc"}
    assert [j["job"] for j in res["jobs"]] == JOBS
    steps = res["plan"]["steps"]
    for job in res["jobs"]:
        assert positive(job["ratio_tokens_per_s"])
        assert math.isfinite(job["memory_vs_estimate"]) and job["memory_vs_estimate"] >= 0  # RSS growth can be 0
        for recipe in ("depthtune", "trainer"):
            row = job[recipe]
            assert row["recipe"] == recipe
            for span in ("timed", "whole"):
                for key in ("seconds", "samples_per_s", "tokens_per_s", "mfu"):
                    assert positive(row[span][key]), (job["job"], recipe, span, key, row[span][key])
            assert row["timed"]["steps"] == steps
            assert math.isclose(row["timed"]["tokens_per_s"], row["timed"]["samples_per_s"] * res["plan"]["seq_len"],
                                rel_tol=1e-3)
            # the audit's estimates for this batch shape are there
            est = row["estimates"]
            assert positive(est["memory_bytes"]["total"]) and positive(est["flops_per_token"]["train"])
            assert est["assumptions"]["batch_size"] == res["plan"]["batch_size"]
            assert est["assumptions"]["seq_len"] == res["plan"]["seq_len"]
            assert row["closed_form_matches"] is True
            assert 0 < row["trainable_params"] < row["total_params"] or job["job"] == "bert-full"
            assert row["peak_memory_bytes"] >= 0 and row["memory_kind"] in ("heap_allocated", "rss_growth")
        dt = job["depthtune"]
        assert math.isfinite(dt["first_loss"]) and math.isfinite(dt["last_loss"])
        assert math.isfinite(job["trainer"]["train_loss"])
        # the same variant both ways: same counts
        assert dt["trainable_params"] == job["trainer"]["trainable_params"]
        # train_top variants cache their frozen prefix (2 of the tiny models' 4 layers)
        assert dt["cached_prefix_layers"] == (2 if job["job"].endswith("top2") else 0)
        if dt["cached_prefix_layers"]:
            assert dt["estimates"]["memory_bytes"]["prefix_cache"] > 0
    assert set(res["targets"]) == {"bert-full", "qwen-lora"}
    assert all(t["met"] is None for t in res["targets"].values())  # not judged on a dry run


def test_print_wheels_pins_this_environment():
    proc = subprocess.run(["bash", "bench/device_check.sh", "--print-wheels"], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert argv[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in argv
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[argv.index("-d") + 1] == ".whl"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert "manylinux_2_17_x86_64" in platforms and all(p.endswith("x86_64") for p in platforms)
    pins = dict(a.split("==") for a in argv if "==" in a)
    assert {"transformers", "peft"} <= set(pins)
    for name, version in pins.items():  # the GPU runs the versions the tests here ran
        assert importlib.metadata.version(name) == version, name
    # one version of each (two stop the whole install there), and the folder is ignored by git
    assert len(pins) == len({n.lower() for n in pins})
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x-1.0-py3-none-any.whl"], cwd=ROOT)
    assert ignored.returncode == 0


def test_a_failing_run_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch):
    import bench.device_check as dc

    monkeypatch.delenv("OUT", raising=False)

    def broken(*args):
        raise RuntimeError("the Trainer broke\nsecond line")

    monkeypatch.setattr(dc, "run_trainer", broken)
    assert dc.main(["--dry-run", "--jobs", "bert-full,qwen-lora", "--out", str(tmp_path)]) == 1
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["complete"] is True and [j["job"] for j in res["jobs"]] == ["bert-full", "qwen-lora"]
    for job in res["jobs"]:
        assert job["trainer"] == {"error": "RuntimeError: the Trainer broke"}
        assert positive(job["depthtune"]["timed"]["tokens_per_s"]) and "ratio_tokens_per_s" not in job
    assert res["targets"] == {}
    assert "FAILED bert-full/trainer: RuntimeError: the Trainer broke" in next(tmp_path.glob("*.md")).read_text()


def test_no_job_starts_after_the_budget(tmp_path, monkeypatch):
    import bench.device_check as dc

    monkeypatch.delenv("OUT", raising=False)
    assert dc.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)]) == 1
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["jobs"] == [] and res["skipped"] == JOBS and res["complete"] is True
