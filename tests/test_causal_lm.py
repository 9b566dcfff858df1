"""task causal_lm at the core, every decoder family at tiny size (4 blocks, H 32, MiniLM's vocabulary).

- the builder: AutoModelForCausalLM for decoders, encoders refused in one line; LoRA/BitFit leave a
  causal LM's pretrained lm_head frozen; BitFit on a bias-free family trains nothing and is refused;
- the loss: token_nll = the model's own shifted cross-entropy (transformers' `labels=`) on padded batches;
- train_top's cached prefix: first-step loss and every trainable gradient equal the uncached path's (1e-5);
- training lowers the validation perplexity, early stopping follows "lower is better", and the same
  seed gives the same figures;
- perplexity / bits per byte are the ratios of sums they claim to be; greedy continuations are deterministic.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from depthtune.data.batching import Examples, collate
from depthtune.config import ConfigError, parse_variant
from depthtune.evaluation.lm_scoring import continuations, score_texts
from depthtune.evaluation.metrics import lm_metrics
from depthtune.evaluation.next_token import mean_loss, token_nll
from depthtune.training.loop import batch_loss, improves, setup, train
from depthtune.model.variants import build_variant
from tests.conftest import read_sst2
from tests.test_decoders import CFG, FAMILIES, decoder_tokenizer, model_cfg  # noqa: F401 (a fixture)

INDEX = [0, 3, 5, 9, 12, 17]


def build_lm(family: str, raw: dict, name: str = "v", seed: int = 0):
    spec = parse_variant(name, raw, f"variants.{name}")
    return spec, build_variant(model_cfg(family), spec, 0, path=f"variants.{name}", seed=seed, task="causal_lm")


@pytest.fixture(scope="module")
def lm_data(shared_data, decoder_tokenizer):
    def make(n, offset):
        texts, _ = read_sst2(shared_data / "sst2" / "train.tsv", n, offset)
        enc = decoder_tokenizer(texts, truncation=True, max_length=48)
        return Examples(input_ids=enc["input_ids"], labels=[0] * n,
                        n_bytes=[len(t.encode()) for t in texts]), texts
    return make(24, 0), make(8, 5000)


def no_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------- the builder


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_builds_the_lm_head_and_keeps_it_frozen_under_lora(family):
    _, full = build_lm(family, {})
    assert type(full.model).__name__.endswith("LMHeadModel") or type(full.model).__name__.endswith("ForCausalLM")
    assert full.trainable_params == full.total_params
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    _, lora = build_lm(family, {"lora": {"r": 2, "targets": targets}})
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # no lm_head, no score


def test_causal_lm_refuses_an_encoder_and_bitfit_without_biases():
    spec = parse_variant("full", {}, "variants.full")
    enc = dataclasses.replace(model_cfg("llama"), scratch=dataclasses.replace(model_cfg("llama").scratch,
                                                                                model_type="bert",
                                                                                num_key_value_heads=None))
    with pytest.raises(ConfigError, match="variants.full: task causal_lm needs a decoder .* the model is a bert"):
        build_variant(enc, spec, 0, path="variants.full", task="causal_lm")
    with pytest.raises(ConfigError, match="variants.bf: bitfit on this llama would train nothing"):
        build_lm("llama", {"bitfit": True}, name="bf")


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_nll_is_the_models_own_shifted_loss(family, lm_data, decoder_tokenizer):
    (train_ex, _), _ = lm_data
    _, built = build_lm(family, {})
    model = built.model.eval()
    batch = collate(train_ex, INDEX, decoder_tokenizer.pad_token_id)
    batch.pop("labels")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
        nll, tokens = token_nll(out.logits, batch["input_ids"], batch["attention_mask"])
    assert int(tokens.sum()) == int(batch["attention_mask"].sum()) - len(INDEX)  # n - 1 predictions a text
    assert torch.allclose(mean_loss(nll, tokens), out.loss, atol=1e-5)


def test_loss_start_counts_only_the_completion_tokens():
    logits = torch.randn(1, 6, 11)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    full, n_full = token_nll(logits, ids, mask)
    part, n_part = token_nll(logits, ids, mask, loss_start=torch.tensor([4]))
    per_pos = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert int(n_full) == 5 and int(n_part) == 2
    assert torch.allclose(part, per_pos[3:].sum()) and torch.allclose(full, per_pos.sum())


def test_lm_metrics_are_ratios_of_sums():
    m = lm_metrics(np.array([2.0, 4.0]), np.array([1, 3]), np.array([10, 6]))
    assert m["loss"] == pytest.approx(1.5) and m["perplexity"] == pytest.approx(math.exp(1.5))
    assert m["bits_per_byte"] == pytest.approx(6.0 / math.log(2) / 16)
    assert improves(3.0, 4.0, "perplexity") and not improves(4.0, 3.0, "perplexity")
    assert improves(0.8, 0.7, "accuracy") and improves(5.0, None, "perplexity")


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_first_step_loss_and_gradients_equal_the_uncached(family, lm_data, decoder_tokenizer):
    (train_ex, _), (val_ex, _) = lm_data
    pad = decoder_tokenizer.pad_token_id
    results = []
    for cached in (True, False):
        spec, built = build_lm(family, {"train_top": 2}, seed=3)
        no_dropout(built.model)
        cfg = dataclasses.replace(CFG, cache_frozen_prefix=cached)
        run = setup(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=cfg, metric="perplexity", device="cpu", pad_id=pad, num_labels=0, log=lambda m: None,
                    task="causal_lm")
        assert (run.train_cache is not None) == cached
        built.model.train()
        loss, _ = batch_loss(run, INDEX)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (loss_c, g_c), (loss_u, g_u) = results
    assert loss_c == pytest.approx(loss_u, abs=1e-5)
    assert g_c.keys() == g_u.keys() and g_c
    for n in g_c:
        assert torch.allclose(g_c[n], g_u[n], atol=1e-5), n


# ----------------------------------------------------------------------------- training and scoring


def train_once(family, raw, lm_data, pad, **cfg_kw):
    (train_ex, _), (val_ex, _) = lm_data
    spec, built = build_lm(family, raw, seed=1)
    cfg = dataclasses.replace(CFG, epochs=3, lr=3e-3, evals_per_epoch=1, **cfg_kw)
    before = score_texts(built.model, val_ex, batch_size=8, device="cpu", pad_id=pad)
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                metric="perplexity", device="cpu", pad_id=pad, num_labels=0, log=lambda m: None, task="causal_lm")
    return built, before, out


@pytest.mark.parametrize("raw", [{}, {"train_top": 2}])
def test_training_lowers_validation_perplexity_and_is_reproducible(raw, lm_data, decoder_tokenizer):
    pad = decoder_tokenizer.pad_token_id
    built, before, out = train_once("llama", raw, lm_data, pad)
    ppl_before = lm_metrics(*before)["perplexity"]
    best = out.best_val["perplexity"]
    assert best < ppl_before * 0.9, (ppl_before, best)
    assert best == min(v["perplexity"] for v in out.val_curve)  # the best is the lowest, not the highest
    assert {"loss", "perplexity", "bits_per_byte"} <= set(out.best_val)
    _, _, again = train_once("llama", raw, lm_data, pad)
    assert again.best_val == out.best_val and again.loss_curve == out.loss_curve


def test_continuations_are_greedy_and_deterministic(lm_data, decoder_tokenizer):
    _, (val_ex, texts) = lm_data
    _, built = build_lm("qwen2", {})
    ids = val_ex.input_ids[:2]
    a = continuations(built.model, decoder_tokenizer, ids, max_new_tokens=5, device="cpu", prompt_tokens=2)
    b = continuations(built.model, decoder_tokenizer, ids, max_new_tokens=5, device="cpu", prompt_tokens=2)
    assert a == b and len(a) == 2
    for text, g in zip(texts, a):  # the prompt is the text's first tokens ([CLS] + 1), the reference the rest
        assert g["prompt"] and text.lower().startswith(g["prompt"].split()[0])
        assert g["continuation"] and g["reference"]
    # a prompt ends between words: "melodrama" = mel ##od ##rama never leaves "##od..." to the reference
    ids = decoder_tokenizer("a melodrama of sorts")["input_ids"]
    cut = continuations(built.model, decoder_tokenizer, [ids], max_new_tokens=2, device="cpu", prompt_tokens=3)[0]
    pieces = decoder_tokenizer.convert_ids_to_tokens(ids)
    assert not cut["reference"].startswith("#") and pieces[3].startswith("##")


@pytest.mark.parametrize("raw", [{}, {"train_top": 2}])
def test_gradient_checkpointing_changes_memory_not_the_numbers(raw, lm_data, decoder_tokenizer):
    """train.gradient_checkpointing recomputes activations in backward: the same loss curve (fp32, 1e-5)."""
    pad = decoder_tokenizer.pad_token_id
    _, _, plain = train_once("llama", raw, lm_data, pad)
    _, _, ckpt = train_once("llama", raw, lm_data, pad, gradient_checkpointing=True)
    assert len(plain.loss_curve) == len(ckpt.loss_curve)
    for a, b in zip(plain.loss_curve, ckpt.loss_curve):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.parametrize("raw", [{}, {"train_top": 2}])
def test_bf16_weights_train_and_lower_perplexity(raw, lm_data, decoder_tokenizer):
    pad = decoder_tokenizer.pad_token_id
    built, before, out = train_once("llama", raw, lm_data, pad, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in built.model.parameters())
    assert out.best_val["perplexity"] < lm_metrics(*before)["perplexity"] * 0.95
