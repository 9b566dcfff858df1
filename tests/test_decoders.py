"""Decoder families as sequence classifiers, at tiny size (random init, MiniLM's vocabulary so real
tokenized text works): Llama, Qwen2, Qwen3, Mistral (grouped-query attention: 4 query heads, 2 key/value
heads) and GPT-2, through the one builder and the one freezing function.

Per family and variant (full, depth 2, train_top 1, probe, LoRA on layers [2, 3]): the audit's total =
named_parameters() = the closed form, the trainable count derived by hand, two optimizer steps that move
what trains and leave the frozen rest bit-identical; the refusals; right-padded batches give each text
the logits it has alone.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from depthtune.planning.audit import audit_built
from depthtune.data.batching import Examples, predict_logits
from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.errors import ConfigError
from depthtune.model.sources import load_tokenizer, packaged_path
from depthtune.training.loop import train
from depthtune.model.param_names import layer_index
from depthtune.model.variants import build_variant, num_layers_of
from tests.conftest import read_sst2

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 128}

# Hand-derived parameters of one block, H = 32, I = 64, 4 query heads and 2 key/value heads of 8 dims:
#   llama/mistral: q 32x32 + k, v 32x16 each + o 32x32 = 3,072; gate, up, down 3 x 32x64 = 6,144;
#                  2 RMSNorms 2 x 32                                                  -> 9,280
#   qwen2: + q/k/v biases 32 + 16 + 16                                                -> 9,344
#   qwen3: + q_norm, k_norm over the head dim 2 x 8                                   -> 9,296
#   gpt2 (4 full heads): ln_1 64 + c_attn 32x96+96 + c_proj 32x32+32 + ln_2 64
#                        + c_fc 32x64+64 + c_proj 64x32+32                            -> 8,544
BLOCK = {"llama": 9280, "mistral": 9280, "qwen2": 9344, "qwen3": 9296, "gpt2": 8544}
EMB = {f: 30522 * 32 for f in FAMILIES} | {"gpt2": (30522 + 128) * 32}  # word (+ gpt2's position) table
TOP = {f: 32 for f in FAMILIES} | {"gpt2": 64}  # final RMSNorm (gain) / gpt2's ln_f (gain, bias)
HEAD = 32 * 2  # score: H -> 2 labels, no bias
# LoRA r = 4 adds r * (in + out) per adapted linear module:
#   llama family: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32 = 512 -> 2,048 per block
#   gpt2: c_attn 32+96, attn c_proj 32+32, c_fc 32+64, mlp c_proj 64+32 = 384                -> 1,536 per block
LORA_PER_BLOCK = {f: 2048 for f in FAMILIES} | {"gpt2": 1536}
LORA_TARGETS = {f: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                for f in FAMILIES} | {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def variants(family: str) -> dict:
    return {
        "full": {},
        "depth2": {"depth": 2},
        "top1": {"train_top": 1},
        "probe": {"train_top": 0},
        "lora": {"lora": {"r": 4, "alpha": 8, "targets": LORA_TARGETS[family], "layers": [2, 3]}},
    }


def expected_counts(family: str, name: str) -> tuple[int, int]:
    """(total, trainable) from the hand-derived pieces above."""
    blocks = 2 if name == "depth2" else 4
    total = EMB[family] + blocks * BLOCK[family] + TOP[family] + HEAD
    trainable = {"full": total, "depth2": total, "top1": BLOCK[family] + TOP[family] + HEAD,
                 "probe": TOP[family] + HEAD, "lora": 2 * LORA_PER_BLOCK[family] + HEAD}[name]
    if name == "lora":
        total += 2 * LORA_PER_BLOCK[family]
    return total, trainable


def model_cfg(family: str, **scratch) -> ModelConfig:
    kv = {} if family == "gpt2" else {"num_key_value_heads": 2}
    return parse_section(ModelConfig, {"source": "scratch", "scratch": {**TINY, "model_type": family, **kv, **scratch}},
                         "model")


def build(family: str, name: str, raw: dict | None = None, device: str = "cpu", model: ModelConfig | None = None):
    spec = parse_variant(name, raw if raw is not None else variants(family)[name], f"variants.{name}")
    return spec, build_variant(model or model_cfg(family), spec, 2, device=device, path=f"variants.{name}", seed=0)


CFG = TrainConfig(convergence=FIXED_BUDGET, epochs=1, batch_size=8, lr=1e-3, warmup_fraction=0.1, checkpoint_every=0, seed=7,
                  patience=0, evals_per_epoch=1)  # 16 texts / batch 8: two optimizer steps, validated at the end


@pytest.fixture(scope="module")
def decoder_tokenizer():
    return load_tokenizer(model_cfg("llama"))  # every scratch decoder: MiniLM's vocabulary, no token_type_ids


@pytest.fixture(scope="module")
def decoder_data(shared_data, decoder_tokenizer):
    def make(n, offset):
        texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", n, offset)
        enc = decoder_tokenizer(texts, truncation=True, max_length=48)
        assert "token_type_ids" not in enc
        return Examples(input_ids=enc["input_ids"], labels=labels)
    return make(16, 0), make(8, 5000)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["full", "depth2", "top1", "probe", "lora"])
def test_audit_total_equals_named_parameters_and_the_closed_form(family, name):
    total, trainable = expected_counts(family, name)
    for device in ("meta", "cpu"):  # the audit's build and finetune's
        spec, built = build(family, name, device=device)
        r = audit_built(built, variant_name=name, spec=spec, num_labels=2, batch_size=8, seq_len=48)
        assert r.total_params == sum(p.numel() for p in built.model.parameters()) == total
        assert r.closed_form["matches"] and r.closed_form["total"] == total, r.closed_form
        assert r.trainable_params == built.trainable_params == trainable
        assert r.architecture["num_layers"] == (2 if name == "depth2" else 4)


@pytest.mark.parametrize("family, block", [
    # head_dim 16 with 4 query heads: q 32x64, k and v 32x32 (2 kv heads), o 64x32 = 6,144; mlp 6,144; norms 64
    ("llama", 12352),
    ("qwen3", 12352 + 2 * 16),  # + q_norm, k_norm over the 16-wide heads
])
def test_head_dim_apart_from_hidden_over_heads(family, block):
    """Qwen3-0.6B's shape: 16 heads of 128 on a hidden size of 1,024 (not 1,024 / 16 = 64)."""
    spec, built = build(family, "full", model=model_cfg(family, head_dim=16), device="meta")
    r = audit_built(built, variant_name="full", spec=spec, num_labels=2, batch_size=8, seq_len=48)
    assert r.total_params == EMB[family] + 4 * block + TOP[family] + HEAD and r.closed_form["matches"]


