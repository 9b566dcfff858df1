"""One GPU per concurrent variant on a multi-GPU machine (`python -m flows.pipeline --parallel N`).

Each variant's `dvc repro finetune@v` / `evaluation@v` runs with CUDA_VISIBLE_DEVICES set to one GPU
taken from a pool and given back when the variant is done, so N concurrent variants on N GPUs never
share one (they would all land on cuda:0 otherwise). The pool is the GPUs this process may see: the
entries of its own CUDA_VISIBLE_DEVICES when set (a user who hands the pipeline GPUs 2,3 gets 2 and 3),
else 0 .. torch.cuda.device_count() - 1. Without a GPU the variants run as before, on the CPU.
"""
from __future__ import annotations

import contextlib
import os
import queue
from typing import Iterator, Optional


def visible_gpus(env_value: Optional[str], device_count: int) -> list[str]:
    """The GPU ids a child may be given: CUDA_VISIBLE_DEVICES's entries (ids or UUIDs), else 0..count-1."""
    if env_value is not None:
        return [d.strip() for d in env_value.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(device_count)]


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class GpuSlots:
    """A pool of GPU ids; `take()` lends one (or None without GPUs) for the duration of a with-block."""

    def __init__(self, gpus: list[str]):
        self.gpus = list(gpus)
        self.pool: "queue.Queue[str]" = queue.Queue()
        for g in self.gpus:
            self.pool.put(g)

    @classmethod
    def of_this_machine(cls) -> "GpuSlots":
        return cls(visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_device_count()))

    def describe(self, parallel: int) -> str:
        if not self.gpus:
            return f"{parallel} variants side by side on the CPU (no GPU visible)"
        if parallel > len(self.gpus):
            return (f"{parallel} variants side by side on {len(self.gpus)} GPUs ({', '.join(self.gpus)}): at most "
                    f"{len(self.gpus)} train at once, one per GPU; the others wait for a free GPU")
        return f"{parallel} variants side by side, one GPU each (of {', '.join(self.gpus)})"

    @contextlib.contextmanager
    def take(self) -> Iterator[Optional[str]]:
        """A GPU id for this block (blocks until one is free), None when the machine has none."""
        if not self.gpus:
            yield None
            return
        gpu = self.pool.get()
        try:
            yield gpu
        finally:
            self.pool.put(gpu)


def child_env(gpu: Optional[str]) -> Optional[dict]:
    """The environment of a variant's dvc process: this one, CUDA_VISIBLE_DEVICES set to its GPU."""
    if gpu is None:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
