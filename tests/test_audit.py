"""The parameter audit: exact counts, the closed-form check, variant trainable counts, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthtune.planning import audit as audit_mod
from depthtune.planning.audit import audit_built, closed_form_total
from depthtune.planning.costs import block_activation_bytes
from depthtune.cli import load_config_file, parse_variant_arg
from depthtune.config import ModelConfig, parse_variant
from depthtune.errors import ConfigError
from depthtune.model.param_names import classify_param
from depthtune.model.variants import build_variant
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
    if spec.kind != "lora":
        assert r.total_params == EMB + (spec.depth or 6) * LAYER + POOLER + HEAD
    # trainable never exceeds total in any bucket, and buckets add up
    assert all(0 <= b["trainable"] <= b["total"] for b in r.buckets)
    assert sum(b["trainable"] for b in r.buckets) == expected


def test_closed_form_check_catches_a_wrong_formula(monkeypatch):
    spec = parse_variant("full", {}, "variants.full")
    built = build_variant(ModelConfig(), spec, 2, device="meta")
    real = closed_form_total
    monkeypatch.setattr(audit_mod, "closed_form_total",
                        lambda cfg, n, task="classification": (real(cfg, n, task)[0] + 384, "H too many"))
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
    (tmp_path / "report.json").write_text(json.dumps({"splits": {"train": {"p95": 64, "max": 80, "tokens": 1000},
                                                                 "validation": {"tokens": 200}}}))
    out = tmp_path / "audit"
    main(["--params", str(tmp_path / "params.yaml"), "--labels", str(tmp_path / "labels.json"),
          "--token-report", str(tmp_path / "report.json"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["depth3.json", "summary.md", "top2.json"]
    top2 = AuditRecord.read(out / "top2.json")
    assert top2.architecture["num_labels"] == 3 and top2.trainable_params == 2 * LAYER + POOLER + 384 * 3 + 3
    # the longest train example sets the peak's batch shape (length-grouped batches put it in a full batch)
    assert top2.estimates_typical["assumptions"]["seq_len"] == 80
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


# ----------------------------------------------------------------------------- decoders: causal LM, precision, memory

DECODER_CFGS = {  # tiny shapes; k/v heads < heads (grouped-query attention) wherever the family has them
    "llama": {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "qwen2": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "mistral": {"model_type": "mistral", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8},
    "gpt2": {"model_type": "gpt2", "vocab_size": 256, "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64,
             "bos_token_id": None, "eos_token_id": None},
}


def causal_audit(family: str, tied: bool, tmp_path, variant: dict = None, device: str = "meta", **settings):
    cfg = dict(DECODER_CFGS[family], tie_word_embeddings=tied)
    path = tmp_path / f"{family}-{tied}" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    spec = parse_variant("v", variant or {}, "variants.v")
    built = build_variant(ModelConfig(source="scratch" if device != "meta" else str(path)), spec, 0, device=device,
                          base_config=load_config_file(str(path)), task="causal_lm")
    rec = audit_built(built, variant_name="v", spec=spec, num_labels=0, batch_size=4, seq_len=16, task="causal_lm",
                      **settings)
    return rec, built


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", list(DECODER_CFGS))
def test_causal_lm_totals_equal_named_parameters_and_the_closed_form(family, tied, tmp_path):
    rec, built = causal_audit(family, tied, tmp_path)
    named = sum(p.numel() for _, p in built.model.named_parameters())
    cf_total, formula = closed_form_total(built.config, 0, task="causal_lm")
    assert rec.total_params == named == cf_total == rec.closed_form["total"], formula
    lm_head = built.model.get_output_embeddings().weight
    assert (lm_head is built.model.get_input_embeddings().weight) == tied
    head = next(row for row in rec.layers if row["name"] == "head")
    V, H = 256, 32
    if tied:  # shown, counted once under the embeddings: 0 own parameters
        assert head == {"name": "head", "total": 0, "trainable": 0, "adapter": 0, "tied_to": "embeddings.word"}
        assert "tied lm_head" in formula or family == "gpt2"
    else:
        assert head["total"] == V * H and "tied_to" not in head
    summary = audit_mod.summary_markdown([rec])
    assert ("| head | tied to embeddings.word |" in summary) == tied


def test_untied_minus_tied_is_exactly_the_lm_head(tmp_path):
    (untied, _), (tied, _) = causal_audit("llama", False, tmp_path), causal_audit("llama", True, tmp_path)
    assert untied.total_params - tied.total_params == 256 * 32
    assert untied.architecture["tied_lm_head"] is False and tied.architecture["tied_lm_head"] is True


def test_tied_head_row_on_a_model_with_real_weights(tmp_path):
    """The same audit on a built (cpu, random init) model: the tie is a property of the parameters, not of meta."""
    rec, built = causal_audit("llama", True, tmp_path, device="cpu")
    assert rec.total_params == sum(p.numel() for p in built.model.parameters())
    assert [r["name"] for r in rec.layers][-1] == "head" and rec.layers[-1]["tied_to"] == "embeddings.word"


LLAMA_BIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
             "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
             "tie_word_embeddings": False}


def big_llama(tmp_path, variant=None, **settings):
    r = meta_audit_causal(LLAMA_BIG, variant or {}, tmp_path, **settings)
    return r.estimates


def meta_audit_causal(cfg_dict, variant: dict, tmp_path, batch_size=8, seq_len=256, **settings):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg_dict))
    spec = parse_variant("v", variant, "variants.v")
    built = build_variant(ModelConfig(source=str(path)), spec, 0, device="meta",
                          base_config=load_config_file(str(path)), task="causal_lm")
    return audit_built(built, variant_name="v", spec=spec, num_labels=0, batch_size=batch_size, seq_len=seq_len,
                       task="causal_lm", **settings)


def test_bf16_weights_halve_weights_grads_and_adamw_and_say_so(tmp_path):
    fp32, bf16 = big_llama(tmp_path, precision="fp32"), big_llama(tmp_path, precision="bf16")
    for key in ("weights", "gradients", "adamw_states"):
        assert bf16["memory_bytes"][key] * 2 == fp32["memory_bytes"][key]
    total = 32000 * 1024 * 2 + 8 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816 + 2 * 1024) + 1024
    assert fp32["memory_bytes"]["weights"] == 4 * total and fp32["memory_bytes"]["adamw_states"] == 8 * total
    assert bf16["assumptions"]["precision"] == "bf16" and bf16["assumptions"]["weights_bytes_per_param"] == 2
    # activations: per token and block, fp32 4*(6H + 2q + 2kv + 4I); bf16 2*(8H + 2q + 2kv + 4I) (fp32 norm inputs)
    H, q, kv, I = 1024, 1024, 256, 2816
    tokens, L, V = 8 * 256, 8, 32000
    logits = tokens * V * 20  # logits, log-softmax, then 3 grads in backward: fp32 in every precision
    top = 8 * 2 * H * 4 + tokens * 2 * H * 4  # the head's B*2H and the trained embeddings' output
    small = 4 * (2 + 16)  # 2 RMSNorm rstd + 16 heads' logsumexp per token and block, fp32
    fp32_block = 4 * (6 * H + 2 * q + 2 * kv + 4 * I) + small
    bf16_block = 2 * (8 * H + 2 * q + 2 * kv + 4 * I) + small
    assert fp32["memory_bytes"]["activations"] == tokens * L * fp32_block + logits + top
    assert bf16["memory_bytes"]["activations"] == tokens * L * bf16_block + logits + top
    assert bf16["memory_bytes"]["autocast_weight_copies"] == fp32["memory_bytes"]["autocast_weight_copies"] == 0


def test_bf16_autocast_keeps_fp32_weights_and_adds_bf16_weight_copies(tmp_path):
    fp32, auto = big_llama(tmp_path, precision="fp32"), big_llama(tmp_path, precision="bf16-autocast")
    for key in ("weights", "gradients", "adamw_states"):
        assert auto["memory_bytes"][key] == fp32["memory_bytes"][key]
    assert auto["memory_bytes"]["activations"] < fp32["memory_bytes"]["activations"]
    # every matmul weight backward needs, as a bf16 copy: blocks + the untied lm_head
    blocks = 8 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816)
    assert auto["memory_bytes"]["autocast_weight_copies"] == 2 * (blocks + 32000 * 1024)


def test_checkpointing_keeps_each_block_input_plus_one_block(tmp_path):
    plain = big_llama(tmp_path)
    ckpt = big_llama(tmp_path, gradient_checkpointing=True)
    H, q, kv, I, L, tokens = 1024, 1024, 256, 2816, 8, 8 * 256
    block = tokens * (4 * (6 * H + 2 * q + 2 * kv + 4 * I) + 4 * (2 + 16))
    saved = plain["memory_bytes"]["activations"] - ckpt["memory_bytes"]["activations"]
    assert saved == L * block - (L * tokens * H * 4 + block)  # L blocks -> L inputs + one block's recompute
    assert ckpt["assumptions"]["gradient_checkpointing"] is True
    # one more forward of the 8 blocks in backward
    assert ckpt["flops_per_token"]["backward"] > plain["flops_per_token"]["backward"]
    assert ckpt["flops_per_token"]["forward"] == plain["flops_per_token"]["forward"]
    # a train_top 2 variant backpropagates 2 blocks: checkpointing keeps 2 inputs + 1 block
    top2 = big_llama(tmp_path, {"train_top": 2}, gradient_checkpointing=True)
    top2_plain = big_llama(tmp_path, {"train_top": 2})
    assert top2_plain["memory_bytes"]["activations"] - top2["memory_bytes"]["activations"] == \
        2 * block - (2 * tokens * H * 4 + block)


def test_grouped_query_attention_shrinks_the_kv_terms_by_the_stated_arithmetic(tmp_path):
    gqa = big_llama(tmp_path)  # 4 k/v heads of 64: kv = 256
    mha = meta_audit_causal(dict(LLAMA_BIG, num_key_value_heads=16), {}, tmp_path).estimates  # kv = 1024
    tokens, L = 8 * 256, 8
    # activations: 2kv per token and block (k, v after rotary), fp32
    assert mha["memory_bytes"]["activations"] - gqa["memory_bytes"]["activations"] == tokens * L * 4 * 2 * (1024 - 256)
    # weights: k_proj and v_proj are H x kv each
    assert mha["memory_bytes"]["weights"] - gqa["memory_bytes"]["weights"] == L * 2 * 1024 * (1024 - 256) * 4
    # forward FLOPs: 2 per weight
    assert mha["flops_per_token"]["forward"] - gqa["flops_per_token"]["forward"] == 2 * L * 2 * 1024 * (1024 - 256)


def test_a_tied_lm_head_still_costs_its_matmul_flops(tmp_path):
    tied = meta_audit_causal(dict(LLAMA_BIG, tie_word_embeddings=True), {}, tmp_path).estimates
    untied = big_llama(tmp_path)
    assert tied["flops_per_token"]["forward"] == untied["flops_per_token"]["forward"]
    assert untied["memory_bytes"]["weights"] - tied["memory_bytes"]["weights"] == 32000 * 1024 * 4


def test_cli_audits_a_causal_lm_in_bf16_with_checkpointing(tmp_path, capsys):
    from depthtune.cli import main

    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_BIG, tie_word_embeddings=True)))
    assert main(["audit", "--config", str(tmp_path / "config.json"), "--task", "causal_lm", "--precision", "bf16",
                 "--gradient-checkpointing", "--variant", "lora.r=8,lora.targets=q_proj+v_proj", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["closed_form"]["matches"]
    assert row["estimates"]["assumptions"]["precision"] == "bf16"
    assert row["estimates"]["assumptions"]["gradient_checkpointing"] is True
    assert row["layers"][-1] == {"name": "head", "total": 0, "trainable": 0, "adapter": 0, "tied_to": "embeddings.word"}


def test_audit_stage_passes_task_and_resolved_precision(tmp_path, capsys):
    from depthtune.records import AuditRecord
    from stages.audit import main

    params = {"task": "causal_lm",
              "model": {"source": "scratch", "scratch": {"model_type": "llama", "vocab_size": 256, "hidden_size": 32,
                                                         "num_hidden_layers": 2, "num_attention_heads": 4,
                                                         "intermediate_size": 64, "max_position_embeddings": 64}},
              "train": {"device": "cpu", "precision": "auto", "gradient_checkpointing": True},
              "evaluation": {"metric": "perplexity"}, "registry": {"metric": "perplexity"},
              "variants": {"full": {}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    out = tmp_path / "audit"
    main(["--params", str(tmp_path / "params.yaml"), "--labels", str(tmp_path / "none.json"),
          "--token-report", str(tmp_path / "none.json"), "--out", str(out)])
    rec = AuditRecord.read(out / "full.json")
    assert rec.estimates["assumptions"]["precision"] == "fp32"  # auto on the cpu
    assumptions = rec.estimates["assumptions"]
    assert assumptions["task"] == "causal_lm" and assumptions["gradient_checkpointing"]
    assert rec.closed_form["matches"] and rec.architecture["task"] == "causal_lm"
    assert "precision fp32 (train.precision auto)" in capsys.readouterr().out


def kept_for_backward(model, forward) -> int:
    """Bytes autograd keeps for backward while `forward()` runs, the parameters' own storage left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_block_activation_formula_equals_the_tensors_autograd_saves(family, precision):
    """block_activation_bytes against what torch really keeps for backward: one more decoder block
    (GQA, SwiGLU) adds exactly the formula's bytes per token (autocast: plus its bf16 weight copies)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=64)

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, num_hidden_layers=layers, **shape))
        model.train()
        if precision == "bf16":
            model.to(torch.bfloat16)
        ids = torch.randint(0, 128, (3, 20))

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
                model(input_ids=ids, labels=ids)
        return kept_for_backward(model, forward)

    cfg = AutoConfig.for_model(family, num_hidden_layers=1, **shape)
    per_block_weights = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96
    copies = 2 * per_block_weights if precision == "bf16-autocast" else 0
    assert saved(2) - saved(1) == 60 * block_activation_bytes(cfg, precision, 20) + copies


@pytest.mark.parametrize("variant", [{}, {"bitfit": True}, {"lora": {"r": 8, "targets": ["query", "value"]}}],
                         ids=["full", "bitfit", "lora"])
def test_encoder_block_activation_formula_against_the_tensors_autograd_saves(variant):
    """An encoder block's kept bytes per token, as the variant builder freezes it: full fine-tuning, BitFit
    (every matmul weight frozen: their inputs are not kept) and LoRA, within 7% of block_activation_bytes
    (at H 64, S 20 per token: full 5,584 B kept vs 5,696, BitFit 3,792 vs 4,032, LoRA 4,880 vs 4,736; the
    formula counted BitFit as full fine-tuning before, +50%)."""
    import torch
    from depthtune.config import ModelConfig, parse_section, parse_variant
    from depthtune.model.variants import build_variant

    arch = {"model_type": "bert", "vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 256, "max_position_embeddings": 64, "type_vocab_size": 2}
    spec = parse_variant("v", variant, "variants.v")
    B, S = 3, 20

    def saved(layers: int) -> tuple[int, object]:
        mc = parse_section(ModelConfig, {"source": "scratch", "scratch": {**arch, "num_hidden_layers": layers}}, "model")
        built = build_variant(mc, spec, 2, device="cpu", task="classification")
        model = built.model
        model.train()
        torch.manual_seed(0)
        ids = torch.randint(5, 128, (B, S))
        kept = kept_for_backward(model, lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                      labels=ids[:, 0] % 2))
        return kept, built.config

    (one, cfg), (two, _) = saved(1), saved(2)
    formula = B * S * block_activation_bytes(cfg, "fp32", S, spec.method.frozen_matmuls(spec.options))
    assert abs((two - one) - formula) <= 0.07 * formula, (two - one, formula)