def test_tied_embeddings_are_counted_once():
    spec, built = build("qwen2", "full", model=model_cfg("qwen2", tie_word_embeddings=True))
    assert built.config.tie_word_embeddings is True
    assert built.total_params == expected_counts("qwen2", "full")[0]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["full", "depth2", "top1", "probe", "lora"])
def test_two_steps_move_what_trains_and_nothing_else(family, name, decoder_data, decoder_tokenizer):
    train_ex, val_ex = decoder_data
    spec, built = build(family, name)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=CFG,
                metric="accuracy", device="cpu", pad_id=decoder_tokenizer.pad_token_id, num_labels=2,
                log=lambda s: None)
    assert out.steps == 2
    frozen_moved = [n for n, p in built.model.named_parameters() if not p.requires_grad
                    and not torch.equal(before[n], p.detach())]
    trainable_still = [n for n, p in built.model.named_parameters() if p.requires_grad
                       and torch.equal(before[n], p.detach())]
    assert frozen_moved == []
    assert trainable_still == []
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out.loss_curve)


@pytest.mark.parametrize("family", FAMILIES)
def test_bitfit_trains_biases_where_the_family_has_them(family):
    spec = parse_variant("bf", {"bitfit": True}, "variants.bf")
    if family in ("llama", "mistral", "qwen3"):
        for device in ("meta", "cpu"):  # the audit refuses it, and so does finetune
            with pytest.raises(ConfigError, match=rf"^variants\.bf: bitfit on this {family} would train only the "
                                                  r"head: it has no bias parameters outside the head"):
                build_variant(model_cfg(family), spec, 2, device=device, path="variants.bf")
        return
    built = build_variant(model_cfg(family), spec, 2, device="meta", path="variants.bf")
    # qwen2: the q/k/v biases of 4 blocks; gpt2: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj biases, then ln_f's
    biases = {"qwen2": 4 * (32 + 16 + 16), "gpt2": 4 * (32 + 96 + 32 + 32 + 64 + 32) + 32}[family]
    assert built.trainable_params == biases + HEAD


# ----------------------------------------------------------------------------- refusals


