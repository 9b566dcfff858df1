"""What a variant kind is: one object that owns every decision the kind makes.

A kind is chosen by one key of `variants.<v>` in params.yaml (`lora: {...}`, `train_top: 2`, `bitfit: true`,
`init: scratch`; full fine-tuning is the kind no key chooses). `depth: k` is not a kind: it truncates the model
and combines with any of them. The object answers, for the rest of the package:
- its params: `parse` (the key's value -> typed, validated options), `check_against_model` (once the layer count
  is known), `describe`, `to_params` (the options as params.yaml writes them: depthtune.json, MLflow);
- what it trains: `prepare` (adapters added before freezing), `trains` (the freezing rule, one parameter at a
  time; depthtune.model.variants.set_trainable is the one loop that applies it), `refuse_useless` (a build that would
  train only the head by accident), `finish` (what is saved: LoRA merged);
- what it costs: `default_lr` (with the reason), `efficiency` (the share of the GEMM rate assumed before the kind
  has trained on this machine), `frozen_matmuls` (the activations its frozen matmul weights keep for the memory
  estimate), `cached_prefix_layers` (the frozen bottom the prefix cache runs once), `pretrained` (from the model's
  weights or random ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from depthtune.errors import ConfigError
from depthtune.named import Named
from depthtune.model.param_names import classify_param, coarse_bucket


@dataclass(frozen=True)
class Param:
    """One parameter as a freezing rule sees it (depthtune.model.param_names' buckets)."""
    name: str  # as named_parameters() gives it (peft's wrappers included)
    fine: str  # `layer.3.attention.q`, `layer.3.adapter`, `embeddings.word`, `head`
    coarse: str  # `layer.3`, `embeddings`, `head`, `pooler`, `final_norm`
    layer: Optional[int]  # the block index, None outside the blocks

    def is_new_head(self, task) -> bool:
        """A labelled task's head is new (random init): every kind trains it. A causal LM's lm_head is pretrained.
        `task`: the depthtune.tasks object the model is built for."""
        return self.coarse == "head" and task.labelled


# The lr of a freshly initialised classification head: what a head alone trains well at (the probe's default). A
# new head of a kind whose own lr is lower gets this one (train.head_lr: null), unless the kind says otherwise
# (raises_head_lr). Measured on CLINC150 (150 intents, 2,000 texts, AMD EPYC): full fine-tuning 0.812 test accuracy
# with its head at 8e-5 (cut still rising after 8 epochs), 0.92 with it at 2e-3 (a plateau by epoch 7).
HEAD_LR = 2e-3

class Method:
    """A variant kind. Subclasses set the class attributes and override what differs from full fine-tuning."""
    name: str = ""  # the kind's name: default lr and efficiency tables, calibration keys, reports
    key: Optional[str] = None  # the variants.<v> key that chooses it (None: full fine-tuning, no key)
    unset: Any = None  # that key's value when a variant is another kind (params.yaml's shape for every variant)
    order: int = 100  # where its key sits in a variant's params (depthtune.json, MLflow) and in listings
    # whether a variant of another kind still lists this key, unset (`train_top: null`): the first kinds do, so the
    # records they wrote (depthtune.json, checkpoint fingerprints, MLflow params) keep their shape; a kind added
    # later appears only in its own variants' params
    listed_when_unset: bool = False
    default_lr: float = 8e-5
    lr_reason: str = ""
    # a labelled task's new head at HEAD_LR (or the kind's lr when higher) by default, else at the kind's lr
    raises_head_lr: bool = True
    efficiency: float = 0.45
    pretrained: bool = True  # starts from model.source's weights (False: a random init)

    # ------------------------------------------------------------------ params

    def parse(self, value: Any, path: str) -> Any:
        """The key's value -> this kind's options, or None when the value chooses another kind (train_top: 0 is a
        probe, not the top-t kind; bitfit: false is no kind). Bad values: a one-line ConfigError naming `path`."""
        return value

    def example(self, family) -> dict:
        """A variant's params that choose this kind on a model of `family` (depthtune.model.families row): what
        `depthtune plan` shows by default and what the tests build for every kind x family."""
        return {self.key: True} if self.key else {}

    def check_against_model(self, options: Any, kept_layers: int, path: str) -> None:
        """Checks that need the variant's layer count (after depth)."""

    def describe(self, options: Any) -> str:
        """A few words for tables and logs ('' = nothing beyond full fine-tuning)."""
        return ""

    def to_params(self, options: Any) -> Any:
        """The options as params.yaml writes them under `key`."""
        return options

    # ------------------------------------------------------------------ what it trains

    def prepare(self, model, options: Any, path: str):
        """The model before freezing: adapters added here (LoRA); the base model otherwise."""
        return model

    def trains(self, p: Param, options: Any, num_layers: int, task) -> bool:
        """The freezing rule: whether parameter `p` of a model with `num_layers` kept blocks trains, for `task`
        (a depthtune.tasks object)."""
        return True

    def refuse_useless(self, model, options: Any, model_type: str, path: str) -> None:
        """Refuse a build whose only trainable parameters are the head's when the kind promised more."""

    def finish(self, model):
        """The model as saved (LoRA: adapters folded into the weights)."""
        return model

    # ------------------------------------------------------------------ what it costs

    def frozen_matmuls(self, options: Any) -> Optional[tuple[int, int]]:
        """costs.block_activation_bytes' `lora` argument: (r, adapted matmuls per block) when every matmul weight
        is frozen and only adapters (r > 0) or nothing (0, 0) sits beside them; None when the matmul weights
        train (their inputs are kept for the weight gradients)."""
        return None

    def cached_prefix_layers(self, options: Any, num_layers: int) -> int:
        """How many bottom blocks (plus the embeddings) are frozen and can be run once and cached."""
        return 0


def trains_beyond_head(model) -> bool:
    """Whether anything but the head trains (after freezing): what refuse_useless asks."""
    return any(p.requires_grad and coarse_bucket(classify_param(n)) != "head" for n, p in model.named_parameters())


REGISTRY = Named("variant kind")
register = REGISTRY.register  # each module of depthtune.methods calls it once for its kind


def params_order(m: Method) -> tuple:
    return m.order, m.name


def ordered() -> list[Method]:
    return sorted(REGISTRY.values(), key=params_order)


def get(name: str) -> Method:
    return REGISTRY.find(name, params_order)


def keys() -> list[str]:
    """The variants.<v> keys that choose a kind, in params order."""
    out = []
    for m in ordered():
        if m.key and m.key not in out:
            out.append(m.key)
    return out


def choose(raw: dict, path: str) -> tuple[Method, Any]:
    """The kind a variant's raw params choose, and its options; two kinds at once is a one-line error."""
    chosen = []
    for m in ordered():
        if m.key is not None and raw.get(m.key) is not None:  # `train_top: null`: not chosen
            options = m.parse(raw[m.key], f"{path}.{m.key}")
            if options is not None:
                chosen.append((m, options))
    if len(chosen) > 1:
        (a, _), (b, _) = chosen[:2]
        raise ConfigError(f"{path}: {a.key} and {b.key} cannot be combined (each chooses a variant kind: "
                          f"{a.name}, {b.name}); keep one")
    return chosen[0] if chosen else (get("full"), None)
