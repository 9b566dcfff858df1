"""The harness's core pieces: data, the three training recipes, measurements.

Every measurement job runs in its own child process (`run_isolated`), forked
from a forkserver that has imported torch/transformers/peft and never computed:
a job pays no import time, its RSS growth is its own (no heap left over from an
earlier job), and no OpenMP pool exists at fork time (a forked libgomp pool
deadlocks).

Recipes (same variant, same data, same optimizer steps, same hyperparameters):
  seeds      plain transformers.Trainer, every text padded to max_length 128 up
             front, the full model (no freezing), no length grouping
  plain      the best plain Trainer: dynamic padding (DataCollatorWithPadding),
             train_sampling_strategy="group_by_length", the variant's frozen
             parameters (built by depthtune.model.variants.build_variant)
  depthtune  depthtune.training.loop.train (frozen-prefix caching for train_top variants)
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MAX_LENGTH = 128
EVAL_BATCH = 64
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
RECIPES = ("seeds", "plain", "depthtune")

# The four benchmarked variants; learning rates per variant (the same for every recipe).
VARIANTS = {
    "full": {"spec": {}, "lr": 1e-4},
    "top2": {"spec": {"train_top": 2}, "lr": 3e-4},
    "probe": {"spec": {"train_top": 0}, "lr": 2e-3},
    "lora8": {"spec": {"lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]}}, "lr": 1e-3},
}

# An 8B Llama-style config (Llama-3-8B shapes) for the audit's cost on a big model.
LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False}


# ----------------------------------------------------------------------------- data


def read_sst2(path: Path, n: int, seed: int) -> tuple[list, list]:
    """A seeded random sample of n rows of a GLUE SST-2 TSV (quoting off: split on the last tab)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        header = next(fh)
        if not header.startswith("sentence"):
            raise ValueError(f"{path}: expected a `sentence<TAB>label` header")
        for line in fh:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            rows.append((text, int(label)))
    rng = random.Random(seed)
    rows = rng.sample(rows, min(n, len(rows)))
    return [r[0] for r in rows], [r[1] for r in rows]


def read_rotten_tomatoes(n_train: int, n_val: int, seed: int) -> tuple[tuple, tuple, str]:
    """A seeded slice of the default data (builtin Rotten Tomatoes, rotten=0 / fresh=1).

    Reads the verified builtin cache; falls back to data/prepared/{train,validation}.jsonl.
    """
    try:
        from depthtune.data import builtin_data

        loaded = builtin_data.load_rows()
        rows = [(t, builtin_data.LABELS.index(lab)) for _, t, lab in loaded.rows]
        rng = random.Random(seed)
        rng.shuffle(rows)
        tr, va = rows[:n_train], rows[n_train:n_train + n_val]
        origin = "builtin:rotten_tomatoes"
    except Exception as exc:  # no cache and offline: the prepared split, if the pipeline ran
        prepared = ROOT / "data" / "prepared"
        if not (prepared / "train.jsonl").exists():
            raise RuntimeError(f"Rotten Tomatoes data unavailable ({exc}) and {prepared}/train.jsonl missing") from None

        def load(name, n):
            out = []
            with open(prepared / f"{name}.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    d = json.loads(line)
                    out.append((d["text"], int(d["label"])))
                    if len(out) >= n:
                        break
            return out
        tr, va = load("train", n_train), load("validation", n_val)
        origin = "data/prepared"
    return ([t for t, _ in tr], [y for _, y in tr]), ([t for t, _ in va], [y for _, y in va]), origin


@dataclass
class Split:
    """Texts, labels and their tokenization: truncated unpadded (Examples) and padded to MAX_LENGTH."""
    texts: list
    labels: list
    ex: object = None  # depthtune.training.loop.Examples
    padded: Optional[dict] = None  # input_ids / token_type_ids / attention_mask padded to MAX_LENGTH

    @property
    def lengths(self) -> list:
        return self.ex.lengths


def tokenize_split(tokenizer, texts: list, labels: list, max_length: int = MAX_LENGTH) -> Split:
    from depthtune.data.batching import Examples

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    ex = Examples(input_ids=enc["input_ids"], labels=list(labels), token_type_ids=enc.get("token_type_ids"))
    pad = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    padded = {k: pad[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in pad}
    return Split(texts=texts, labels=list(labels), ex=ex, padded=padded)


def subset(split: Split, n: int) -> Split:
    from depthtune.data.batching import Examples

    ex = split.ex
    sub = Examples(input_ids=ex.input_ids[:n], labels=ex.labels[:n],
                   token_type_ids=ex.token_type_ids[:n] if ex.token_type_ids is not None else None)
    padded = {k: v[:n] for k, v in split.padded.items()} if split.padded else None
    return Split(texts=split.texts[:n], labels=split.labels[:n], ex=sub, padded=padded)


def length_stats(lengths: list) -> dict:
    s = sorted(lengths)
    return {"n": len(s), "mean": sum(s) / len(s), "p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
            "max": s[-1], "total": sum(s)}


# ----------------------------------------------------------------------------- small measurements


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def malloc_trim() -> None:
    """Give freed heap pages back to the OS so RSS growth measures this job only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssSampler:
    """RSS sampled every `interval` s in a thread, with timestamps: the peak up to any moment.

    Lets a job separate its training peak (build + optimizer steps) from the peak including the
    evaluations that train() runs inside the same call.
    """

    def __init__(self, interval: float = 0.01):
        import threading

        import psutil

        self.interval, self._proc = interval, psutil.Process()
        self._stop = threading.Event()
        self.samples = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.samples.append((time.perf_counter(), self._proc.memory_info().rss))
            if self._stop.wait(self.interval):
                break

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self._proc.memory_info().rss))
        return False

    def peak_until(self, t: float) -> int:
        return max((r for ts, r in self.samples if ts <= t), default=0)


def summarize(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals), "values": vals}


def gemm_peak(threads: int, device: str = "cpu", n: Optional[int] = None, reps: int = 12) -> dict:
    """The machine's own matmul peak: torch.matmul of n x n matrices (fp32 on the CPU, bf16 on a GPU)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    flops = 2 * n ** 3
    times = []
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t)
    rates = sorted(flops / t for t in times)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "threads": threads, "reps": reps,
            "peak_flops": rates[-1], "median_flops": statistics.median(rates), "min_flops": rates[0]}


