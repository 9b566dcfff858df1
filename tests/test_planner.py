"""depthtune plan (issue 15, first part): the largest batch that fits a memory budget, by the audit's estimate."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthtune.planning.audit import bucket_counts
from depthtune.planning.costs import estimate
from depthtune.config import ConfigError, parse_variant
from depthtune.planning.planner import PlanSettings, largest_batch, parse_memory, plan
from depthtune.planning.step_time import Throughput
from depthtune.model.variants import build_variant
from tests.test_decoders import model_cfg


def test_parse_memory_units_and_a_one_line_error():
    assert parse_memory("24GiB") == 24 * 2 ** 30 and parse_memory("80 GB") == 80 * 10 ** 9
    assert parse_memory("512MiB") == 512 * 2 ** 20 and parse_memory("1e9") == 10 ** 9
    with pytest.raises(ConfigError, match="--memory '24 gigs': expected a size like 24GiB"):
        parse_memory("24 gigs")


def test_largest_batch_is_the_exact_boundary():
    def peak(b):
        return 1000 + 37 * b
    assert largest_batch(peak, 1000 + 37 * 55) == 55 and largest_batch(peak, 1000 + 37 * 56 - 1) == 55
    assert largest_batch(peak, 999) == 0


def test_plan_rows_fit_their_budget_and_lora_fits_more_than_full():
    cfg = model_cfg("llama")
    specs = [(n, parse_variant(n, raw, n)) for n, raw in
             (("full", {}), ("lora", {"lora": {"r": 4, "targets": ["q_proj", "v_proj"]}}), ("top1", {"train_top": 1}))]
    s = PlanSettings(memory=512 * 2 ** 20, seq_len=64, examples=1000, task="causal_lm", precision="fp32",
                     throughput=Throughput(gemm_flops_per_s=1e10, optimizer_s_per_param=1e-9, step_floor_s=1e-3),
                     mfu=0.5)
    rows = {r["variant"]: r for r in plan(cfg, None, specs, s)}
    for name, spec in specs:
        r = rows[name]
        assert 0 < r["max_batch"] < 65536 and r["peak_bytes"] <= s.memory
        built = build_variant(cfg, spec, 0, device="meta", task="causal_lm")
        buckets = bucket_counts(built.model)
        total = sum(b["total"] for b in buckets)
        trainable = sum(b["trainable"] for b in buckets)
        lora = (spec.options.r, len(spec.options.targets)) if spec.kind == "lora" else None
        over = estimate(built.config, buckets, total, trainable, r["max_batch"] + 1, 64, task="causal_lm", lora=lora,
                        pretrained=False)
        assert over["memory_bytes"]["total"] > s.memory  # one more sequence would not fit
        # step_time's model at the largest batch: ceil(1000 / b) steps of b x 64 tokens (per-step FLOPs, no
        # prefix recomputed), each over 1e10 FLOP/s x 0.5, plus the optimizer over the trainable and the floor
        at = estimate(built.config, buckets, total, trainable, r["max_batch"], 64, task="causal_lm", lora=lora,
                      pretrained=False)["flops_per_token"]["step"]
        steps = -(-1000 // r["max_batch"])
        per_step = r["max_batch"] * 64 * (at["dense"] + at["per_position"] * 64) + r["max_batch"] * at["per_sequence"]
        expected = steps * (per_step / (1e10 * 0.5) + trainable * 1e-9 + 1e-3)
        assert r["epoch_s"] == pytest.approx(expected) and r["efficiency_source"] == "--mfu"
    assert rows["lora"]["max_batch"] >= rows["full"]["max_batch"] and rows["top1"]["host_cache_bytes"] > 0


def test_plan_cli_prints_a_row_per_variant(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 1000}))
    proc = subprocess.run([sys.executable, "-m", "depthtune.cli", "plan", "--config", str(config), "--memory", "1GiB",
                           "--seq-len", "32", "--tflops", "1", "--json", "--variant", "full", "--variant", "lora.r=4,lora.targets=q_proj+v_proj"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["full", "lora.r=4,lora.targets=q_proj+v_proj"]
    assert all(r["max_batch"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "depthtune.cli", "plan", "--config", str(config), "--memory", "lots"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--memory 'lots'" in bad.stderr
