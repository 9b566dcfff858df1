"""Seconds a process spends in named activities (e.g. "mlflow"), for the stage timing table.

    with stopwatch.measure("mlflow"):
        tracking.log_variant_training(...)
    stopwatch.total("mlflow")   # read by flows/stage.py when the stage ends

Nested measurements of the same label count once. Stdlib only: reading it costs nothing.
"""
from __future__ import annotations

import contextlib
import time

_totals: dict[str, float] = {}
_depth: dict[str, int] = {}


@contextlib.contextmanager
def measure(label: str):
    _depth[label] = _depth.get(label, 0) + 1
    t = time.perf_counter()
    try:
        yield
    finally:
        _depth[label] -= 1
        if _depth[label] == 0:
            _totals[label] = _totals.get(label, 0.0) + time.perf_counter() - t


def total(label: str) -> float:
    return _totals.get(label, 0.0)
