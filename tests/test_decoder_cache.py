"""The frozen prefix of a decoder's train_top variant, cached (depthtune.training.prefix_cache), at tiny size.

Every decoder family (llama, qwen2, qwen3, mistral, gpt2; the builders of tests/test_decoders.py),
`train_top: 2` of 4 blocks, so the prefix is the embeddings + blocks 0-1 and the top blocks 2-3,
the final norm and `score`:
- the cached path's logits = the whole model's on a right-padded batch (causal + padding mask,
  rotary positions 0..len-1, the last non-pad token pooled), also with sliding-window blocks and
  with a tokenizer that pads with eos (the classifier then reads the token before the eos);
- the first step's loss and every trainable gradient agree, cached vs uncached;
- train() with the cache reports cached_prefix_layers == 2 and leaves the frozen weights bit-identical;
- the frozen prefix runs in eval mode (no dropout) whether or not it is cached.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from depthtune.data.batching import Examples, collate
from depthtune.training.prefix_cache import (PrefixCache, frozen_prefix_layers, frozen_prefix_modules, pooled_lengths,
                                    set_train_mode, supports_split_forward, top_forward)
from depthtune.model.sources import load_tokenizer
from depthtune.training.loop import batch_logits, setup, train
from tests.conftest import read_sst2
from tests.test_decoders import CFG, FAMILIES, build, model_cfg, save_tokenizer_without_pad

TOP2 = {"train_top": 2}
INDEX = [0, 3, 5, 9, 12, 17]  # 6 texts of different lengths: the shorter ones get right-padded


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(model_cfg("llama"))  # every scratch decoder: MiniLM's vocabulary, pad [PAD] = 0


def examples(tokenizer, shared_data, n: int, offset: int) -> Examples:
    texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", n, offset)
    enc = tokenizer(texts, truncation=True, max_length=48)
    return Examples(input_ids=enc["input_ids"], labels=labels)


@pytest.fixture(scope="module")
def data(tokenizer, shared_data):
    return examples(tokenizer, shared_data, 24, 0), examples(tokenizer, shared_data, 8, 5000)


def no_dropout(model) -> None:
    """gpt2's dropout off (the llama families have none by default): the cached top's last block runs its
    MLP on the pooled tokens only, so dropout there draws other random numbers than the whole model's."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def both_paths_logits(model, ex: Examples, k: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole model, cached prefix + top) logits of the texts INDEX as one right-padded batch, eval mode."""
    model.eval()
    batch = collate(ex, INDEX, pad_id)
    batch.pop("labels")
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.no_grad():
        whole = model(**batch).logits
        cache = PrefixCache(model, ex, k, "cpu", batch_size=5, pad_id=pad_id)  # other batches than INDEX's
        hidden, mask = cache.batch(INDEX, "cpu")
        cached = top_forward(model, hidden, mask, k)
    return whole, cached


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top", [2, 1, 0])  # 0, a probe: every block cached, the top is norm + score
def test_cached_logits_equal_the_whole_model_on_a_right_padded_batch(family, top, data, tokenizer):
    train_ex, _ = data
    spec, built = build(family, f"top{top}", {"train_top": top})
    k = frozen_prefix_layers(spec, built.num_layers)
    assert k == 4 - top and supports_split_forward(built.model)
    whole, cached = both_paths_logits(built.model, train_ex, k, tokenizer.pad_token_id)
    assert whole.shape == cached.shape == (len(INDEX), 2)
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, sliding", [
    ("mistral", {"sliding_window": 4}),  # every block sliding (a 4-token window bites on these texts)
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),  # blocks 2-3 sliding
])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sliding_window_blocks_get_the_masks_the_model_gives_them(family, sliding, k, data, tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from depthtune.model.families import config_kwargs as family_kwargs

    train_ex, _ = data
    config = AutoConfig.for_model(family, **family_kwargs(model_cfg(family).scratch), **sliding, num_labels=2,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    whole, cached = both_paths_logits(model, train_ex, k, tokenizer.pad_token_id)
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)


def test_a_tokenizer_padding_with_eos_pools_the_token_before_the_eos(tmp_path, shared_data):
    """MiniLM's texts end in [SEP]; made the eos and the pad, the classifier reads the token before it.
    The cache keeps each text up to that token, so the cached top pools the same one."""
    folder = tmp_path / "tok"
    save_tokenizer_without_pad(folder)
    mc = dataclasses.replace(model_cfg("llama"), tokenizer=str(folder))
    tokenizer = load_tokenizer(mc)
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    ex = examples(tokenizer, shared_data, 24, 0)
    spec, built = build("llama", "top2", TOP2, model=mc)
    assert built.model.config.pad_token_id == tokenizer.pad_token_id
    assert pooled_lengths(built.model, ex) == [len(ids) - 1 for ids in ex.input_ids]  # all but the final [SEP]
    whole, cached = both_paths_logits(built.model, ex, 2, tokenizer.pad_token_id)
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the first step


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_loss_and_gradients_equal_cached_and_uncached(family, data, tokenizer):
    """Through training.batch_logits, the one training forward: same batch, dropout off, one backward each."""
    train_ex, val_ex = data
    spec, built = build(family, "top2", TOP2)
    model = built.model
    no_dropout(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith(("model.embed", "transformer.w")) for n in trainable)
    result = {}
    for cached in (True, False):
        run = setup(model=model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=dataclasses.replace(CFG, cache_frozen_prefix=cached), metric="accuracy", device="cpu",
                    pad_id=tokenizer.pad_token_id, num_labels=2, log=lambda s: None)
        assert (run.train_cache is not None) == cached and run.frozen == 2
        set_train_mode(model, run.frozen)
        logits, labels, real = batch_logits(run, INDEX)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        result[cached] = loss.item(), {n: p.grad.clone() for n, p in trainable.items()}, real
        model.zero_grad(set_to_none=True)
    (loss_c, grads_c, real_c), (loss_u, grads_u, real_u) = result[True], result[False]
    assert abs(loss_c - loss_u) < 1e-5
    assert real_c == real_u == sum(len(train_ex.input_ids[i]) for i in INDEX)
    for n in trainable:
        torch.testing.assert_close(grads_c[n], grads_u[n], atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_frozen_prefix_runs_in_eval_mode_cached_or_not(family):
    spec, built = build(family, "top2", TOP2)
    model = built.model
    set_train_mode(model, 2)
    frozen = frozen_prefix_modules(model, 2)
    blocks = model.base_model.h if family == "gpt2" else model.base_model.layers
    assert frozen[-2:] == [blocks[0], blocks[1]]
    assert all(not m.training for f in frozen for m in f.modules())  # gpt2: wte, wpe, its dropout, blocks 0-1
    assert all(m.training for b in blocks[2:] for m in b.modules()) and model.score.training
    assert frozen_prefix_modules(model, 0) == []


# ----------------------------------------------------------------------------- train()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_with_the_cache_reports_it_and_moves_only_the_top(family, data, tokenizer):
    train_ex, val_ex = data
    curves = {}
    for cached in (True, False):
        spec, built = build(family, "top2", TOP2)
        model = built.model
        no_dropout(model)  # for the step-for-step comparison of the two runs below
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = train(model=model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=dataclasses.replace(CFG, cache_frozen_prefix=cached), metric="accuracy", device="cpu",
                    pad_id=tokenizer.pad_token_id, num_labels=2, log=lambda s: None)
        assert out.steps == 3  # 24 texts / batch 8
        assert out.cached_prefix_layers == (2 if cached else 0) and (out.cache_bytes > 0) == cached
        params = dict(model.named_parameters())
        assert [n for n, p in params.items() if not p.requires_grad and not torch.equal(before[n], p)] == []
        assert [n for n, p in params.items() if p.requires_grad and torch.equal(before[n], p)] == []
        curves[cached] = [r["loss"] for r in out.loss_curve]
    assert curves[True] == pytest.approx(curves[False], abs=1e-5)  # the same training, step for step
