"""Shared fixtures: offline settings, the shared datasets, a tiny random-init BERT."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from depthtune import runtime


def pytest_configure(config):
    """The test session is an entry point: offline, quiet, no HTTP retries, before any test module imports."""
    runtime.configure_process()


# Whole pipelines, the examples, servers, process fleets and timed memory runs: `make test-quick` (pytest -m "not
# slow") leaves them out; `make test` (what CI runs) runs everything.
SLOW_MODULES = {"test_fault_pipeline", "test_distributed", "test_examples", "test_memory_estimate", "test_pipeline_dvc",
                "test_ddp_and_learning", "test_lr_search", "test_bench", "test_device_check", "test_offline_report",
                "test_registry", "test_tracking", "test_retrain_deployment", "test_seeds", "test_prompt_completion",
                "test_pretrain", "test_security", "test_decoders", "test_causal_lm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or "local_pipeline" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY_ARCH = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    # evaluate writes lock files under HF_HOME; keep tests off the user's cache
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    # depthtune.planning.step_time's per-machine calibration: the tests' runs must not calibrate the user's predictions
    os.environ["DEPTHTUNE_CALIBRATION"] = str(tmp_path_factory.mktemp("calibration") / "step_time.json")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the shared datasets must sit beside the project checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from depthtune.config import ModelConfig
    from depthtune.model.sources import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def data(shared_data, tokenizer):
    """(96 training, 32 validation) SST-2 phrases as tokenized Examples: the tiny training tests' data."""
    from depthtune.data.batching import Examples

    def make(n, offset):
        texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", n, offset)
        enc = tokenizer(texts, truncation=True, max_length=48)
        return Examples(input_ids=enc["input_ids"], labels=labels, token_type_ids=enc["token_type_ids"])
    return make(96, 0), make(32, 5000)


def read_sst2(path: Path, n: int, offset: int = 0) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        next(fh)
        for i, line in enumerate(fh):
            if i < offset:
                continue
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text)
            labels.append(int(label))
            if len(texts) >= n:
                break
    return texts, labels


# ----------------------------------------------------------------------------- a tiny project on disk

CODE = ("depthtune", "stages", "flows", "dvc.yaml", "pyproject.toml")


def tiny_params(shared: Path, variants: dict | None = None, **overrides) -> dict:
    """params.yaml for a fast real pipeline: tiny random-init BERT, 240 SST-2 phrases."""
    sst2 = shared / "sst2"
    params = {
        "task": "classification",
        "tokenization": {"max_unk_fraction": 0.2},
        "pretrain": {"enabled": False},  # dvc.yaml's pretrain stage reads the section: DVC needs it present
        "model": {"source": "scratch", "scratch": dict(TINY_ARCH)},
        "data": {"source": "local", "files": {"train": str(sst2 / "train.tsv"), "validation": str(sst2 / "dev.tsv"),
                                              "test": str(sst2 / "test.tsv")},
                 "format": "tsv", "text_column": "sentence", "label_column": "label", "quoting": False,
                 "max_train_samples": 240, "max_eval_samples": 80},
        "variants": variants or {"full": {}, "top1": {"train_top": 1, "train": {"lr": 2e-3}},
                                 "probe": {"train_top": 0, "train": {"lr": 5e-3}}},
        "train": {"device": "cpu", "epochs": 2, "batch_size": 16, "lr": 1e-3, "max_length": 48,
                  "checkpoint_every": 0, "num_threads": 1, "cache_frozen_prefix": True,
                  "patience": 0, "evals_per_epoch": 1,  # a fixed 2 epochs: the tests count on it
                  "convergence": {"max_epochs": 2},  # ... and no extension
                  "precision": "auto", "gradient_checkpointing": False},
        # dvc.yaml names these keys, so DVC needs them spelled out in params.yaml
        "evaluation": {"metric": "accuracy", "latency_examples": 5},
        "tracking": {"enabled": True},
        "compare": {"tolerance": 0.02},
        "registry": {"model_name": "tiny-classifier", "metric": "accuracy", "min_delta": 0.0, "min_metric": 0.0},
    }
    for key, value in overrides.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    return params


@contextlib.contextmanager
def in_project(project: Path):
    """Run stage mains in `project` (cwd) in this process; the cwd and torch's thread count come back after."""
    import torch

    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(project)
    try:
        yield project
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def run_stages(project: Path, variants, *, evaluate: bool = True) -> None:
    """prepare, tokenization and audit, then finetune (and evaluation) of each variant, in-process."""
    from stages import audit, evaluation, finetune, prepare, tokenization

    with in_project(project):
        for stage in (prepare, tokenization, audit):
            stage.main([])
        for v in variants:
            finetune.main(["--variant", v])
            if evaluate:
                evaluation.main(["--variant", v])


def make_project(dest: Path, params: dict, git: bool = True) -> Path:
    """A copy of the project's code with its own params.yaml, as a user's checkout would be."""
    import shutil
    import subprocess

    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("/.prefect/\n/.depthtune/\n/mlflow.db\n/mlartifacts/\n/checkpoints/\n")
    if git:
        env = project_env(dest)
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "test"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
            subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def project_env(project: Path, **extra) -> dict:
    """Environment for running a copied project's stages: its venv python first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project)
    env.pop("PREFECT_API_URL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def local_pipeline(tmp_path_factory, shared_data):
    """The tiny default project run once with plain `dvc repro` (every stage a Prefect flow, MLflow on SQLite).

    Shared by tests/test_pipeline_dvc.py (which then changes the project) and tests/test_distributed.py
    (which compares a distributed run against it): `made` is what the first run made, kept before any change.
    """
    import json
    import subprocess
    import time

    import yaml

    proj = make_project(tmp_path_factory.mktemp("pipeline") / "proj", tiny_params(shared_data))
    env = project_env(proj, DEPTHTUNE_PREFECT_IDLE_S=3600)  # its server outlives the modules run in between
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=900)
    first = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = {"lock": yaml.safe_load((proj / "dvc.lock").read_text())["stages"],
            "eval": {f.stem: json.loads(f.read_text()) for f in sorted((proj / "metrics" / "eval").glob("*.json"))},
            "promotion": json.loads((proj / "reports" / "promotion.json").read_text())}
    yield {"proj": proj, "env": env, "out": proc.stdout + proc.stderr, "first": first, "made": made}
    subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=proj, env=env, capture_output=True)
