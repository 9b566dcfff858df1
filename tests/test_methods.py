"""Every registered variant kind on every model family: the audit, `depthtune plan` and step-time's prediction
read the same kind and give the same memory and time; a kind's refusals are one line naming the variant.

The kinds and the families come from their registries (depthtune.methods, depthtune.model.families): a new kind or
family is checked here without editing this file.
"""
from __future__ import annotations

import pytest

from depthtune import methods

from depthtune.planning import step_time
from depthtune.planning.audit import audit_built
from depthtune.config import ModelConfig, parse_section, parse_variant
from depthtune.errors import ConfigError
from depthtune.model.families import FAMILIES
from depthtune.planning.planner import PlanSettings, plan_variant
from depthtune.model.variants import build_variant

TINY = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 128}
B, S = 4, 24
TP = dict(gemm_flops_per_s=2e10, optimizer_s_per_param=1e-9, step_floor_s=2e-3)


def model_cfg(model_type: str) -> ModelConfig:
    extra = {"num_key_value_heads": 2} if FAMILIES[model_type].grouped_query else {}
    return parse_section(ModelConfig, {"source": "scratch", "scratch": {**TINY, "model_type": model_type, **extra}},
                         "model")


def tasks_of(model_type: str) -> list[str]:
    return ["classification", "causal_lm"] if FAMILIES[model_type].decoder else ["classification"]


CASES = [(kind, mt, task) for kind in methods.load() for mt in FAMILIES for task in tasks_of(mt)]


def test_the_registry_lists_every_kind_once_each_choosing_itself():
    registered = methods.load()
    assert set(registered) >= {"full", "top", "probe", "lora", "bitfit", "scratch"}
    for name, method in registered.items():
        for mt in FAMILIES:
            spec = parse_variant("v", method.example(FAMILIES[mt]), "variants.v")
            assert spec.kind == name and spec.method is method
            # params.yaml's shape round-trips: the kind's key and options, every other kind's key unset
            again = parse_variant("v", {k: v for k, v in spec.as_params().items() if k != "train"}, "variants.v")
            assert again == spec