def test_the_audit_stage_refuses_a_head_only_variant_in_one_line(tmp_path, capsys):
    """What a user sees: `bitfit: true` on a scratch Llama stops the audit stage, one line, nothing written."""
    import yaml

    from depthtune.files import run_main
    from stages import audit

    params = {"model": {"source": "scratch", "scratch": {**TINY, "model_type": "llama"}},
              "variants": {"full": {}, "bf": {"bitfit": True}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: audit.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "audit"),
                                     "--labels", str(tmp_path / "labels.json"),
                                     "--token-report", str(tmp_path / "report.json")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2
    assert err == ["error: variants.bf: bitfit on this llama would train only the head: it has no bias parameters "
                   "outside the head; use lora or train_top"]
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("family, targets, listed", [
    ("llama", ["query", "value"], "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("qwen3", ["q_proj", "score"], "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("gpt2", ["q_proj"], "c_attn, c_fc, c_proj"),
])
def test_lora_targets_in_no_kept_layer_are_refused_with_the_names_that_exist(family, targets, listed):
    spec = parse_variant("l", {"lora": {"targets": targets, "layers": [3]}}, "variants.l")
    for device in ("meta", "cpu"):
        with pytest.raises(ConfigError) as err:
            build_variant(model_cfg(family), spec, 2, device=device, path="variants.l")
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith("variants.l.lora.targets: ") and "match no module" in msg
        assert f"linear modules are: {listed} (in layers [3])" in msg


@pytest.mark.parametrize("scratch, message", [
    ({"hidden_size": 30}, r"model\.scratch\.hidden_size: 30 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, r"model\.scratch\.num_key_value_heads: num_attention_heads 4 is not divisible by 3"),
])
def test_impossible_shapes_are_one_line_config_errors(scratch, message):
    with pytest.raises(ConfigError, match=message):
        model_cfg("llama", **scratch)


def test_settings_a_family_does_not_have_are_refused():
    with pytest.raises(ConfigError, match=r"model\.scratch\.num_key_value_heads: gpt2 has no such setting"):
        parse_section(ModelConfig, {"source": "scratch", "scratch": {**TINY, "model_type": "gpt2",
                                                                     "num_key_value_heads": 2}}, "model")
    with pytest.raises(ConfigError, match=r"model\.scratch\.tie_word_embeddings: only decoders"):
        parse_section(ModelConfig, {"source": "scratch", "scratch": {"tie_word_embeddings": True}}, "model")


# ----------------------------------------------------------------------------- padding


TEXTS = ["a fine film", "an overlong, meandering and ultimately pointless exercise in style over substance"]


def padding_gap(model_config: ModelConfig, family: str) -> float:
    """Largest |logit| difference between each text alone and inside a right-padded batch of both."""
    tokenizer = load_tokenizer(model_config)
    _, built = build(family, "full", model=model_config)
    model = built.model
    assert model.config.pad_token_id == tokenizer.pad_token_id  # the id the classifier skips = the batches' pad
    enc = tokenizer(TEXTS)
    both = Examples(input_ids=enc["input_ids"], labels=[0, 1])
    assert len(both.input_ids[0]) < len(both.input_ids[1])  # the short text gets padded
    batched = predict_logits(model, both, 2, "cpu", tokenizer.pad_token_id)
    alone = [predict_logits(model, Examples(input_ids=[ids], labels=[0]), 1, "cpu", tokenizer.pad_token_id)[0]
             for ids in enc["input_ids"]]
    return float(max(abs(batched[i] - alone[i]).max() for i in range(2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_alone_and_right_padded_in_a_batch_gets_the_same_logits(family):
    assert padding_gap(model_cfg(family), family) < 1e-5


def save_tokenizer_without_pad(folder) -> None:
    """MiniLM's tokenizer made like Llama's or GPT-2's: no pad token, an eos ([SEP])."""
    load_tokenizer(ModelConfig()).save_pretrained(folder)
    if not (folder / "config.json").exists():
        shutil.copy(packaged_path("packaged:minilm-l6") / "config.json", folder / "config.json")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["pad_token"] = None  # BertTokenizer would fall back to its class default [PAD] if it were absent
    tok_cfg["eos_token"] = "[SEP]"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    special = folder / "special_tokens_map.json"
    if special.exists():
        data = json.loads(special.read_text())
        data.pop("pad_token", None)
        special.write_text(json.dumps(data))


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    """It pads with eos, and the model's pad id says so. MiniLM's texts end in [SEP], here the eos,
    so the classifier reads the token before it, padded or not."""
    folder = tmp_path / "tok"
    save_tokenizer_without_pad(folder)
    mc = dataclasses.replace(model_cfg("llama"), tokenizer=str(folder))
    tokenizer = load_tokenizer(mc)
    assert tokenizer.pad_token == "[SEP]" == tokenizer.eos_token
    assert padding_gap(mc, "llama") < 1e-5


def test_a_tokenizer_with_nothing_to_pad_with_is_refused():
    from depthtune.errors import ModelError
    from depthtune.model.sources import ensure_pad_token

    bare = SimpleNamespace(pad_token=None, eos_token=None, unk_token=None)
    with pytest.raises(ModelError, match=r"^model\.tokenizer: the tokenizer of src has no pad, eos or unk token"):
        ensure_pad_token(bare, "src")
    only_unk = SimpleNamespace(pad_token=None, eos_token=None, unk_token="<unk>")
    ensure_pad_token(only_unk, "src")
    assert only_unk.pad_token == "<unk>"


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("family", FAMILIES)
def test_a_depth2_decoder_saves_at_its_true_depth_and_reloads_with_the_same_logits(family, decoder_data,
                                                                                   decoder_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from depthtune.training.finetuning import save_model

    _, val_ex = decoder_data
    spec, built = build(family, "depth2")
    expected = predict_logits(built.model, val_ex, 4, "cpu", decoder_tokenizer.pad_token_id)
    save_model(built.model, decoder_tokenizer, tmp_path / "m", variant="depth2", spec=spec, labels=["neg", "pos"],
               audit=SimpleNamespace(trainable_params=1, total_params=1), base="scratch")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert num_layers_of(reloaded.config) == 2
    assert max(layer_index(n) for n, _ in reloaded.named_parameters() if layer_index(n) is not None) == 1
    got = predict_logits(reloaded, val_ex, 4, "cpu", reloaded.config.pad_token_id)
    assert abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_pretrained_decoder_folder_keeps_its_first_blocks_and_pads_with_its_eos(family, tmp_path):
    """A local folder as a user brings it: a *ForCausalLM checkpoint and a tokenizer without a pad token.
    depth 2 loads the first two blocks' weights (the lm_head is dropped, `score` is new), the config's
    pad id is the tokenizer's eos, and the saved variant reloads (qwen2's per-layer `layer_types`
    truncated with the blocks)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from depthtune.training.finetuning import save_model
    from depthtune.model.variants import scratch_config

    folder = tmp_path / "pretrained"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(scratch_config(model_cfg(family).scratch))
    lm.save_pretrained(folder)
    save_tokenizer_without_pad(folder)
    mc = ModelConfig(source=str(folder))
    tokenizer = load_tokenizer(mc)
    spec, built = build(family, "depth2", model=mc)
    assert built.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id
    ours = dict(built.model.base_model.named_parameters())
    theirs = dict(lm.base_model.named_parameters())
    assert ours and all(torch.equal(p, theirs[n]) for n, p in ours.items())  # every kept weight, loaded
    save_model(built.model, tokenizer, tmp_path / "m", variant="depth2", spec=spec, labels=["neg", "pos"],
               audit=SimpleNamespace(trainable_params=1, total_params=1), base=str(folder))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert num_layers_of(reloaded.config) == 2 and reloaded.config.pad_token_id == tokenizer.eos_token_id
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")  # what serving and `depthtune predict` load
    assert saved_tokenizer.pad_token_id == tokenizer.eos_token_id and "token_type_ids" not in saved_tokenizer("a b")
    assert padding_gap(mc, family) < 1e-5


# ----------------------------------------------------------------------------- the stages, end to end


def test_a_scratch_llama_classifier_runs_through_the_stages(shared_data, tmp_path):
    """prepare -> tokenization -> audit -> finetune -> evaluation in process (tracking off), like a user's
    params.yaml with `model.scratch.model_type: llama`: the audit's counts are the trained model's
    (build_checked asserts them), and the evaluation scores the saved decoder."""
    import yaml

    from depthtune.records import AuditRecord, EvalRecord, TrainRecord
    from tests.conftest import run_stages, tiny_params

    scratch = {**TINY, "model_type": "llama", "num_key_value_heads": 2}
    lora = {"lora": {"r": 4, "targets": ["q_proj", "v_proj", "down_proj"], "layers": [3]}}
    params = tiny_params(shared_data, variants={"top1": {"train_top": 1}, "lora": lora},
                         model={"scratch": scratch}, tracking={"enabled": False}, train={"epochs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(tmp_path, ["top1", "lora"])
    for v in ("top1", "lora"):
        a = AuditRecord.read(tmp_path / f"audit/{v}.json")
        assert a.architecture["model_type"] == "llama" and a.closed_form["matches"]
        t = TrainRecord.read(tmp_path / f"metrics/train/{v}.json")
        assert t.trainable_params == a.trainable_params
        ev = EvalRecord.read(tmp_path / f"metrics/eval/{v}.json")
        assert isinstance(ev.accuracy, float) and 0.0 <= ev.accuracy <= 1.0 and ev.n == len(ev.predictions)
    saved = json.loads((tmp_path / "models/top1/config.json").read_text())
    assert saved["model_type"] == "llama" and saved["pad_token_id"] == 0  # MiniLM's [PAD]: the batches' pad
