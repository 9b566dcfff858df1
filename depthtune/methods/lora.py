"""`lora: {r, alpha, dropout, targets, layers}`: low-rank adapters (peft) on the named linear modules of the kept
blocks (`layers` of them); every base weight frozen, the adapters and a classifier's new head train. Saved merged:
the adapters folded into the weights, a plain transformers model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from depthtune.errors import ConfigError
from depthtune.methods.base import Method, Param, register, trains_beyond_head
from depthtune.model.param_names import layer_index
from depthtune.schema import parse_section, setting


@dataclass(frozen=True)
class LoraSpec:
    r: int = setting(8, lo=1, hi=1024)
    alpha: float = setting(16.0, lo=0.0, lo_open=True)
    dropout: float = setting(0.1, lo=0.0, hi=1.0, hi_open=True)
    targets: list = setting(["query", "value"])
    layers: Optional[list] = setting(None)  # block indices that get adapters (None = all kept layers)


def block_linear_names(model, layers: Optional[list] = None) -> list[str]:
    """Leaf names of the linear modules inside the blocks (only blocks `layers` when given):
    query, value, dense... (BERT), q_proj ... down_proj (Llama family), c_attn, c_proj, c_fc (GPT-2)."""
    from torch import nn

    names = set()
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
            continue
        idx = layer_index(name + ".")
        if idx is not None and (layers is None or idx in layers):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


class Lora(Method):
    name = "lora"
    key = "lora"
    order = 20
    listed_when_unset = True
    # The adapters start at zero (B = 0) and scale by alpha / r; 1e-4 barely moves them.
    default_lr = 1e-3
    lr_reason = "the adapters start at zero (B = 0) and scale by alpha / r; 1e-4 barely moves them"
    # the default pipeline's lora8: 0.39 (small r-wide matmuls and elementwise dropout/scale/add per adapted module,
    # none of them GEMM-bound)
    efficiency = 0.4

    def parse(self, value, path: str):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping like {{r: 8, alpha: 16}}, got {value!r}")
        spec = parse_section(LoraSpec, value, path)
        if not spec.targets:
            raise ConfigError(f"{path}.targets: empty, expected module names like [query, value]")
        if spec.layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in spec.layers):
            raise ConfigError(f"{path}.layers: expected a list of layer indices >= 0, got {list(spec.layers)}")
        return spec

    def example(self, family) -> dict:
        return {"lora": {"r": 2, "targets": list(family.lora_targets)}}  # the family's query and value projections

    def check_against_model(self, options: LoraSpec, kept_layers: int, path: str) -> None:
        if options.layers is not None:
            bad = [i for i in options.layers if i >= kept_layers]
            if bad:
                raise ConfigError(f"{path}.lora.layers: {bad} out of range, the variant has layers "
                                  f"0..{kept_layers - 1}")

    def describe(self, options: LoraSpec) -> str:
        return f"lora r={options.r}"

    def prepare(self, model, options: LoraSpec, path: str):
        """Adapters on `targets` in the kept blocks (`layers` of them). A target found in no such block (the head,
        the pooler, a name of another family) would leave LoRA training only the head: refused."""
        from peft import LoraConfig, get_peft_model

        layers = list(options.layers) if options.layers is not None else None
        available = block_linear_names(model, layers)
        missing = [t for t in options.targets if t not in available]
        if missing:
            where = "the kept layers" if layers is None else f"layers {layers}"
            raise ConfigError(f"{path}.lora.targets: {missing} match no module; linear modules are: "
                              f"{', '.join(available)} (in {where})")
        cfg = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                         target_modules=list(options.targets), layers_to_transform=layers,
                         fan_in_fan_out=type(model).__name__.startswith("GPT2"))  # GPT-2's Conv1D: W is in x out
        return get_peft_model(model, cfg)

    def trains(self, p: Param, options, num_layers: int, task) -> bool:
        # a causal LM's lm_head is pretrained and stays frozen (an untied Llama-7B head alone is 131M parameters)
        return p.is_new_head(task) or "adapter" in p.fine

    def refuse_useless(self, model, options, model_type: str, path: str) -> None:
        if trains_beyond_head(model):
            return
        what = "only the head" if any(p.requires_grad for p in model.parameters()) else "nothing"
        raise ConfigError(f"{path}: lora on this {model_type} would train {what}: no adapter sits in a kept layer")

    def finish(self, model):
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def frozen_matmuls(self, options: LoraSpec):
        return options.r, len(options.targets)


register(Lora())
