"""Two CPU processes under torchrun (DDP, gloo), and learning on real data with the packaged MiniLM."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from depthtune.data.batching import Examples, predict_logits
from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_variant
from depthtune.training.loop import train
from depthtune.model.variants import build_variant
from tests.conftest import make_project, project_env, read_sst2, tiny_params


def test_finetune_under_torchrun_with_two_cpu_processes(tmp_path, shared_data):
    params = tiny_params(shared_data, variants={"full": {}}, tracking={"enabled": False})
    proj = make_project(tmp_path / "proj", params, git=False)
    env = project_env(proj, DEPTHTUNE_PREFECT=0)
    for stage in ("prepare", "tokenization", "audit"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=proj, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "stages.finetune", "--variant", "full"],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((proj / "metrics" / "train" / "full.json").read_text())
    assert result["world_size"] == 2 and result["per_device_batch_size"] == 8  # global batch 16 kept
    assert result["steps"] == 2 * 15  # 240 texts / global batch 16 = 15 steps per epoch, as on one process
    assert result["trainable_params"] == json.loads((proj / "audit" / "full.json").read_text())["trainable_params"]
    assert (proj / "models" / "full" / "model.safetensors").exists()
    # both ranks trained (each printed its start line), only rank 0 wrote the result
    assert proc.stdout.count("finetune full: full fine-tuning") == 2
    assert proc.stdout.count("steps in") == 1


def test_packaged_minilm_learns_sst2(shared_data, tokenizer):
    """train_top=2 on 400 SST-2 phrases: test accuracy on GLUE dev sentences well above the majority class."""
    texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", 400)
    vtexts, vlabels = read_sst2(shared_data / "sst2" / "dev.tsv", 100)
    ttexts, tlabels = read_sst2(shared_data / "sst2" / "test.tsv", 200)

    def ex(t, y):
        enc = tokenizer(t, truncation=True, max_length=64)
        return Examples(input_ids=enc["input_ids"], labels=y, token_type_ids=enc["token_type_ids"])

    spec = parse_variant("top2", {"train_top": 2}, "variants.top2")
    built = build_variant(ModelConfig(), spec, 2, device="cpu", seed=0)
    cfg = TrainConfig(epochs=3,convergence=FIXED_BUDGET,  batch_size=16, lr=3e-4, checkpoint_every=0, seed=0, patience=0, evals_per_epoch=1)
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=ex(texts, labels),
                val_ex=ex(vtexts, vlabels), cfg=cfg, metric="accuracy", device="cpu", pad_id=0, num_labels=2,
                log=lambda s: None)
    assert out.cached_prefix_layers == 4
    test_ex = ex(ttexts, tlabels)
    acc = float((predict_logits(built.model, test_ex, 32, "cpu", 0).argmax(-1) == tlabels).mean())
    majority = max(sum(tlabels), len(tlabels) - sum(tlabels)) / len(tlabels)
    assert acc > majority + 0.15, (acc, majority)
