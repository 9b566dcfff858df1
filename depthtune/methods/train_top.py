"""`train_top: t` (t >= 1): freeze the embeddings and the bottom blocks, train the top t blocks, the pooler, the
final norm and the head. The frozen bottom is a prefix the cache runs once (depthtune.training.prefix_cache)."""
from __future__ import annotations

from depthtune.errors import ConfigError
from depthtune.methods.base import Method, Param, register


def parse_top(value, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {value!r} is not an integer")
    if value < 0:
        raise ConfigError(f"{path}: {value} is out of range, expected >= 0")
    return value


class TrainTop(Method):
    name = "top"
    key = "train_top"
    order = 10
    listed_when_unset = True
    # Only the top layers and the head move; the frozen bottom needs no protection.
    default_lr = 2e-4
    lr_reason = "only the top blocks and the head move; the frozen bottom needs no protection"
    # its head at its own 2e-4: at 2e-3, train_top: 2 on TREC (6 classes) scored 0.914 test accuracy against 0.943
    # (McNemar p=0.013, same texts, AMD EPYC; issue 27); the raised head lr is for kinds whose lr is far below it
    raises_head_lr = False
    # the default pipeline's top2: 0.59 (its frozen prefix is cached, not recomputed)
    efficiency = 0.55

    def parse(self, value, path: str):
        t = parse_top(value, path)
        return t if t >= 1 else None

    def example(self, family) -> dict:
        return {"train_top": 1}

    def check_against_model(self, options, kept_layers: int, path: str) -> None:
        if options > kept_layers:
            raise ConfigError(f"{path}.{self.key}: {options} exceeds the model's {kept_layers} layers")

    def describe(self, options) -> str:
        return f"train_top={options}"

    def trains(self, p: Param, options, num_layers: int, task) -> bool:
        # the head, the pooler and the final norm sit above every block: they train with the top ones (a causal
        # LM's lm_head too; when tied, it is the input embeddings and stays frozen)
        if p.coarse in ("head", "pooler", "final_norm"):
            return True
        return p.layer is not None and p.layer >= num_layers - options

    def cached_prefix_layers(self, options, num_layers: int) -> int:
        return num_layers - options


register(TrainTop())
