"""`depthtune plan`: for each depth variant, the largest batch that fits a memory budget, the predicted
peak at that batch, and the predicted time per epoch, before anything trains.

Memory is the audit's estimate (`depthtune.planning.costs.estimate`, the same figure the audit record, the
report and MLflow show) at batch b: weights, gradients and AdamW states do not depend on b, the
activations (and a causal LM's logits) grow linearly with it, so the largest fitting batch is found by
bisection over b in [1, 65,536]. The frozen prefix cache of a train_top variant lives in host memory
(depthtune.training.prefix_cache), not in the accelerator's: it is shown apart, not counted against the budget.

Time per epoch: depthtune.planning.step_time's model, the one the finetune stage predicts with: ceil(examples / b)
steps of b x seq_len tokens, each the audit's per-step FLOPs over a GEMM timed here now x the variant
kind's efficiency (measured on this machine once such a variant has trained here, else assumed: both
printed), plus the optimizer and a per-step floor timed now. `--tflops` and `--mfu` set the GEMM rate and
the efficiency for another machine.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Optional

from depthtune.planning.audit import bucket_counts
from depthtune.planning.costs import estimate, estimate_settings
from depthtune.config import ModelConfig, VariantSpec
from depthtune.errors import ConfigError
from depthtune.planning.step_time import Throughput, efficiency_key, known_calibration, predict
from depthtune.model.variants import build_variant

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


@dataclass
class PlanSettings:
    memory: int  # bytes the training process may use on the device
    seq_len: int
    examples: int  # per epoch, for the time prediction
    task: str = "classification"
    num_labels: int = 2
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    throughput: Optional[Throughput] = None  # GEMM, optimizer and step floor (step_time.measure); None: no time
    mfu: Optional[float] = None  # the efficiency to use for every variant (--mfu); None: per kind, as step_time
    device: str = "cpu"
    flops_source: str = "GEMM measured now"


def plan_variant(model_cfg: ModelConfig, base_config, name: str, spec: VariantSpec, s: PlanSettings) -> dict:
    """One variant's plan row: trainable count, largest batch, its predicted peak, time per epoch."""
    built = build_variant(model_cfg, spec, s.num_labels, device="meta", base_config=base_config,
                          path=f"variant {name}", task=s.task)
    buckets = bucket_counts(built.model)
    total = sum(b["total"] for b in buckets)
    trainable = sum(b["trainable"] for b in buckets)

    settings = estimate_settings(spec, model_cfg.source, task=s.task, precision=s.precision,
                                 gradient_checkpointing=s.gradient_checkpointing)

    def est(batch: int) -> dict:  # the audit's estimate (the same terms and settings, the same figure)
        return estimate(built.config, buckets, total, trainable, batch, s.seq_len, **settings)

    batch = largest_batch(lambda b: est(b)["memory_bytes"]["total"], s.memory)
    at = est(max(batch, 1))
    tokens = s.examples * s.seq_len  # every example at seq_len tokens: an upper bound with dynamic padding
    seconds, efficiency = None, None
    if s.throughput is not None and batch:
        tp = replace(s.throughput)
        family = str(built.config.model_type)
        known = known_calibration(efficiency_key(s.device, s.precision, spec.kind, family))
        tp.efficiency = s.mfu or (known or {}).get("efficiency") or spec.method.efficiency
        tp.efficiency_source = "--mfu" if s.mfu else "measured here" if (known or {}).get("efficiency") else "assumed"
        shapes = [(batch, s.seq_len)] * math.ceil(s.examples / batch)
        seconds, efficiency = predict(at["flops_per_token"]["step"], trainable, shapes, 1, tp)["epoch_s"], tp
    cache = spec.method.cached_prefix_layers(spec.options, built.num_layers) > 0
    return {"variant": name, "description": spec.describe(), "total_params": total, "trainable_params": trainable,
            "max_batch": batch, "peak_bytes": at["memory_bytes"]["total"] if batch else None,
            "peak_bytes_at_1": est(1)["memory_bytes"]["total"], "memory_terms": at["memory_bytes"],
            "flops_per_token_train": at["flops_per_token"]["train"], "epoch_s": seconds,
            "efficiency": efficiency.efficiency if efficiency else None,
            "efficiency_source": efficiency.efficiency_source if efficiency else None,
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
             + (f"; time per epoch of {s.examples:,} examples at the largest batch: GEMM "
                f"{s.throughput.gemm_flops_per_s / 1e9:,.1f} GFLOP/s ({s.flops_source}) x the efficiency "
                "shown (depthtune/planning/step_time.py)" if s.throughput else "") + ".", "",
             "| variant | trainable | total | largest batch | predicted peak | peak at batch 1 | epoch | "
             "efficiency | host prefix cache |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        batch = (f">= {MAX_BATCH:,}" if r["max_batch"] == MAX_BATCH else f"{r['max_batch']:,}") if r["max_batch"] \
            else "does not fit"
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['total_params']:,} | {batch} | "
                     f"{_size(r['peak_bytes'])} | {_size(r['peak_bytes_at_1'])} | {_duration(r['epoch_s'])} | "
                     f"{'—' if r['efficiency'] is None else format(r['efficiency'], '.2f')} "
                     f"{'(' + r['efficiency_source'] + ')' if r['efficiency_source'] else ''} | "
                     f"{_size(r['host_cache_bytes']) if r['host_cache_bytes'] else '—'} |")
    return "\n".join(lines)
