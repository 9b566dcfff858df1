"""`train_layers: [i, j, ...]`: train exactly those blocks (0 = the one nearest the embeddings), with the pooler, the
final norm and the head; every other block and the embeddings stay frozen (LLaMA-Factory users ask for "layers 10,
16, 17, 23"; `train_top: t` is the special case of the top t). The embeddings and the blocks below the lowest chosen
one are a frozen prefix the cache runs once; frozen blocks between chosen ones still pass gradients down."""
from __future__ import annotations

from depthtune.errors import ConfigError
from depthtune.methods.base import Method, Param, register


class TrainLayers(Method):
    name = "layers"
    key = "train_layers"
    order = 12
    # As train_top: only some blocks and the head move; the frozen rest needs no protection.
    default_lr = 2e-4
    lr_reason = "only the chosen blocks and the head move; the frozen rest needs no protection"
    # its head at its own 2e-4: at 2e-3, train_top: 2 on TREC (6 classes) scored 0.914 test accuracy against 0.943
    # (McNemar p=0.013, same texts, AMD EPYC; issue 27); the raised head lr is for kinds whose lr is far below it
    raises_head_lr = False
    # backward runs from the lowest chosen block up, through frozen blocks too: a full fine-tuning's share
    efficiency = 0.45

    def parse(self, value, path: str):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: {value!r} is not a non-empty list of block indices, e.g. [3, 7, 11]")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ConfigError(f"{path}: expected block indices >= 0, got {value}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{path}: {value} lists a block twice")
        return tuple(sorted(value))

    def check_against_model(self, options, kept_layers: int, path: str) -> None:
        bad = [i for i in options if i >= kept_layers]
        if bad:
            raise ConfigError(f"{path}.{self.key}: {bad} out of range, the variant has blocks 0..{kept_layers - 1}")

    def describe(self, options) -> str:
        return f"train_layers={list(options)}"

    def to_params(self, options):
        return list(options)

    def example(self, family) -> dict:
        return {"train_layers": [0, 2]}

    def trains(self, p: Param, options, num_layers: int, task) -> bool:
        if p.coarse in ("head", "pooler", "final_norm"):  # above every block, as train_top trains them
            return True
        return p.layer is not None and p.layer in options

    def cached_prefix_layers(self, options, num_layers: int) -> int:
        return options[0]  # the embeddings and the blocks below the lowest chosen one


register(TrainLayers())
