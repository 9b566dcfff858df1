"""Predicted training time per variant, before it trains: the FLOPs of its real batches over this machine's
measured throughput, shown next to the measured time afterwards.

    predicted = sum over an epoch's batches of  B*S*(dense + per_position*S) / (G * efficiency)   the matmuls
              + steps * (trainable * optimizer_s_per_param + step_floor_s)                     the rest of a step
    dense, per_position  the audit's training FLOPs per token of one optimizer step at length S (and
                         per_sequence: an encoder's pooler and head, once per text)
                         (costs.estimate: flops_per_token.step; a cached frozen prefix is not recomputed)
    B, S                 each batch as training will cut it (batching.length_grouped_batches, padded to its
                         longest text): padding is computed, so it is counted
    G                    a GEMM timed now on this device at the model's own matmul shape (a typical batch's
                         tokens x H x 4H): at ~500 tokens x 384 a CPU runs below a big square GEMM's rate
    efficiency           the share of G that a training step's counted FLOPs reach: attention's batched
                         matmuls, softmax, norms, GELU, dropout and autograd's bookkeeping are not big GEMMs.
                         the kind's assumed `efficiency` (depthtune.methods) until a variant of the same kind and family has trained
                         on this machine; then the latest such run's measured value (the calibration file,
                         one per user and machine)
    optimizer_s_per_param  gradient clipping + fused AdamW + zero_grad over a 2M-parameter tensor, timed now
    step_floor_s         the fixed cost of one step (Python, dispatch, the scheduler, the loss's .item()),
                         timed now on a tiny model, + padding one real batch (batching.collate): most of a
                         linear probe's step
Everything measured here takes ~0.5 s on 2 cores. The prediction is for train.epochs (the maximum); the
record also gives it for the steps that ran (early stopping), which is what the measured time is compared to.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from depthtune import methods
from depthtune.data.batching import Examples, collate, length_grouped_batches
from depthtune.errors import DepthtuneError
from depthtune.files import write_json_atomic
from depthtune.records import AuditRecord

# The training loop's own per-step work beyond the micro-benchmarked floor (training.run_epoch: the
# progress line, the loss curve, the schedule, the evaluation check; HF head modules' dispatch): measured
# here as a linear probe's step (1.76 ms) less its floor, its collate and its head's arithmetic: ~1 ms
LOOP_BOOKKEEPING_S = 1.0e-3
CALIBRATION_VERSION = 1


@dataclass
class Throughput:
    """This device, now: what the prediction divides by."""
    gemm_flops_per_s: float
    optimizer_s_per_param: float
    step_floor_s: float
    efficiency: float = 0.45
    efficiency_source: str = "assumed"  # or "measured here: <variant> <when>"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 1) -> float:
    """Seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / reps


def gemm_rate(device: str, tokens: int, hidden: int, dtype: torch.dtype) -> float:
    """FLOP/s of a (tokens x H) @ (H x 4H) product: the feed-forward's shape, 2*T*H*4H FLOPs a call.
    On the CPU at most 2,048 x 1,024 (17 GFLOP a call, ~0.05 s on 2 cores): an 8B model's 4,096-wide
    product runs at the same rate and would take seconds."""
    if not device.startswith("cuda"):
        tokens, hidden = min(tokens, 2048), min(hidden, 1024)
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, 4 * hidden, device=device, dtype=dtype)
    reps = max(3, int(2e10 // (8 * tokens * hidden * hidden)))  # ~20 GFLOP: ~0.1 s on 2 CPU cores
    return 8 * tokens * hidden * hidden / timed(lambda: torch.matmul(a, b), device, min(reps, 50))


def optimizer_rate(device: str, n: int = 2_000_000) -> float:
    """Seconds per parameter of one optimizer_step's work: clip (a norm) + fused AdamW + zero_grad."""
    p = torch.nn.Parameter(torch.zeros(n, device=device))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)

    def step():
        p.grad = torch.ones_like(p)
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, device, 5) / n


