"""The order of the audit's coarse layer buckets: the model's, input to output.

    embeddings, layer.0 .. layer.k-1, pooler, final_norm, head, then any other bucket

The audit summary and the comparison report (its table and depth heatmap) list
layers this way. Torch-free, so the report can use it without importing a model.
"""
from __future__ import annotations

import re
from typing import Iterable

LAYER_RE = re.compile(r"layer\.(\d+)$")
TOP = ("pooler", "final_norm", "head")  # above the last layer, in forward order


def layer_order_key(name: str) -> tuple[int, int]:
    """Sort key of a coarse bucket name. Unknown names all tie, so a stable sort keeps them
    in the order they were first seen, after the head."""
    if name == "embeddings":
        return (0, 0)
    m = LAYER_RE.match(name)
    if m:
        return (1, int(m.group(1)))  # numeric: layer.10 after layer.9
    if name in TOP:
        return (2, TOP.index(name))
    return (3, 0)


def ordered_layer_names(records: Iterable) -> list[str]:
    """Every coarse layer name in the `layers` of the given audit records, once, in layer order
    (a truncated variant simply lacks the upper layers)."""
    seen = dict.fromkeys(row["name"] for r in records for row in r.layers)
    return sorted(seen, key=layer_order_key)