def tokenization_throughput(tokenizer, texts: list, repeats: int = 3, max_length: int = MAX_LENGTH) -> dict:
    """Examples/s of the fast tokenizer over a list of texts (one batched call, truncation on)."""
    rates, toks = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        rates.append(len(texts) / (time.perf_counter() - t))
        toks = sum(len(x) for x in enc["input_ids"])
    return {"examples": len(texts), "tokens": toks, "examples_per_s": summarize(rates),
            "tokenizer": type(tokenizer).__name__, "is_fast": bool(getattr(tokenizer, "is_fast", False)),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}


def audit_subprocess(config: dict, workdir: Path, timeout: float = 600, import_baseline: bool = True) -> dict:
    """`depthtune audit --config <json> --labels 0 --json` in a subprocess: wall time, peak RSS, counts.

    Also times a child that only imports what the audit imports, to separate the audit's own cost.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    exe = Path(sys.executable).parent / "depthtune"
    audit_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "depthtune.cli"]
    audit_cmd += ["audit", "--config", str(path), "--labels", "0", "--json"]
    import_cmd = [sys.executable, "-c", "import depthtune.runtime, depthtune.cli, depthtune.planning.audit, depthtune.model.variants, "
                  "transformers; from transformers import AutoModel, AutoConfig"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def timed(cmd):
        use_time = Path("/usr/bin/time").exists()
        full = (["/usr/bin/time", "-f", "BENCH_TIME %M %e"] + cmd) if use_time else cmd
        t = time.perf_counter()
        if use_time:
            proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
            wall = time.perf_counter() - t
            m = re.search(r"BENCH_TIME (\d+) ([0-9.]+)", proc.stderr)
            peak = int(m.group(1)) * 1024 if m else None
            how = "/usr/bin/time -f %M"
        else:  # psutil polling
            import psutil

            p = psutil.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
            peak = 0
            while p.poll() is None:
                try:
                    peak = max(peak, p.memory_info().rss)
                except psutil.Error:
                    pass
                time.sleep(0.02)
            out, err = p.communicate()
            proc = subprocess.CompletedProcess(full, p.returncode, out, err)
            wall = time.perf_counter() - t
            how = "psutil polling"
        return proc, wall, peak, how

    proc, wall, peak, how = timed(audit_cmd)
    result = {"config": config, "command": " ".join(["depthtune"] + audit_cmd[audit_cmd.index("audit"):]),
              "returncode": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak, "rss_measured_with": how}
    if proc.returncode != 0:
        result["error"] = proc.stderr[-2000:]
        return result
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(total_params=rec["total_params"], trainable_params=rec["trainable_params"],
                  closed_form_matches=(rec.get("closed_form") or {}).get("matches"),
                  estimated_train_memory_bytes=rec["estimates"]["memory_bytes"]["total"])
    if not import_baseline:
        return result
    iproc, iwall, ipeak, _ = timed(import_cmd)
    result["import_only"] = {"returncode": iproc.returncode, "wall_s": iwall, "peak_rss_bytes": ipeak}
    if iproc.returncode == 0 and peak and ipeak:
        result["audit_only_s"] = wall - iwall
        result["audit_only_rss_bytes"] = peak - ipeak
    return result


# ----------------------------------------------------------------------------- isolation


PRELOAD = ["depthtune.runtime", "bench.harness", "torch", "transformers", "transformers.trainer", "datasets",
           "peft", "psutil", "transformers.models.bert.modeling_bert", "transformers.masking_utils",
           "depthtune.training.loop", "depthtune.model.variants", "depthtune.planning.audit", "depthtune.training.memory",
           "depthtune.evaluation.metric_modules"]


def _child(fn, args, conn):
    try:
        res = {"ok": True, "value": fn(*args)}
    except BaseException as exc:  # noqa: BLE001  (a failed job is reported, never fatal)
        res = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()}
    try:
        conn.send(res)
    except Exception as exc:  # unpicklable value
        conn.send({"ok": False, "error": f"result not transferable: {exc}"})
    conn.close()


_CTX = None
# libgomp reads OMP_WAIT_POLICY once, when torch loads: the forkserver (and so every job) gets this value.
# Default PASSIVE: on shared cores the default spin-waiting at every parallel region's barrier made
# 2-thread steps 3-10x slower (see README); every recipe runs under the same setting.
OMP_WAIT_POLICY = "PASSIVE"


def isolation_context():
    """A forkserver whose server only imports (torch, transformers, peft, ...) and never computes.

    Forking a process that already ran an OpenMP parallel region deadlocks the child's first
    parallel region (libgomp), so jobs are never forked from the orchestrator itself (or from a
    pytest process that trained a model): the clean server forks them, and they start with
    every import done.
    """
    global _CTX
    if _CTX is None:
        if OMP_WAIT_POLICY:
            os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
        else:
            os.environ.pop("OMP_WAIT_POLICY", None)
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_isolated(fn: Callable, *args, timeout: Optional[float] = None, isolate: bool = True) -> dict:
    """fn(*args) in a fresh child; {"ok": True, "value": ...} or {"ok": False, "error": ...}.

    fn and args must be picklable (module-level function, plain data).
    """
    if not isolate:
        recv, send = mp.Pipe(duplex=False)
        _child(fn, args, send)
        return recv.recv()
    ctx = isolation_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, send), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            res = recv.recv()
        else:
            res = {"ok": False, "error": f"timed out after {timeout} s"}
    except EOFError:
        res = {"ok": False, "error": "child died without a result"}
    proc.join(30 if res.get("ok") else 1)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    if res.get("ok") is not True and proc.exitcode not in (0, None):
        res.setdefault("exitcode", proc.exitcode)
    return res


def warm_imports(model_cfg) -> None:
    """Import everything a job imports (model classes, peft, Trainer); no torch compute (meta device)."""
    from depthtune.config import parse_variant
    from depthtune.model.variants import build_variant
    import transformers  # noqa: F401
    from transformers import Trainer, TrainingArguments, DataCollatorWithPadding  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from depthtune.evaluation import metric_modules  # noqa: F401
    from transformers.masking_utils import create_bidirectional_mask  # noqa: F401

    build_variant(model_cfg, parse_variant("w", VARIANTS["lora8"]["spec"], "w"), 2, device="meta")
    build_variant(model_cfg, parse_variant("w", {}, "w"), 2, device="meta")


# ----------------------------------------------------------------------------- one job


def job_spec(*, recipe: str, variant: str, data: str, epochs: int, n_train: int, n_val: int, batch_size: int,
             lr: float, eval_every: int, target: Optional[float], threads: int, seed: int, device: str = "cpu",
             model: Optional[dict] = None, spec: Optional[dict] = None, kind: str = "speed", repeat: int = 0,
             stop_at_target: bool = False) -> dict:
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {RECIPES}")
    return {"kind": kind, "recipe": recipe, "variant": variant,
            "spec": spec if spec is not None else VARIANTS[variant]["spec"],
            "data": data, "epochs": epochs, "n_train": n_train, "n_val": n_val, "batch_size": batch_size, "lr": lr,
            "eval_every": eval_every, "target": target, "threads": threads, "seed": seed, "device": device,
            "model": model or {}, "repeat": repeat, "stop_at_target": stop_at_target}


def _model_cfg(raw: dict):
    from depthtune.config import ModelConfig, parse_section

    return parse_section(ModelConfig, raw, "model")


def _spec(job: dict):
    from depthtune.config import parse_variant

    # the seeds' recipe always trains the full model
    return parse_variant(job["variant"], {} if job["recipe"] == "seeds" else job["spec"], f"variants.{job['variant']}")


def account(events: list, t0: float, t1: float, target: Optional[float]) -> dict:
    """Split a run's clock into training and evaluation time from ("step", t, step) / ("eval", t, acc) events.

    An evaluation lasts from the step that precedes it to its result. time_to_target_s is training
    time (evaluations excluded) until the end of the step after which validation first reached the
    target; wall_to_target_s the same with evaluations included.
    """
    eval_total, last_t, last_step = 0.0, t0, 0
    curve, reach = [], None
    first = None  # (time, step, eval time so far) at the end of the first optimizer step
    for kind, t, val in events:
        if kind == "step":
            last_t, last_step = t, val
            if first is None:
                first = (t, val, eval_total)
            continue
        dur = t - last_t
        point = {"step": last_step, "accuracy": val, "train_s": last_t - t0 - eval_total, "wall_s": t - t0,
                 "eval_s": dur}
        eval_total += dur
        last_t = t  # the next step's time excludes this evaluation
        curve.append(point)
        if reach is None and target is not None and val is not None and val >= target:
            reach = point
    steps = [(t, v) for k, t, v in events if k == "step"]
    steady = None
    if first is not None and len(steps) >= 3:
        t_last, s_last = steps[-1]
        evals_between = sum(p["eval_s"] for p in curve if first[1] <= p["step"] < s_last)
        steady = {"steps": s_last - first[1], "seconds": t_last - first[0] - evals_between}
    return {"call_s": t1 - t0, "eval_s": eval_total, "train_s": t1 - t0 - eval_total, "val_curve": curve,
            "steady": steady, "first_step_s": (first[0] - t0 - first[2]) if first else None,
            "reached": reach is not None,
            "time_to_target_s": reach["train_s"] if reach else None,
            "wall_to_target_s": reach["wall_s"] if reach else None,
            "step_to_target": reach["step"] if reach else None,
            "best_accuracy": max((p["accuracy"] for p in curve), default=None),
            "final_accuracy": curve[-1]["accuracy"] if curve else None}


def _run_depthtune(job, built, spec, train, val, pad_id):
    import torch  # noqa: F401
    import importlib

    from depthtune.config import FIXED_BUDGET, TrainConfig

    # loop_module: another copy of the loop (e.g. the previous version) for before/after figures
    dt_train = importlib.import_module(job.get("loop_module") or "depthtune.training.loop").train

    events = []

    def on_step(step, epoch):
        events.append(("step", time.perf_counter(), step))

    def log(msg):
        m = re.search(r"val accuracy ([0-9.]+)", msg)
        if m:
            events.append(("eval", time.perf_counter(), float(m.group(1))))

    cfg = TrainConfig(convergence=FIXED_BUDGET, device=job["device"], seed=job["seed"], epochs=job["epochs"], batch_size=job["batch_size"],
                      lr=job["lr"], weight_decay=WEIGHT_DECAY, warmup_fraction=WARMUP_FRACTION,
                      max_grad_norm=MAX_GRAD_NORM, eval_every=job["eval_every"], patience=0, checkpoint_every=0,
                      cache_frozen_prefix=True, num_threads=job["threads"])
    t0 = time.perf_counter()
    out = dt_train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train.ex, val_ex=val.ex,
                   cfg=cfg, metric="accuracy", device=job["device"], pad_id=pad_id, num_labels=2,
                   on_step=on_step, log=log, eval_batch_size=EVAL_BATCH)
    t1 = time.perf_counter()
    extra = {"steps": out.steps, "samples": out.samples, "real_tokens_counted": out.real_tokens,
             "cached_prefix_layers": out.cached_prefix_layers, "cache_bytes": out.cache_bytes,
             "loop_train_time_s": out.train_time_s}
    return t0, t1, events, extra


def _run_trainer(job, built, train, val, tokenizer, recipe):
    import datasets
    from transformers import (DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    events = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            events.append(("step", time.perf_counter(), state.global_step))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            acc = (metrics or {}).get("eval_accuracy")
            events.append(("eval", time.perf_counter(), acc))
            if job.get("stop_at_target") and acc is not None and job["target"] is not None and acc >= job["target"]:
                control.should_training_stop = True

    def as_dataset(split: Split, padded: bool):
        if padded:
            cols = dict(split.padded)
        else:
            cols = {"input_ids": split.ex.input_ids, "attention_mask": [[1] * len(x) for x in split.ex.input_ids]}
            if split.ex.token_type_ids is not None:
                cols["token_type_ids"] = split.ex.token_type_ids
        cols["labels"] = list(split.labels)
        return datasets.Dataset.from_dict(cols)

    def accuracy(p):
        import numpy as np

        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == np.asarray(p.label_ids)).mean())}

    seeds = recipe == "seeds"
    tr_ds, va_ds = as_dataset(train, seeds), as_dataset(val, seeds)
    steps = math.ceil(len(train.labels) / job["batch_size"]) * job["epochs"]
    out_dir = tempfile.mkdtemp(prefix="bench-trainer-")
    try:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=job["batch_size"], per_device_eval_batch_size=EVAL_BATCH,
            learning_rate=job["lr"], weight_decay=WEIGHT_DECAY, warmup_steps=int(WARMUP_FRACTION * steps),
            max_grad_norm=MAX_GRAD_NORM, num_train_epochs=job["epochs"], lr_scheduler_type="linear",
            eval_strategy="steps" if job["eval_every"] else "no", eval_steps=job["eval_every"] or None,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=job["seed"],
            use_cpu=job["device"] == "cpu", bf16=job["device"] == "cuda" and not seeds, dataloader_num_workers=0,
            train_sampling_strategy="random" if seeds else "group_by_length")
        trainer = Trainer(model=built.model, args=args, train_dataset=tr_ds,
                          eval_dataset=va_ds if job["eval_every"] else None,
                          data_collator=default_data_collator if seeds else DataCollatorWithPadding(tokenizer),
                          processing_class=None if seeds else tokenizer, compute_metrics=accuracy, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the progress bar for printed logs
        t0 = time.perf_counter()
        res = trainer.train()
        t1 = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    n = len(train.labels)
    extra = {"steps": res.global_step, "samples": res.global_step * job["batch_size"] if job.get("stop_at_target")
             else n * job["epochs"], "optimizer": str(args.optim), "stopped_at_target": bool(job.get("stop_at_target")),
             "trainer_train_runtime_s": res.metrics.get("train_runtime")}
    return t0, t1, events, extra


def run_job(job: dict, splits: dict, tokenizer) -> dict:
    """Build the variant and train it with the job's recipe; speed, accuracy-vs-time and memory.

    Meant to run in a fresh child (`run_isolated`): memory is RSS growth over the
    child's baseline around build + train (CUDA: max allocated).
    """
    import torch

    from depthtune.planning.audit import audit_built
    from depthtune.training.memory import PeakMemory
    from depthtune.model.variants import build_variant

    torch.set_num_threads(job["threads"])
    train, val = subset(splits[job["data"]]["train"], job["n_train"]), subset(splits[job["data"]]["val"], job["n_val"])
    spec = _spec(job)
    model_cfg = _model_cfg(job["model"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    warm_imports(model_cfg)  # lazy imports (model class, peft tuners) before the memory baseline
    malloc_trim()
    base_rss = rss_bytes()
    with PeakMemory(job["device"]) as mem, RssSampler() as sampler:
        t_build = time.perf_counter()
        built = build_variant(model_cfg, spec, 2, device=job["device"], seed=job["seed"])
        build_s = time.perf_counter() - t_build
        rss_after_build = rss_bytes() - base_rss
        with PeakMemory(job["device"]) as mem_train:
            if job["recipe"] == "depthtune":
                t0, t1, events, extra = _run_depthtune(job, built, spec, train, val, pad_id)
            else:
                t0, t1, events, extra = _run_trainer(job, built, train, val, tokenizer, job["recipe"])
    acc = account(events, t0, t1, job["target"])
    # training peak: from the baseline to the end of the last optimizer step before the first
    # evaluation's result (speed runs: every step; train()'s end-of-epoch evaluation excluded)
    first_eval = next((t for k, t, _ in events if k == "eval"), None)
    last_step_t = max((t for k, t, _ in events if k == "step" and (first_eval is None or t <= first_eval)),
                      default=t1)
    train_peak = sampler.peak_until(last_step_t) - base_rss if job["device"] != "cuda" else None
    real_tokens = job["epochs"] * sum(train.lengths)
    if job.get("stop_at_target") and extra["steps"] < math.ceil(len(train.labels) / job["batch_size"]) * job["epochs"]:
        real_tokens = round(extra["samples"] * sum(train.lengths) / len(train.lengths))  # stopped early: pro rata
    if "real_tokens_counted" in extra and extra["real_tokens_counted"] != real_tokens:
        raise AssertionError(f"depthtune counted {extra['real_tokens_counted']} real tokens, expected {real_tokens}")
    samples = extra["samples"]
    stats = length_stats(train.lengths)
    peak_len = MAX_LENGTH if job["recipe"] == "seeds" else stats["max"]
    typical_len = MAX_LENGTH if job["recipe"] == "seeds" else stats["p95"]
    flops_len = max(1, round(stats["mean"]))

    # depthtune keeps the frozen prefix's outputs for every train + validation token (train_top variants)
    cache_tokens = (sum(train.lengths) + sum(val.lengths)) if extra.get("cached_prefix_layers") else 0

    def est(seq_len):
        return audit_built(built, variant_name=job["variant"], spec=spec, num_labels=2,
                           batch_size=job["batch_size"], seq_len=seq_len, check=False,
                           cache_tokens=cache_tokens).estimates

    e_peak, e_typ, e_flops = est(peak_len), est(typical_len), est(flops_len)
    peak = mem.peak_growth
    result = dict(job)
    result.update(acc)
    result.update(extra)
    result.update({
        "ok": True, "pid": os.getpid(), "build_s": build_s,
        "total_params": built.total_params, "trainable_params": built.trainable_params,
        "real_tokens": real_tokens, "mean_real_length": stats["mean"],
        "samples_per_s": samples / acc["train_s"], "tokens_per_s": real_tokens / acc["train_s"],
        # steps 2..N only (no per-call setup, no first step): the long-run rate; batches are full-size
        "steady_samples_per_s": (acc["steady"]["steps"] * job["batch_size"] / acc["steady"]["seconds"]
                                 if acc["steady"] else None),
        "steady_tokens_per_s": (acc["steady"]["steps"] * job["batch_size"] * stats["mean"] / acc["steady"]["seconds"]
                                if acc["steady"] else None),
        "peak_memory_bytes": peak, "peak_memory_kind": mem.kind, "rss_after_build_bytes": rss_after_build,
        # allocated bytes (depthtune.training.memory: RSS less glibc's free heap; CUDA max allocated) over build +
        # train, against what this loop can hold: the estimate's build or step peak, the best-weights copy
        # only from the first validation on (after the measured steps)
        "training_peak_bytes": peak,
        "training_peak_reserved_bytes": train_peak if train_peak is not None else mem.peak_reserved,
        "training_estimate_bytes": loop_estimate(e_peak["memory_bytes"]),
        "training_memory_ratio": peak / loop_estimate(e_peak["memory_bytes"]),
        "train_phase_peak_growth_bytes": mem_train.peak_growth,
        "estimate_seq_len": peak_len, "estimated_memory": e_peak["memory_bytes"],
        "memory_ratio": peak / e_peak["memory_bytes"]["total"],
        "estimate_typical_seq_len": typical_len, "estimated_memory_typical": e_typ["memory_bytes"]["total"],
        "memory_ratio_typical": peak / e_typ["memory_bytes"]["total"],
        "flops_seq_len": flops_len, "flops_per_token": e_flops["flops_per_token"],
    })
    return result


def loop_estimate(m: dict) -> int:
    """The audit's estimate for a benchmark job's measured window: build and optimizer steps, no validation
    yet (so no best-weights copy), no evaluation pass."""
    return max(m["training_peak"] - m["best_weights"], m["build_peak"])


# ----------------------------------------------------------------------------- memory breakdown


def memory_breakdown(model_raw: dict, variant: str, spec_raw: dict, batch_size: int, seq_len: int, threads: int,
                     seed: int = 0, vocab_low: int = 1000) -> dict:
    """Measured components of training memory for one step at batch x seq_len, next to the audit's terms.

    weights: parameter + buffer bytes; gradients: .grad bytes after backward; adamw_states: optimizer
    state bytes after one step; activations: bytes of the distinct tensors autograd saved for backward
    (parameters excluded), counted with saved_tensors_hooks. RSS growth is recorded too.
    """
    import torch
    from torch import nn

    from depthtune.planning.audit import audit_built
    from depthtune.config import parse_variant
    from depthtune.training.optimizer import param_groups
    from depthtune.model.variants import build_variant

    torch.set_num_threads(threads)
    malloc_trim()
    base = rss_bytes()
    spec = parse_variant(variant, spec_raw, variant)
    built = build_variant(_model_cfg(model_raw), spec, 2, device="cpu", seed=seed)
    model = built.model
    rss_build = rss_bytes() - base
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_low, vocab_low + 20000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    saved: dict = {}
    model.train()
    n_layers = built.num_layers
    frozen = spec.method.cached_prefix_layers(spec.options, n_layers)
    if frozen:  # as the loop runs it: the frozen prefix in eval mode
        from depthtune.training.prefix_cache import set_train_mode
        set_train_mode(model, frozen)

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**batch).logits
        loss = nn.functional.cross_entropy(logits.float(), labels)
    rss_fwd = rss_bytes() - base
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=1e-4, fused=True)
    opt.step()
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1)
    rss_step = rss_bytes() - base
    est = audit_built(built, variant_name=variant, spec=spec, num_labels=2, batch_size=batch_size, seq_len=seq_len,
                      check=False).estimates["memory_bytes"]
    measured = {"weights": weights, "gradients": grads, "adamw_states": states, "activations": sum(saved.values())}
    measured["total"] = sum(measured.values())
    return {"variant": variant, "batch_size": batch_size, "seq_len": seq_len,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "measured": measured, "estimated": est,
            "ratio": {k: (measured[k] / est[k] if est[k] else None) for k in measured},
            "activations_per_token_layer_floats": (sum(saved.values()) / 4 / (batch_size * seq_len * n_layers)
                                                   if not frozen else None),
            "rss_growth": {"after_build": rss_build, "after_forward": rss_fwd, "after_step": rss_step}}


# ----------------------------------------------------------------------------- machine


def machine_info(threads: int, device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": device, "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------- where the time goes


def step_profile(model_raw: dict, variant: str, spec_raw: dict, split: Split, batch_size: int, steps: int,
                 threads: int, lr: float = 1e-4, seed: int = 0, top_ops: int = 15) -> dict:
    """Time the phases of depthtune's training step (the body of `train()`'s loop, no frozen-prefix
    cache) for `steps` steps, then the same steps again under torch.profiler for the top operators.

    Phases: collate (+ .to(device)), forward, loss, backward, clip (clip_grad_norm_), optimizer
    (AdamW as train() builds it), zero_grad. The first step (warm-up) is left out.
    """
    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    from depthtune.config import parse_variant
    from depthtune.data.batching import collate, length_grouped_batches
    from depthtune.training.optimizer import param_groups
    from depthtune.model.variants import build_variant

    torch.set_num_threads(threads)
    spec = parse_variant(variant, spec_raw, variant)
    built = build_variant(_model_cfg(model_raw), spec, 2, device="cpu", seed=seed)
    model = built.model
    model.train()
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=lr, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = length_grouped_batches(split.lengths, batch_size, seed, 0)
    phases = ("collate", "forward", "loss", "backward", "clip", "optimizer", "zero_grad")
    times = {k: [] for k in phases}
    tokens = []

    def one(index, record):
        t = [time.perf_counter()]
        batch = collate(split.ex, index, 0)
        labels = batch.pop("labels")
        t.append(time.perf_counter())
        logits = model(**batch).logits
        t.append(time.perf_counter())
        loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.item()
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if record:
            for i, k in enumerate(phases):
                times[k].append(t[i + 1] - t[i])
            tokens.append(int(batch["attention_mask"].sum()))

    n = min(steps + 1, len(batches))
    for i in range(n):
        one(batches[i], record=i > 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, n):
            one(batches[i], record=False)
    total = sum(sum(v) for v in times.values())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top_ops]
    prof_total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"variant": variant, "steps": n - 1, "batch_size": batch_size, "threads": threads,
            "real_tokens_per_step": statistics.mean(tokens) if tokens else None,
            "seconds_per_step": total / max(1, n - 1),
            "phases": {k: {"s_per_step": sum(v) / max(1, len(v)), "share": sum(v) / total if total else None}
                       for k, v in times.items()},
            "top_ops": [{"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                         "share": e.self_cpu_time_total / prof_total if prof_total else None} for e in ops]}


# ----------------------------------------------------------------------------- OMP wait policy


def omp_probe(steps: int, threads: int, n_warm: int = 1, seed: int = 0) -> dict:
    """depthtune's full fine-tuning step rate in this process (run in a subprocess with a chosen env)."""
    import torch

    from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_variant
    from depthtune.model.sources import load_tokenizer
    from depthtune.training.loop import train
    from depthtune.model.variants import build_variant

    torch.set_num_threads(threads)
    tok = load_tokenizer(ModelConfig())
    texts, labels = read_sst2(SHARED_DATA / "sst2" / "train.tsv", (steps + n_warm) * 16, seed)
    split = tokenize_split(tok, texts, labels)
    val = subset(split, 16)
    spec = parse_variant("full", {}, "full")
    built = build_variant(ModelConfig(), spec, 2, seed=seed)
    ts = []
    cfg = TrainConfig(convergence=FIXED_BUDGET, device="cpu", epochs=1, batch_size=16, lr=1e-4, checkpoint_every=0, seed=seed, num_threads=threads)
    t0 = time.perf_counter()
    train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=split.ex, val_ex=val.ex, cfg=cfg,
          metric="accuracy", device="cpu", pad_id=tok.pad_token_id, num_labels=2, log=lambda m: None,
          on_step=lambda s, e: ts.append(time.perf_counter()))
    steady = (len(ts) - 1 - (n_warm - 1)) * 16 / (ts[-1] - ts[n_warm - 1]) if len(ts) > n_warm else None
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "threads": threads, "steps": len(ts),
            "steady_samples_per_s": steady, "call_s": time.perf_counter() - t0,
            "loadavg": list(os.getloadavg())}