def step_floor(device: str) -> float:
    """Seconds of a step that does almost no arithmetic: a 2-layer head on 16 x 32, loss, backward, optimizer."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x, y = torch.randn(16, 32, device=device), torch.zeros(16, dtype=torch.long, device=device)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return timed(step, device, 50, warmup=5)


def measure(device: str, *, tokens: int, hidden: int, precision: str = "fp32") -> Throughput:
    """Calibrate on this device now (~0.5 s on 2 CPU cores)."""
    dtype = torch.bfloat16 if precision in ("bf16", "bf16-autocast") and device.startswith("cuda") else torch.float32
    with torch.no_grad():
        g = gemm_rate(device, max(tokens, 16), hidden, dtype)
    return Throughput(gemm_flops_per_s=g, optimizer_s_per_param=optimizer_rate(device),
                      step_floor_s=step_floor(device))


def batch_flops(step_flops: dict, batch: int, seq_len: int) -> float:
    """One optimizer step's FLOPs at B x S: B*S tokens, each dense + per_position*S (attention), and
    per_sequence for each text (an encoder's pooler and head read only its first token)."""
    return batch * (seq_len * (step_flops["dense"] + step_flops["per_position"] * seq_len)
                    + step_flops.get("per_sequence", 0))


def predict(step_flops: dict, trainable: int, shapes: list[tuple[int, int]], epochs: int,
            tp: Throughput) -> dict:
    """Seconds for `epochs` epochs of these (batch, seq_len) shapes (one epoch's batches), and per step."""
    matmul_s = sum(batch_flops(step_flops, b, s) for b, s in shapes) / (tp.gemm_flops_per_s * tp.efficiency)
    other_s = len(shapes) * (trainable * tp.optimizer_s_per_param + tp.step_floor_s)
    epoch_s = matmul_s + other_s
    return {"epoch_s": epoch_s, "train_s": epoch_s * epochs, "step_s": epoch_s / max(len(shapes), 1),
            "matmul_share": matmul_s / epoch_s if epoch_s else 0.0,
            "flops_per_epoch": sum(batch_flops(step_flops, b, s) for b, s in shapes),
            "throughput": asdict(tp)}


def measured_efficiency(per_step_flops: float, steps: int, train_time_s: float, trainable: int,
                        tp: Throughput) -> Optional[float]:
    """The efficiency that would have predicted `train_time_s` exactly (the matmul part solved for)."""
    matmul_time = train_time_s - steps * (trainable * tp.optimizer_s_per_param + tp.step_floor_s)
    if matmul_time <= 0 or not steps:
        return None
    return steps * per_step_flops / (matmul_time * tp.gemm_flops_per_s)


# ----------------------------------------------------------------------------- this machine's calibration


def calibration_file() -> Path:
    """One per user and machine, outside any project: $DEPTHTUNE_CALIBRATION or ~/.cache/depthtune/step_time.json."""
    if os.environ.get("DEPTHTUNE_CALIBRATION"):
        return Path(os.environ["DEPTHTUNE_CALIBRATION"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "depthtune" / "step_time.json"


def machine_key(device: str, precision: str) -> str:
    """What a measured efficiency belongs to: the processor, the threads torch uses, the device, the precision."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}|{os.cpu_count()} cpus|{torch.get_num_threads()} threads|{device} {gpu}|{precision}".strip()


def efficiency_key(device: str, precision: str, kind: str, family: str) -> str:
    return f"{machine_key(device, precision)}|{family}|{kind}"


def read_calibration() -> dict:
    try:
        data = json.loads(calibration_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("efficiency", {}) if data.get("version") == CALIBRATION_VERSION else {}


def known_calibration(key: str) -> Optional[dict]:
    """{efficiency | step_floor_s, variant, when} measured on this machine for this kind, or None."""
    entry = read_calibration().get(key)
    ok = isinstance(entry, dict) and any(isinstance(entry.get(k), (int, float)) for k in ("efficiency", "step_floor_s"))
    if ok and isinstance(entry.get("efficiency"), (int, float)) and not 0 < entry["efficiency"] <= 1:
        return None  # kept by an older version: a GEMM timed while other work held the cores
    return entry if ok else None


def remember(key: str, measured: dict, variant: str) -> None:
    """Keep this run's measured efficiency (or step floor) for the next prediction of the same kind here
    (best effort: an unwritable cache only costs the next prediction its calibration)."""
    data = {"version": CALIBRATION_VERSION, "efficiency": read_calibration()}
    data["efficiency"][key] = {**{k: round(v, 6) for k, v in measured.items()}, "variant": variant,
                               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        write_json_atomic(calibration_file(), data)
    except (OSError, DepthtuneError):
        pass


# ----------------------------------------------------------------------------- one variant, before and after


def batch_assembly(examples: Examples, index: list[int]) -> float:
    """Seconds to pad one real batch (batching.collate; the prefix cache's batch() does the same per-row
    copies): Python work per step that no FLOP count sees, ~1 ms for 16 rows."""
    return timed(lambda: collate(examples, index, 0), "cpu", 20, warmup=2)


def before_training(audit: AuditRecord, examples: Examples, *, batch_size: int, seed: int, epochs: int,
                    device: str, precision: str, kind: str) -> dict:
    """The prediction for train.epochs, with what it rests on (measured now, ~0.5 s)."""
    batches = length_grouped_batches(examples.lengths, batch_size, seed, 0)
    shapes = [(len(b), max(examples.lengths[i] for i in b)) for b in batches]
    median = sorted(range(len(shapes)), key=lambda j: shapes[j][0] * shapes[j][1])[len(shapes) // 2] if shapes else 0
    typical = shapes[median][0] * shapes[median][1] if shapes else batch_size
    tp = measure(device, tokens=typical, hidden=int(audit.architecture["hidden_size"]), precision=precision)
    if batches:
        tp.step_floor_s += batch_assembly(examples, batches[median]) + LOOP_BOOKKEEPING_S
    key = efficiency_key(device, precision, kind, str(audit.architecture.get("model_type")))
    known = known_calibration(key)
    tp.efficiency = methods.get(kind).efficiency
    if known:  # a matmul-bound kind keeps its efficiency, a step-bound one (a probe) its step floor
        if "efficiency" in known:
            tp.efficiency = float(known["efficiency"])
        else:
            tp.step_floor_s = float(known["step_floor_s"])
        tp.efficiency_source = f"measured here: {known['variant']} {known['when']}"
    step_flops = audit.estimates["flops_per_token"]["step"]
    return {**predict(step_flops, audit.trainable_params, shapes, epochs, tp), "epochs": epochs,
            "steps_per_epoch": len(shapes), "calibration_key": key}


def after_training(prediction: dict, *, steps: int, train_time_s: float, trainable: int, variant: str) -> dict:
    """Predicted seconds for the steps that ran, measured / predicted, and the efficiency this run reached
    (kept for the next prediction of this kind here)."""
    tp = Throughput(**prediction["throughput"])
    for_steps = prediction["step_s"] * steps
    per_step_flops = prediction["flops_per_epoch"] / max(prediction["steps_per_epoch"], 1)
    eff = measured_efficiency(per_step_flops, steps, train_time_s, trainable, tp)
    if steps >= 20 and prediction["matmul_share"] >= 0.5 and eff is not None:
        # above 1 the GEMM timed before training ran slower than the training itself: other work held the
        # cores then (seen: 1.37 after a contended GEMM, then the next variants predicted 3.3x too fast)
        if 0 < eff <= 1:
            remember(prediction["calibration_key"], {"efficiency": eff}, variant)
    elif steps >= 20:  # step-bound (a probe): what a step costs beyond its matmuls and optimizer
        matmul_s = steps * per_step_flops / (tp.gemm_flops_per_s * tp.efficiency)
        floor = (train_time_s - matmul_s) / steps - trainable * tp.optimizer_s_per_param
        if floor > 0:
            remember(prediction["calibration_key"], {"step_floor_s": floor}, variant)
    return {"predicted_s_for_steps_run": round(for_steps, 3),
            "time_ratio": round(train_time_s / for_steps, 4) if for_steps else None,
            "efficiency_measured": round(eff, 4) if eff is not None else None,
            # model FLOPs utilisation: the counted FLOPs per second over the GEMM rate measured before
            "mfu": round(per_step_flops * steps / (train_time_s * tp.gemm_flops_per_s), 4) if train_time_s else None}
