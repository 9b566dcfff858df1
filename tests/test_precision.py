"""train.precision and train.gradient_checkpointing on tiny models (CPU)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel

from depthtune.errors import ModelError
from depthtune.training.precision import (apply_precision, autocast_dtype, enable_gradient_checkpointing,
                                 resolve_precision)
from depthtune.training.prefix_cache import top_forward

LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
BERT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64)


def tiny(model_type: str, auto=AutoModelForCausalLM, **kw):
    torch.manual_seed(0)
    base = LLAMA if model_type == "llama" else BERT
    return auto.from_config(AutoConfig.for_model(model_type, **{**base, **kw}))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_resolve_precision_and_autocast_dtype():
    assert resolve_precision("auto", "cuda") == "bf16-autocast"
    assert resolve_precision("auto", "cuda:1") == "bf16-autocast"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert autocast_dtype("bf16-autocast") is torch.bfloat16
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") is None


def test_bf16_weights_halve_the_weight_bytes():
    model = tiny("llama")
    fp32 = weight_bytes(model)
    apply_precision(model, "bf16-autocast")  # autocast keeps fp32 weights
    assert weight_bytes(model) == fp32
    apply_precision(model, "bf16")
    assert weight_bytes(model) * 2 == fp32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fused_adamw_steps_bf16_weights_on_the_cpu_with_bf16_states():
    model = tiny("llama")
    apply_precision(model, "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state[model.lm_head.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16  # the audit counts 2+2 B


def loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpoint replays the RNG state)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_checkpointing_gives_the_same_loss_and_gradients(family):
    auto = AutoModelForCausalLM if family == "llama" else AutoModelForSequenceClassification
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids if family == "llama" else torch.tensor([0, 1, 1, 0])}
    plain_loss, plain = loss_and_grads(tiny(family, auto), batch)
    model = tiny(family, auto)
    enable_gradient_checkpointing(model)
    assert all(m.gradient_checkpointing for m in model.base_model.modules()
               if type(m).__name__ in ("LlamaDecoderLayer", "BertLayer"))
    ckpt_loss, ckpt = loss_and_grads(model, batch)
    assert abs(plain_loss - ckpt_loss) < 1e-5
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_checkpointing_reaches_through_a_peft_wrapper_and_frozen_embeddings_stay_out_of_backward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2]))
    enable_gradient_checkpointing(model)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    model.train()
    out = model.get_base_model().model.embed_tokens(torch.randint(0, 128, (2, 8)))
    assert not out.requires_grad  # no input-grad hook: backward stops at the lowest adapter
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while fn runs (tensors saved by every op)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_blocks_called_one_by_one_are_checkpointed_too():
    """prefix_cache.top_forward calls a train_top variant's blocks itself: transformers 5 checkpoints
    in each block class's forward (GradientCheckpointingLayer), so they keep only their inputs."""
    L = 4
    model = tiny("llama", AutoModelForSequenceClassification, num_labels=2, num_hidden_layers=L, pad_token_id=0)
    model.train()
    hidden = torch.randn(4, 32, 32, requires_grad=True)
    mask = torch.ones(4, 32, dtype=torch.long)
    plain = saved_bytes(lambda: top_forward(model, hidden, mask, 0))
    enable_gradient_checkpointing(model)
    ckpt = saved_bytes(lambda: top_forward(model, hidden, mask, 0))
    # blocks 0..L-2 run through their forward (checkpointed: each keeps its input 4*32*32*4 B plus the
    # rotary cos/sin and mask it was given); the last block is run piecewise (run_block_pooled), not checkpointed
    per_block = (plain - ckpt) / (L - 1)
    assert ckpt < plain * 0.5 and per_block > 4 * 32 * 32 * 4 * 4


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    albert = AutoModel.from_config(AutoConfig.for_model("albert", vocab_size=64, embedding_size=16, hidden_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64))
    with pytest.raises(ModelError) as err:
        enable_gradient_checkpointing(albert)
    assert str(err.value) == "train.gradient_checkpointing: model type albert does not support gradient checkpointing"
    with pytest.raises(ModelError, match=r"^train.gradient_checkpointing: model type Linear does not support"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
