"""The parameter audit: exact counts, the closed-form check, variant trainable counts, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthtune import audit as audit_mod
from depthtune.audit import audit_built, closed_form_total
from depthtune.cli import load_config_file, parse_variant_arg
from depthtune.config import ModelConfig, parse_variant
from depthtune.errors import ConfigError
from depthtune.variants import build_variant, classify_param
from tests.conftest import ROOT

CONFIGS = {
    # hand-checked published totals of the bare models (AutoModel, --labels 0)
    "bert-base": ({"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                   "type_vocab_size": 2}, 109_482_240),
    "roberta-base": ({"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                      "type_vocab_size": 1}, 124_645_632),
    "distilbert-base": ({"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12,
                         "hidden_dim": 3072, "max_position_embeddings": 512}, 66_362_880),
    "gpt2": ({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
              "n_positions": 1024}, 124_439_808),
    "llama-3-8b": ({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 8192, "tie_word_embeddings": False}, 7_504_924_672),
}


def meta_audit(cfg_dict, variant: dict, labels: int, tmp_path, name="v"):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg_dict))
    base = load_config_file(str(path))
    spec = parse_variant(name, variant, f"variants.{name}")
    built = build_variant(ModelConfig(source=str(path)), spec, labels, device="meta", base_config=base)
    return audit_built(built, variant_name=name, spec=spec, num_labels=labels, batch_size=16, seq_len=128)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_bare_model_totals_match_published_counts_and_closed_form(arch, tmp_path):
    cfg, expected = CONFIGS[arch]
    r = meta_audit(cfg, {}, 0, tmp_path)
    assert r.total_params == expected
    assert r.closed_form["total"] == expected and r.closed_form["matches"]
    assert sum(b["total"] for b in r.buckets) == expected


@pytest.mark.parametrize("arch", ["bert-base", "roberta-base", "distilbert-base", "gpt2"])
def test_classifier_totals_match_closed_form(arch, tmp_path):
    cfg, _ = CONFIGS[arch]
    r = meta_audit(cfg, {"depth": 3}, 5, tmp_path)
    assert r.closed_form["matches"], r.closed_form
    assert r.architecture["num_layers"] == 3


# MiniLM-L6 (H=384, I=1536, 6 layers, 2 labels): each layer 4*(384^2+384) + 2*384*1536 + 1536 + 384 + 4*384
LAYER = 4 * (384 * 384 + 384) + 384 * 1536 + 1536 + 1536 * 384 + 384 + 4 * 384  # 1,774,464
EMB = (30522 + 512 + 2) * 384 + 2 * 384  # 11,918,592
POOLER, HEAD = 384 * 384 + 384, 384 * 2 + 2  # 147,840 and 770
BIASES = 6 * (4 * 384 + 1536 + 384 + 2 * 384) + 384 + 384 + 2  # layer biases + emb LN bias + pooler bias + head bias

MINILM_TRAINABLE = {
    "full": ({}, EMB + 6 * LAYER + POOLER + HEAD),
    "depth3": ({"depth": 3}, EMB + 3 * LAYER + POOLER + HEAD),
    "top2": ({"train_top": 2}, 2 * LAYER + POOLER + HEAD),
    "probe": ({"train_top": 0}, POOLER + HEAD),
    "depth4_top1": ({"depth": 4, "train_top": 1}, LAYER + POOLER + HEAD),
    "lora8": ({"lora": {"r": 8, "targets": ["query", "value"]}}, 6 * 2 * 8 * (384 + 384) + HEAD),
    "lora_top2_ffn": ({"lora": {"r": 4, "targets": ["query", "dense"], "layers": [4, 5]}},
                      # query H->H; "dense" = attention.output H->H, intermediate H->I, output I->H (per layer)
                      2 * 4 * ((384 + 384) + (384 + 384) + (384 + 1536) + (1536 + 384)) + HEAD),
    "bitfit": ({"bitfit": True}, BIASES + 384 * 2),
    "scratch": ({"init": "scratch"}, EMB + 6 * LAYER + POOLER + HEAD),
}


@pytest.mark.parametrize("name", list(MINILM_TRAINABLE))
def test_each_variant_kind_trains_the_hand_derived_count(name):
    spec_raw, expected = MINILM_TRAINABLE[name]
    spec = parse_variant(name, spec_raw, f"variants.{name}")
    built = build_variant(ModelConfig(), spec, 2, device="meta")
    r = audit_built(built, variant_name=name, spec=spec, num_labels=2, batch_size=16, seq_len=128)
    assert r.trainable_params == expected
    assert r.closed_form["matches"]
    if spec.lora is None:
        assert r.total_params == EMB + (spec.depth or 6) * LAYER + POOLER + HEAD
    # trainable never exceeds total in any bucket, and buckets add up
    assert all(0 <= b["trainable"] <= b["total"] for b in r.buckets)
    assert sum(b["trainable"] for b in r.buckets) == expected


def test_closed_form_check_catches_a_wrong_formula(monkeypatch):
    spec = parse_variant("full", {}, "variants.full")
    built = build_variant(ModelConfig(), spec, 2, device="meta")
    real = closed_form_total
    monkeypatch.setattr(audit_mod, "closed_form_total", lambda cfg, n, task="classification": (real(cfg, n, task)[0] + 384, "H too many"))
    with pytest.raises(audit_mod.AuditMismatch, match=r"counted 22,713,986 parameters but the closed form"):
        audit_built(built, variant_name="full", spec=spec, num_labels=2, batch_size=16, seq_len=128)


def test_buckets_split_attention_ffn_and_norms():
    assert classify_param("bert.encoder.layer.3.attention.self.query.weight") == "layer.3.attention.q"
    assert classify_param("bert.encoder.layer.3.attention.output.dense.bias") == "layer.3.attention.out"
    assert classify_param("bert.encoder.layer.3.attention.output.LayerNorm.weight") == "layer.3.norm"
    assert classify_param("bert.encoder.layer.3.intermediate.dense.weight") == "layer.3.ffn.in"
    assert classify_param("bert.encoder.layer.3.output.dense.weight") == "layer.3.ffn.out"
    assert classify_param("bert.embeddings.token_type_embeddings.weight") == "embeddings.type"
    assert classify_param("base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.default.weight") == \
        "layer.0.adapter"
    assert classify_param("model.layers.7.mlp.gate_proj.weight") == "layer.7.ffn.gate"
    assert classify_param("transformer.h.2.attn.c_attn.weight") == "layer.2.attention.qkv"
    assert classify_param("classifier.out_proj.weight") == "head"


def test_estimates_shrink_with_the_trainable_span():
    def est(spec_raw):
        spec = parse_variant("v", spec_raw, "variants.v")
        built = build_variant(ModelConfig(), spec, 2, device="meta")
        return audit_built(built, variant_name="v", spec=spec, num_labels=2, batch_size=16, seq_len=128).estimates
    full, top2, probe = est({}), est({"train_top": 2}), est({"train_top": 0})
    assert full["memory_bytes"]["total"] > top2["memory_bytes"]["total"] > probe["memory_bytes"]["total"]
    assert probe["memory_bytes"]["activations"] < 1 << 20  # only the head keeps activations
    assert full["flops_per_token"]["forward"] == probe["flops_per_token"]["forward"]
    assert full["flops_per_token"]["backward"] > top2["flops_per_token"]["backward"] > probe["flops_per_token"]["backward"]
    # full backward ~ 2x forward (activation grads + weight grads over the same matmuls)
    assert 1.9 < full["flops_per_token"]["backward"] / full["flops_per_token"]["forward"] < 2.1
    assert top2["assumptions"]["backprop_layers"] == 2


def test_variant_arg_parsing():
    assert parse_variant_arg("depth=3,lora.r=8") == {"depth": 3, "lora": {"r": 8}}
    assert parse_variant_arg("lora.targets=q_proj+v_proj") == {"lora": {"targets": ["q_proj", "v_proj"]}}
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_variant_arg("depth3")


def test_lora_target_that_matches_nothing_lists_the_modules():
    spec = parse_variant("l", {"lora": {"targets": ["q_proj"]}}, "variants.l")
    with pytest.raises(ConfigError, match=r"variants\.l\.lora\.targets: \['q_proj'\] match no module; linear modules "
                                          r"are: .*query.*value"):
        build_variant(ModelConfig(), spec, 2, device="meta", path="variants.l")


def test_cli_audits_an_8b_decoder_without_weights(tmp_path):
    cfg, total = CONFIGS["llama-3-8b"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "depthtune.cli", "audit", "--config", str(tmp_path / "config.json"),
                           "--labels", "0", "--variant", "train_top=2", "--variant", "lora.r=8,lora.targets=q_proj+v_proj",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["train_top=2", "lora.r=8,lora.targets=q_proj+v_proj"]
    assert rows[0]["total_params"] == total
    per_layer = (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
    assert rows[0]["trainable_params"] == 2 * per_layer + 4096  # top 2 layers + final norm
    assert rows[1]["trainable_params"] == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert {"name", "total", "trainable"} <= set(rows[0]["buckets"][0])


def test_cli_bad_spec_is_one_line(tmp_path):
    cfg, _ = CONFIGS["bert-base"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "depthtune.cli", "audit", "--config", str(tmp_path / "config.json"),
                           "--variant", "train_top=13"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: variant train_top=13.train_top: 13 exceeds the model's 12 layers"]


def test_audit_stage_writes_records_and_summary(tmp_path, capsys):
    """stages.audit.main: label count and token stats from their files, one AuditRecord per variant
    (versions only, no git sha), summary.md with layers in model order."""
    from depthtune.records import AuditRecord, LabelSet
    from stages.audit import main

    (tmp_path / "params.yaml").write_text(json.dumps({"variants": {"top2": {"train_top": 2}, "depth3": {"depth": 3}}}))
    LabelSet(names=["neg", "neutral", "pos"]).write(tmp_path / "labels.json")
    (tmp_path / "report.json").write_text(json.dumps({"splits": {"train": {"p95": 64, "tokens": 1000},
                                                                 "validation": {"tokens": 200}}}))
    out = tmp_path / "audit"
    main(["--params", str(tmp_path / "params.yaml"), "--labels", str(tmp_path / "labels.json"),
          "--token-report", str(tmp_path / "report.json"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["depth3.json", "summary.md", "top2.json"]
    top2 = AuditRecord.read(out / "top2.json")
    assert top2.architecture["num_labels"] == 3 and top2.trainable_params == 2 * LAYER + POOLER + 384 * 3 + 3
    assert top2.estimates_typical["assumptions"]["seq_len"] == 64
    assert top2.estimates["memory_bytes"]["prefix_cache"] == 1200 * 384 * 4  # train_top caches the prefix
    assert AuditRecord.read(out / "depth3.json").estimates["memory_bytes"]["prefix_cache"] == 0
    assert "torch" in top2.versions and "git_sha" not in top2.to_dict()
    summary = (out / "summary.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in summary.split("## Trainable parameters per layer")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| layer |")]
    assert rows == ["embeddings"] + [f"layer.{i}" for i in range(6)] + ["pooler", "head"]
    assert "| layer.5 | 1,774,464 / 1,774,464 | — |" in summary  # depth3 has no layer.5
    printed = capsys.readouterr().out
    assert "3 labels" in printed and "| top2 |" in printed and str(out) in printed


def test_cli_audits_params_variants_through_the_same_core(tmp_path, capsys):
    from depthtune.cli import main

    (tmp_path / "params.yaml").write_text(json.dumps({"variants": {"probe": {"train_top": 0}}}))
    assert main(["audit", "--params", str(tmp_path / "params.yaml"), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["schema"] == "depthtune.audit/1" and row["variant"] == "probe"
    assert row["trainable_params"] == POOLER + HEAD
