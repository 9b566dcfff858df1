"""`train_top: 0`, the linear probe: every block frozen, only the pooler, the final norm and the head train. The
whole model below them is a prefix the cache runs once."""
from __future__ import annotations

from depthtune.methods.base import HEAD_LR, register
from depthtune.methods.train_top import TrainTop, parse_top


class Probe(TrainTop):
    name = "probe"
    order = 11
    # Only the pooler and a freshly initialised head: a convex-ish problem.
    default_lr = HEAD_LR
    lr_reason = "only the pooler and a freshly initialised head train: a convex-ish problem"
    # a probe's step is mostly the step floor; its efficiency barely matters
    efficiency = 0.55

    def parse(self, value, path: str):
        return 0 if parse_top(value, path) == 0 else None

    def example(self, family) -> dict:
        return {"train_top": 0}

    def describe(self, options) -> str:
        return "linear probe"


register(Probe())
