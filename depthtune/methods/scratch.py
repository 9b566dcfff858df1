"""`init: scratch`: the same architecture from a random init, every parameter trained: the baseline that says what
pretraining is worth on the data. Alone: freezing random layers (train_top) or adapting them (LoRA, BitFit)
measures nothing."""
from __future__ import annotations

from depthtune.errors import ConfigError
from depthtune.methods.base import Method, register

INITS = ("pretrained", "scratch")


class Scratch(Method):
    name = "scratch"
    key = "init"
    unset = "pretrained"
    order = 40
    listed_when_unset = True
    # Random weights: no pretrained features to protect; a small BERT's pretraining lr.
    default_lr = 5e-4
    lr_reason = "random weights: no pretrained features to protect; a small BERT's pretraining lr"
    efficiency = 0.45  # trains like full
    pretrained = False

    def parse(self, value, path: str):
        if value not in INITS:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(INITS)}")
        return "scratch" if value == "scratch" else None

    def example(self, family) -> dict:
        return {"init": "scratch"}

    def describe(self, options) -> str:
        return "scratch init"


register(Scratch())