OMP_CONFIGS = {"unset": ({}, None), "PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
               "1 thread": ({}, 1)}


def omp_policy_comparison(configs: list, repeats: int, steps: int, threads: int, timeout: float = 600) -> dict:
    """Fresh processes alternating between OMP settings (OMP_CONFIGS names: env, thread count)."""
    runs = []
    for r in range(repeats):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for name in order:
            extra, thr = OMP_CONFIGS[name]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("OMP_WAIT_POLICY", None)
            env.update(extra)
            cmd = [sys.executable, "-m", "bench.harness", "omp-probe", str(steps), str(thr or threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
                rec = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                    {"error": proc.stderr[-500:]}
            except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                rec = {"error": str(exc)[:300]}
            rec.update(config=name, repeat=r)
            runs.append(rec)
    by = {}
    for rec in runs:
        if rec.get("steady_samples_per_s"):
            by.setdefault(rec["config"], []).append(rec["steady_samples_per_s"])
    return {"variant": "full", "recipe": "depthtune", "steps": steps, "threads": threads, "runs": runs,
            "steady_samples_per_s": {k: summarize(v) for k, v in by.items()}}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "omp-probe":
    from depthtune import runtime

    runtime.configure_process()
    print(json.dumps(omp_probe(int(sys.argv[2]), int(sys.argv[3]))))