@pytest.mark.parametrize("kind,model_type,task", CASES, ids=[f"{k}-{m}-{t}" for k, m, t in CASES])
def test_audit_plan_and_step_time_agree(kind, model_type, task, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHTUNE_CALIBRATION", str(tmp_path / "calibration.json"))  # nothing measured yet
    method, mc = methods.get(kind), model_cfg(model_type)
    spec = parse_variant("v", method.example(FAMILIES[model_type]), "variants.v")
    labels = 2 if task == "classification" else 0
    try:
        built = build_variant(mc, spec, labels, device="meta", path="variants.v", task=task)
    except ConfigError as exc:  # a kind that cannot apply: one line naming the variant (BitFit without biases)
        assert str(exc).startswith("variants.v: ") and "\n" not in str(exc)
        assert kind == "bitfit" and not FAMILIES[model_type].biases
        return
    audit = audit_built(built, variant_name="v", spec=spec, num_labels=labels, batch_size=1, seq_len=S, task=task,
                        model_source="scratch")
    settings = PlanSettings(memory=2 ** 40, seq_len=S, examples=10 * B, task=task, num_labels=labels,
                            throughput=step_time.Throughput(**TP))
    row = plan_variant(mc, None, "v", spec, settings)
    # one memory figure: the plan's peak at batch 1 is the audit's
    assert row["peak_bytes_at_1"] == audit.estimates["memory_bytes"]["total"]
    assert row["trainable_params"] == audit.trainable_params == built.trainable_params
    # one time model: the plan's epoch is step_time.predict over the audit's step FLOPs at the kind's efficiency
    at = audit_built(built, variant_name="v", spec=spec, num_labels=labels, batch_size=row["max_batch"], seq_len=S,
                     task=task, model_source="scratch")
    # ... and at the largest batch the plan found (where the activations dominate: at batch 1 the evaluation peak
    # can hide a kind's activation term, as it hid BitFit's when the planner passed no frozen-matmul shape)
    assert row["peak_bytes"] == at.estimates["memory_bytes"]["total"]
    shapes = [(row["max_batch"], S)] * -(-settings.examples // row["max_batch"])
    tp = step_time.Throughput(**TP, efficiency=method.efficiency)
    expected = step_time.predict(at.estimates["flops_per_token"]["step"], audit.trainable_params, shapes, 1, tp)
    assert row["epoch_s"] == pytest.approx(expected["epoch_s"], rel=1e-12)
    assert row["efficiency"] == method.efficiency and row["efficiency_source"] == "assumed"
    # the cache the plan shows apart is the kind's frozen prefix
    assert (row["host_cache_bytes"] > 0) == (method.cached_prefix_layers(spec.options, built.num_layers) > 0)


def test_bitfit_is_refused_exactly_where_the_family_has_no_biases():
    for mt, family in FAMILIES.items():
        spec = parse_variant("b", {"bitfit": True}, "variants.b")
        try:
            build_variant(model_cfg(mt), spec, 2, device="meta", path="variants.b")
            refused = False
        except ConfigError as exc:
            refused = True
            assert str(exc) == (f"variants.b: bitfit on this {mt} would train only the head: it has no bias "
                                "parameters outside the head; use lora or train_top")
        assert refused == (not family.biases), mt


def test_step_time_before_training_assumes_the_kind_efficiency(tmp_path, monkeypatch):
    """The finetune stage's prediction (step_time.before_training) reads the same kind's efficiency the plan does."""
    from depthtune.data.batching import Examples

    monkeypatch.setenv("DEPTHTUNE_CALIBRATION", str(tmp_path / "calibration.json"))
    mc = model_cfg("bert")
    examples = Examples(input_ids=[[101, 7, 8, 102]] * 8, labels=[0, 1] * 4)
    for kind, method in methods.load().items():
        spec = parse_variant("v", method.example(FAMILIES["bert"]), "variants.v")
        built = build_variant(mc, spec, 2, device="meta")
        audit = audit_built(built, variant_name="v", spec=spec, num_labels=2, batch_size=4, seq_len=S,
                            model_source="scratch")
        pred = step_time.before_training(audit, examples, batch_size=4, seed=0, epochs=1, device="cpu",
                                         precision="fp32", kind=spec.kind)
        assert pred["throughput"]["efficiency"] == method.efficiency, kind


def test_train_layers_trains_exactly_the_chosen_blocks_of_minilm():
    """The kind added as one file (depthtune/methods/train_layers.py): blocks 1 and 4 of the packaged MiniLM, with
    its pooler and head: 2 x 1,774,464 + 147,840 + 770 parameters; the prefix below block 1 is cacheable."""
    spec = parse_variant("mid", {"train_layers": [4, 1]}, "variants.mid")
    built = build_variant(ModelConfig(), spec, 2, device="meta", path="variants.mid")
    assert built.trainable_params == 2 * 1_774_464 + 147_840 + 770
    trained = {n.split(".layer.")[1].split(".")[0] for n, p in built.model.named_parameters()
               if p.requires_grad and ".layer." in n}
    assert trained == {"1", "4"}
    assert spec.method.cached_prefix_layers(spec.options, built.num_layers) == 1
    assert spec.describe() == "train_layers=[1, 4]" and spec.as_params()["train_layers"] == [1, 4]


@pytest.mark.parametrize("raw,message", [
    ({"train_layers": []}, "variants.v.train_layers: [] is not a non-empty list of block indices, e.g. [3, 7, 11]"),
    ({"train_layers": [1, 1]}, "variants.v.train_layers: [1, 1] lists a block twice"),
    ({"train_layers": [-1]}, "variants.v.train_layers: expected block indices >= 0, got [-1]"),
    ({"train_layers": [1], "train_top": 2}, "variants.v: train_top and train_layers cannot be combined (each "
                                            "chooses a variant kind: top, layers); keep one"),
])
def test_train_layers_refuses_bad_lists_in_one_line(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_variant("v", raw, "variants.v")
    assert str(info.value) == message


def test_train_layers_out_of_range_is_refused_once_the_depth_is_known():
    spec = parse_variant("v", {"train_layers": [2, 5], "depth": 4}, "variants.v")
    with pytest.raises(ConfigError) as info:
        build_variant(ModelConfig(), spec, 2, device="meta", path="variants.v")
    assert str(info.value) == "variants.v.train_layers: [5] out of range, the variant has blocks 0..3"
