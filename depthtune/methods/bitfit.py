"""`bitfit: true` (Zaken et al. 2022): only the biases (and a classifier's new head) train; every weight matrix
frozen. Refused on a family without biases (Llama, Mistral, Qwen3), where it would silently be a linear probe."""
from __future__ import annotations

from depthtune.errors import ConfigError
from depthtune.methods.base import Method, Param, register, trains_beyond_head


class BitFit(Method):
    name = "bitfit"
    key = "bitfit"
    unset = False
    order = 30
    listed_when_unset = True
    # Biases only (Zaken et al. 2022 use 1e-4..1e-3 on BERT-base; small models want the top).
    default_lr = 1e-3
    lr_reason = "biases only: Zaken et al. 2022 use 1e-4..1e-3 on BERT-base; small models want the top"
    # trains like full: its backward still runs through every block
    efficiency = 0.45

    def parse(self, value, path: str):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not true/false")
        return True if value else None

    def describe(self, options) -> str:
        return "bitfit"

    def trains(self, p: Param, options, num_layers: int, task) -> bool:
        return p.is_new_head(task) or p.name.endswith(".bias")

    def refuse_useless(self, model, options, model_type: str, path: str) -> None:
        if trains_beyond_head(model):
            return
        any_trainable = any(p.requires_grad for p in model.parameters())
        why = ("it has no bias parameters outside the head" if any_trainable  # causal_lm: the lm_head stays frozen
               else "it has no bias parameters") + "; use lora or train_top"
        raise ConfigError(f"{path}: bitfit on this {model_type} would train "
                          f"{'only the head' if any_trainable else 'nothing'}: {why}")

    def frozen_matmuls(self, options):
        return 0, 0  # every matmul weight frozen and no adapter: the LoRA formula with no targets


register(BitFit())
