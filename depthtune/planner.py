"""`depthtune plan`: for each depth variant, the largest batch that fits a memory budget, the predicted
peak at that batch, and the predicted time per epoch, before anything trains.

Memory is the audit's estimate (`depthtune.audit.estimate`, the same figure the audit record, the
report and MLflow show) at batch b: weights, gradients and AdamW states do not depend on b, the
activations (and a causal LM's logits) grow linearly with it, so the largest fitting batch is found by
bisection over b in [1, 65,536]. The frozen prefix cache of a train_top variant lives in host memory
(depthtune.prefix_cache), not in the accelerator's: it is shown apart, not counted against the budget.

Time per epoch = examples x seq_len tokens x the audit's training FLOPs per token / (the GEMM throughput
measured here, now, x an MFU). The MFU is an assumption until a variant of the same kind has been
measured on this machine: it is printed with every prediction, and `--mfu` sets it (calibrating it from
the finetune stage's measured tokens/s is issue 15's next step).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from depthtune.audit import bucket_counts, estimate
from depthtune.config import ModelConfig, VariantSpec
from depthtune.errors import ConfigError
from depthtune.variants import build_variant

# Model FLOPs utilisation assumed when none is measured (an assumption, printed as one: a training step
# is GEMMs plus attention, norms, the optimizer and data movement, so it reaches a fraction of the GEMM peak)
MFU_ASSUMED = 0.35
MAX_BATCH = 1 << 16
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(text: str) -> int:
    """'24GiB', '80 GB', '512MiB', '1e9' -> bytes; anything else is a one-line ConfigError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--memory {text!r}: expected a size like 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def largest_batch(peak_at: Callable[[int], int], budget: int) -> int:
    """The largest b in [1, MAX_BATCH] with peak_at(b) <= budget (peak_at grows with b); 0 if none fits."""
    if peak_at(1) > budget:
        return 0
    lo, hi = 1, MAX_BATCH
    while lo < hi:  # invariant: peak_at(lo) fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak_at(mid) <= budget else (lo, mid - 1)
    return lo


def gemm_flops_per_s(device: str = "cpu", precision: str = "fp32") -> float:
    """The matmul throughput of this machine, now: a square GEMM timed after a warm-up (CPU: 1,024^3 in
    fp32, ~0.1 s on 2 cores; CUDA: 8,192^3 in bf16 unless fp32). 2 n^3 FLOPs per product."""
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.float32 if precision == "fp32" or not device.startswith("cuda") else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 3
    torch.matmul(a, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return reps * 2 * n ** 3 / (time.perf_counter() - t)


@dataclass
class PlanSettings:
    memory: int  # bytes the training process may use on the device
    seq_len: int
    examples: int  # per epoch, for the time prediction
    task: str = "classification"
    num_labels: int = 2
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    flops_per_s: float = 0.0  # the measured GEMM throughput
    mfu: float = MFU_ASSUMED
    mfu_measured: bool = False
    flops_source: str = "GEMM measured now"


def plan_variant(model_cfg: ModelConfig, base_config, name: str, spec: VariantSpec, s: PlanSettings) -> dict:
    """One variant's plan row: trainable count, largest batch, its predicted peak, time per epoch."""
    built = build_variant(model_cfg, spec, s.num_labels, device="meta", base_config=base_config,
                          path=f"variant {name}", task=s.task)
    buckets = bucket_counts(built.model)
    total = sum(b["total"] for b in buckets)
    trainable = sum(b["trainable"] for b in buckets)

    lora = (spec.lora.r, len(spec.lora.targets)) if spec.lora is not None else None
    pretrained = model_cfg.source != "scratch" and spec.init != "scratch"

    def est(batch: int) -> dict:  # the audit's estimate (the same terms, the same figure)
        return estimate(built.config, buckets, total, trainable, batch, s.seq_len, task=s.task,
                        precision=s.precision, gradient_checkpointing=s.gradient_checkpointing, lora=lora,
                        pretrained=pretrained)

    batch = largest_batch(lambda b: est(b)["memory_bytes"]["total"], s.memory)
    at = est(max(batch, 1))
    tokens = s.examples * s.seq_len  # every example at seq_len tokens: an upper bound with dynamic padding
    flops = at["flops_per_token"]["train"] * tokens
    seconds = flops / (s.flops_per_s * s.mfu) if s.flops_per_s else None
    cache = spec.train_top is not None and spec.train_top < built.num_layers
    return {"variant": name, "description": spec.describe(), "total_params": total, "trainable_params": trainable,
            "max_batch": batch, "peak_bytes": at["memory_bytes"]["total"] if batch else None,
            "peak_bytes_at_1": est(1)["memory_bytes"]["total"], "memory_terms": at["memory_bytes"],
            "flops_per_token_train": at["flops_per_token"]["train"], "epoch_s": seconds,
            "host_cache_bytes": tokens * at_hidden(built.config) * 4 if cache else 0}


def at_hidden(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "dim"))


def plan(model_cfg: ModelConfig, base_config, specs: list[tuple[str, VariantSpec]], s: PlanSettings) -> list[dict]:
    return [plan_variant(model_cfg, base_config, name, spec, s) for name, spec in specs]


def _size(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.1f} h"


def plan_table(rows: list[dict], s: PlanSettings) -> str:
    """The plan as a Markdown table with the assumptions it rests on."""
    lines = [f"Budget {_size(s.memory)}, sequences of {s.seq_len} tokens, {s.task}, {s.precision}"
             + (", gradient checkpointing" if s.gradient_checkpointing else "")
             + f"; time per epoch of {s.examples:,} examples at {s.flops_per_s / 1e9:,.1f} GFLOP/s ({s.flops_source}) "
             f"x MFU {s.mfu:.2f} ({'measured' if s.mfu_measured else 'assumed'}).", "",
             "| variant | trainable | total | largest batch | predicted peak | peak at batch 1 | epoch | "
             "host prefix cache |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        batch = (f">= {MAX_BATCH:,}" if r["max_batch"] == MAX_BATCH else f"{r['max_batch']:,}") if r["max_batch"] \
            else "does not fit"
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['total_params']:,} | {batch} | "
                     f"{_size(r['peak_bytes'])} | {_size(r['peak_bytes_at_1'])} | {_duration(r['epoch_s'])} | "
                     f"{_size(r['host_cache_bytes']) if r['host_cache_bytes'] else '—'} |")
    return "\n".join(lines)
