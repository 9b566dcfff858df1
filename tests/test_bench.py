"""The benchmark harness (bench/) end to end at tiny size: a random-init BERT (hidden 32, 2 layers),
a few optimizer steps per recipe. Checks the result files' structure and that the numbers are sane;
no timing thresholds (the real figures come from `python -m bench.run`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import harness as H
from bench import run as R

TINY = {"source": "scratch", "scratch": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
                                         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                                         "max_position_embeddings": 128}}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128}


def tiny_plan() -> dict:
    plan = R.default_plan(quick=True)
    plan.update(threads=1, batch_size=8, repeats=2, model=TINY, audit8b=TINY_LLAMA, audit8b_import_baseline=False)
    plan["data"] = {"sst2": {"n_train": 16, "n_val": 16}, "rt": {"n_train": 16, "n_val": 8}}
    plan["speed"] = [{"data": "sst2", "variants": ["full", "probe"], "recipes": ["seeds", "plain", "depthtune"],
                      "steps": 3}]
    plan["epochs"] = {"data": "sst2", "n_train": 16, "n_val": 16, "epochs": 3, "eval_every": 1, "target": 0.0,
                      "variants": ["probe"], "recipes": ["seeds", "plain", "depthtune"], "repeats": 1,
                      "seeds_stop_at_target": True}
    plan["breakdown"] = {"variants": ["full", "lora8"], "seq_lens": [16], "full_seq_lens": []}
    plan["profile"] = {"variant": "full", "data": "sst2", "steps": 2}
    plan["gemm"] = {"n": 128, "reps": 3}
    plan["tokenization"] = {"n_texts": 200}
    plan["omp"] = None
    return plan


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.timeout(300)
def test_harness_writes_results_with_expected_keys_and_sane_numbers(tmp_path, shared_data, restore_threads):
    res = R.run_plan(tiny_plan(), tmp_path, tag="cpu-test", command="pytest", log=lambda *a: None,
                     sst2_dir=shared_data / "sst2", isolate=False)
    assert not res["failures"], res["failures"]
    on_disk = json.loads((tmp_path / "cpu-test.json").read_text())
    for key in ("schema", "machine", "gemm", "peak_flops", "speed", "ratios", "epochs", "epoch_speedups", "targets",
                "profile", "memory_breakdown", "audit8b", "tokenization", "runs", "data", "plan", "wall_s"):
        assert key in on_disk, key
    assert on_disk["schema"] == R.SCHEMA and on_disk["machine"]["threads"] == 1
    assert on_disk["peak_flops"] > 0 and on_disk["gemm"]["start"]["dtype"] == "float32"

    # speed: one row per data x variant x recipe (the seeds' recipe once: it always trains the full model)
    rows = {(r["variant"], r["recipe"]): r for r in on_disk["speed"]}
    assert set(rows) == {("full", "seeds"), ("full", "plain"), ("full", "depthtune"), ("probe", "plain"),
                         ("probe", "depthtune")}
    for (variant, recipe), r in rows.items():
        assert r["repeats"] == 2 and r["steps"] == 3
        for k in ("samples_per_s", "steady_samples_per_s", "tokens_per_s"):
            assert r[k]["n"] == 2 and 0 < r[k]["min"] <= r[k]["median"] <= r[k]["max"] < math.inf, (k, r[k])
        assert r["mfu"]["median"] > 0 and r["flops_per_token_train"] > 0
        assert r["estimated_memory_bytes"] > 0 and r["peak_memory_bytes"]["median"] >= 0
        assert r["estimate_seq_len"] == (128 if recipe == "seeds" else on_disk["data"]["sst2"]["train_lengths"]["max"])
    # every run trained the same data for the same number of steps; tokens are real (non-pad) tokens
    runs = on_disk["runs"]["speed"]
    assert {r["steps"] for r in runs} == {3} and {r["samples"] for r in runs} == {24}
    assert len({r["real_tokens"] for r in runs}) == 1
    assert max(r["trainable_params"] for r in runs if r["variant"] == "probe") < \
        min(r["trainable_params"] for r in runs if r["variant"] == "full")
    probe_dt = next(r for r in runs if r["variant"] == "probe" and r["recipe"] == "depthtune")
    assert probe_dt["cached_prefix_layers"] == 2 and probe_dt["cache_bytes"] > 0
    assert set(on_disk["ratios"]["depthtune_over_plain"]) == {"sst2/full", "sst2/probe"}
    assert on_disk["ratios"]["depthtune_over_seeds_steady"]["sst2/full"]["n"] == 2

    # 3 epochs: evaluations recorded, target 0.0 reached at the first evaluation, seeds stopped there
    ep = {r["recipe"]: r for r in on_disk["epochs"]}
    assert set(ep) == {"seeds", "plain", "depthtune"}
    assert ep["plain"]["steps"] == ep["depthtune"]["steps"] == 6 and ep["seeds"]["steps"] == 1
    for r in ep.values():
        assert r["reached"] == [True] and r["step_to_target"] == [1]
        assert 0 <= r["time_to_target_s"]["median"] <= r["train_s"]["median"] <= r["wall_s"]["median"]
        assert 0 <= r["best_accuracy"]["median"] <= 1
    run_ep = {r["recipe"]: r for r in on_disk["runs"]["epochs"]}
    assert [p["step"] for p in run_ep["depthtune"]["val_curve"]] == [1, 2, 3, 4, 5, 6]
    assert set(on_disk["epoch_speedups"]["probe"]) >= {"train_s_ratio", "wall_s_ratio", "time_to_target_ratio"}

    names = [t["target"] for t in on_disk["targets"]]
    assert any("best plain Trainer" in n for n in names) and any("seeds' recipe" in n for n in names)
    top2 = next(t for t in on_disk["targets"] if t["target"].startswith("top2"))
    assert top2["measured"] is None and top2["met"] is None  # not in this plan: reported as not measured
    probe = next(t for t in on_disk["targets"] if t["target"].startswith("probe"))
    assert probe["measured"] > 0 and probe["met"] in (True, False)
    assert any("memory estimate" in n for n in names)

    prof = on_disk["profile"]
    assert set(prof["phases"]) == {"collate", "forward", "loss", "backward", "clip", "optimizer", "zero_grad"}
    assert abs(sum(p["share"] for p in prof["phases"].values()) - 1) < 1e-6 and prof["top_ops"]
    bd = {b["variant"]: b for b in on_disk["memory_breakdown"]}
    assert bd["full"]["measured"]["gradients"] == bd["full"]["estimated"]["gradients"]
    assert bd["full"]["measured"]["adamw_states"] == bd["full"]["estimated"]["adamw_states"]
    assert bd["lora8"]["measured"]["gradients"] < bd["full"]["measured"]["gradients"]
    assert bd["full"]["measured"]["activations"] > 0

    a = on_disk["audit8b"]
    assert a["returncode"] == 0 and a["total_params"] > 0 and a["peak_rss_bytes"] > 0 and a["wall_s"] > 0
    assert on_disk["tokenization"]["examples_per_s"]["median"] > 0 and on_disk["tokenization"]["is_fast"]

    md = (tmp_path / "cpu-test.md").read_text()
    assert "| data | variant | recipe |" in md and "## Targets" in md and "1 torch threads" in md


def test_account_splits_training_from_evaluation_time():
    events = [("step", 1.0, 1), ("eval", 1.5, 0.4), ("step", 2.0, 2), ("eval", 3.0, 0.8), ("step", 3.5, 3)]
    a = H.account(events, t0=0.0, t1=4.0, target=0.7)
    assert a["eval_s"] == pytest.approx(1.5) and a["train_s"] == pytest.approx(2.5)
    # reached after step 2: 2.0 s of clock minus the first evaluation's 0.5 s
    assert a["reached"] and a["step_to_target"] == 2 and a["time_to_target_s"] == pytest.approx(1.5)
    assert a["wall_to_target_s"] == pytest.approx(3.0)
    assert a["steady"] == {"steps": 2, "seconds": pytest.approx(1.0)}  # steps 2..3 minus the eval in between
    assert H.account(events, 0.0, 4.0, target=0.9)["time_to_target_s"] is None


def test_interleaving_rotates_the_job_order():
    jobs = [{"id": i} for i in range(6)]
    order = R.interleaved(jobs, 3)
    assert [j["id"] for j in order] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 0, 1, 4, 5, 0, 1, 2, 3]
    assert [j["repeat"] for j in order[::6]] == [0, 1, 2]
