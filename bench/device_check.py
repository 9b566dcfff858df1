"""The one-command GPU check: depthtune's loop against plain `transformers.Trainer`
on big-model shapes, in bf16 autocast, on one GPU.

    bench/device_check.sh                    # on the GPU machine (H100/H200): ~3-5 min, under 8
    bench/device_check.sh --dry-run          # the same code path on the CPU at tiny sizes, fp32: ~30 s
    bench/device_check.sh --print-wheels     # the pip command that fills .whl/ (run here, online)
    bench/device_check.sh --download-wheels  # run it

The GPU machine has torch and an older transformers but no datasets, mlflow, prefect or dvc, and no
network: the script carries what it needs as wheels in `.whl/` (ignored by git), downloaded here
beforehand with --download-wheels, and device_check.sh installs them into /tmp/depthtune-site first.
It imports only depthtune.training.loop (setup / start_or_resume / run_epoch), depthtune.model.variants
(build_variant) and depthtune.planning.audit (audit_built): no pipeline, no tracking.

The jobs (random init, classification with 2 labels, batch 32 x 128 synthetic tokens, no padding):
  bert-full   BERT-base shape (768 hidden, 12 layers, 12 heads, 3072 intermediate): full fine-tuning
  bert-top2   the same, `train_top: 2` (embeddings + layers 0-9 frozen, their outputs cached once)
  qwen-lora   Qwen2-0.5B shape (896 hidden, 24 blocks, 14 query / 2 key-value heads, SwiGLU 4864,
              vocab 151,936, tied embeddings): LoRA r 16 on q/k/v/o/gate/up/down in every block
  qwen-top2   the same decoder, `train_top: 2`
They run in the order bert-full, qwen-lora (the issue's targets), bert-top2, qwen-top2; no job starts
after --budget-s (330 s), a failing run is recorded (its error) and the others go on, and the results
are rewritten after every job, so a cut-off run still brings figures back (exit status 1 if any failed).
Each job runs twice, by depthtune's loop and by the plain Trainer, on the same variant (built by
build_variant with seed 0: identical weights and freezing), the same batches of the same shape and
the same optimizer steps: `--warmup` steps (default 5) untimed, then `--steps` (default 30) timed.

What one job reports:
  samples/s, tokens/s   over the timed steps (CUDA synchronised at both ends); the depthtune row also
                        over its whole set-up + all steps (the frozen prefix's caching counted)
  MFU                   audit flops_per_token.train x tokens/s / the bf16 GEMM peak of this run
                        (8192^3 torch.matmul, at the start and the end: the higher one; the progress
                        lines use the first). The audit counts the model's FLOPs: for a cached
                        train_top variant the prefix is not recomputed per step, so its MFU says how
                        fast the job went in model-FLOP terms, not how busy the GPU was.
  peak memory           torch.cuda.max_memory_allocated over build + set-up + steps, against
                        audit_built(...).estimates["memory_bytes"]["total"] at the run's precision
  ratio                 depthtune tokens/s / Trainer tokens/s (timed steps); the issue's target is
                        >= 1.3x and >= 35% MFU for qwen-lora and bert-full.

Results: bench/results/device-<gpu>-<date>[-dry-run].{json,md}, copied into $OUT when it is set.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WHEEL_DIR = ".whl"

# ----------------------------------------------------------------------------- wheels carried to the GPU machine

# What the GPU machine lacks or has at another version (/work/.library/device/KINDS.md: transformers
# 5.17, peft of unknown version, no datasets/evaluate). Pinned to the versions of the Python that runs
# --print-wheels (the project's .venv), so the GPU runs the code the tests ran. Not carried because the
# machine has them at versions transformers accepts: torch, tokenizers (0.23.2), huggingface_hub
# (1.33), safetensors (0.8.0), accelerate (1.15.0), numpy, PyYAML, scikit-learn, psutil.
WHEELS = {
    # the machine's 5.17 is older; the prefix cache calls transformers.masking_utils and the blocks' own
    # forward signatures, which move between releases: run the version the tests ran
    "transformers": "the version our tests ran (the machine has 5.17)",
    "peft": "LoRA; the version our tests ran",
    "regex": "transformers checks regex>=2025.10.22 at import",
    # depthtune.training.loop -> depthtune.evaluation.metric_modules imports datasets and evaluate at import time
    # (validation scores through the evaluate API); these four go once that import is lazy
    "datasets": "imported by depthtune.evaluation.metric_modules (via depthtune.training.loop)",
    "evaluate": "imported by depthtune.evaluation.metric_modules (via depthtune.training.loop)",
    "dill": "needed by datasets/evaluate",
    "multiprocess": "needed by datasets/evaluate",
}
# pip matches manylinux_2_N exactly: list the tags the GPU machine's glibc accepts (README of the device)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
DEVICE_PYTHON = "3.12"


def wheel_pins() -> list[str]:
    """name==version for every carried wheel, at this Python's installed versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def download_command(dest: str = WHEEL_DIR, python: str = sys.executable) -> list[str]:
    """The pip download that fills `dest` with the wheels for the GPU machine (x86-64, CPython 3.12)."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
           "--implementation", "cp"]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    return cmd + ["-d", dest] + wheel_pins()


# ----------------------------------------------------------------------------- the plan

# Architectures for model.source: scratch (depthtune.config.ScratchArch names)
BERT_BASE = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512}
QWEN2_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
             "max_position_embeddings": 32768, "tie_word_embeddings": True}
# the dry run's: the same families, tiny (train_top 2 still leaves a frozen prefix of 2 layers)
TINY_BERT = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
TINY_QWEN2 = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64, "tie_word_embeddings": True}
DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (model, variant spec as in params.yaml, lr). The lr changes no speed; it keeps the loss finite.
# In this order: the two jobs with targets first.
JOBS = {
    "bert-full": ("encoder", {}, 1e-4),
    "qwen-lora": ("decoder", {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": DECODER_LINEARS}}, 2e-4),
    "bert-top2": ("encoder", {"train_top": 2}, 3e-4),
    "qwen-top2": ("decoder", {"train_top": 2}, 1e-4),
}
NUM_LABELS = 2
TARGET_RATIO, TARGET_MFU = 1.3, 0.35  # the GPU targets, for qwen-lora and bert-full
TARGET_JOBS = ("bert-full", "qwen-lora")


@dataclass
class Plan:
    device: str  # cuda | cpu (the dry run)
    dry_run: bool
    batch_size: int
    seq_len: int
    warmup: int  # untimed optimizer steps
    steps: int  # timed optimizer steps
    gemm_n: int
    encoder: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)
    jobs: list = field(default_factory=list)
    precision: str = "bf16-autocast"
    budget_s: float = 330.0  # no job starts after this many seconds (pip + imports + the last job + writes < 8 min)


def make_plan(args) -> Plan:
    jobs = args.jobs.split(",") if args.jobs else list(JOBS)
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise SystemExit(f"--jobs: unknown {unknown}; known: {', '.join(JOBS)}")
    if args.dry_run:
        return Plan(device="cpu", dry_run=True, batch_size=4, seq_len=16, warmup=1, steps=2, gemm_n=512,
                    encoder=TINY_BERT, decoder=TINY_QWEN2, jobs=jobs, precision="fp32", budget_s=args.budget_s)
    return Plan(device="cuda", dry_run=False, batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup,
                steps=args.steps, gemm_n=8192, encoder=BERT_BASE, decoder=QWEN2_05B, jobs=jobs,
                budget_s=args.budget_s)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- measurements


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def gemm_peak(device: str, n: int, reps: int = 10) -> dict:
    """The bf16 matmul peak of this GPU in this run (fp32 on the CPU): n x n x n, 3 warm-ups, best of reps."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    rates = []
    for i in range(reps + 3):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        if i >= 3:
            rates.append(2 * n ** 3 / (time.perf_counter() - t))
    del a, b, c
    rates.sort()
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "reps": reps, "peak_flops": rates[-1],
            "median_flops": rates[len(rates) // 2]}


class PeakCounter:
    """CUDA max allocated bytes over a block (reset at entry); on the CPU (dry run) the RSS growth."""

    def __init__(self, device: str):
        from depthtune.training.memory import PeakMemory

        self.inner = PeakMemory(device)

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # what earlier jobs left allocated (should be ~0): it is inside the CUDA peak too
        self.at_start = torch.cuda.memory_allocated() if self.inner.device == "cuda" else 0
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return int(self.inner.peak_growth) + self.at_start  # PeakMemory gives the growth over the start

    @property
    def kind(self) -> str:
        return self.inner.kind


def tokenizer_dir(workdir: Path) -> str:
    """A minimal fast tokenizer (pad id 0) for the scratch decoder: build_variant reads the pad id from
    the model's tokenizer, and the packaged MiniLM one is not on the GPU machine. The ids are synthetic.
    model.tokenizer must be a model folder (a config.json): the tokenizer_config names the class."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = workdir / "tokenizer"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return str(path)


def synthetic_examples(n: int, seq_len: int, vocab: int, seed: int):
    """n texts of exactly seq_len token ids in [2, vocab) (0 is the pad id), labels 0/1 alternating."""
    import torch

    from depthtune.data.batching import Examples

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, seq_len), generator=g)
    return Examples(input_ids=ids.tolist(), labels=[i % NUM_LABELS for i in range(n)])


def model_and_spec(plan: Plan, job: str, tok_dir: str):
    from depthtune.config import ModelConfig, parse_section, parse_variant

    family, raw_spec, lr = JOBS[job]
    arch = plan.encoder if family == "encoder" else plan.decoder
    raw_model = {"source": "scratch", "scratch": arch}
    if family == "decoder":
        raw_model["tokenizer"] = tok_dir
    model_cfg = parse_section(ModelConfig, raw_model, "model")
    return model_cfg, parse_variant(job, raw_spec, f"variants.{job}"), lr, arch


def audit_of(built, job: str, spec, plan: Plan, cache_tokens: int) -> dict:
    """The audit record's estimates for this batch shape, at the run's precision."""
    from depthtune.planning.audit import audit_built

    rec = audit_built(built, variant_name=job, spec=spec, num_labels=NUM_LABELS, batch_size=plan.batch_size,
                      seq_len=plan.seq_len, check=False, cache_tokens=cache_tokens, precision=plan.precision)
    return {"total_params": rec.total_params, "trainable_params": rec.trainable_params,
            "closed_form_matches": (rec.closed_form or {}).get("matches"), "estimates": rec.estimates}


def train_config(plan: Plan, lr: float):
    from depthtune.config import FIXED_BUDGET, TrainConfig

    # one epoch of exactly warmup + steps batches; no validation (eval_every beyond the run), no checkpoints
    return TrainConfig(convergence=FIXED_BUDGET, device=plan.device, seed=0, epochs=1, batch_size=plan.batch_size, lr=lr, weight_decay=0.01,
                       warmup_fraction=0.1, max_grad_norm=1.0, eval_every=10 ** 9, patience=0, checkpoint_every=0,
                       cache_frozen_prefix=True, precision=plan.precision)


def rates(plan: Plan, seconds: float, steps: int, flops_per_token: int, peak: float) -> dict:
    samples = steps * plan.batch_size
    tokens = samples * plan.seq_len  # no padding: every token is real
    tps = tokens / seconds
    return {"seconds": round(seconds, 4), "steps": steps, "samples_per_s": round(samples / seconds, 2),
            "tokens_per_s": round(tps, 1), "mfu": float(f"{flops_per_token * tps / peak:.4g}")}


def run_depthtune(plan: Plan, job: str, tok_dir: str, peak: float) -> dict:
    """build_variant -> setup (prefix caches for train_top) -> run_epoch: warmup steps, then timed steps."""
    from depthtune.training.prefix_cache import set_train_mode
    from depthtune.training.loop import run_epoch, setup, start_or_resume
    from depthtune.model.variants import build_variant

    model_cfg, spec, lr, arch = model_and_spec(plan, job, tok_dir)
    n = (plan.warmup + plan.steps) * plan.batch_size
    train_ex = synthetic_examples(n, plan.seq_len, arch["vocab_size"], seed=0)
    val_ex = synthetic_examples(plan.batch_size, plan.seq_len, arch["vocab_size"], seed=1)
    lines = []
    with PeakCounter(plan.device) as mem:
        t_build = time.perf_counter()
        built = build_variant(model_cfg, spec, NUM_LABELS, device=plan.device, path=f"variants.{job}", seed=0)
        sync(plan.device)
        t_setup = time.perf_counter()
        run = setup(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=train_config(plan, lr), metric="accuracy", device=plan.device, pad_id=0,
                    num_labels=NUM_LABELS, log=lines.append, max_steps=plan.warmup)
        state, best, _ = start_or_resume(run, fingerprint="", extra_meta={})
        set_train_mode(run.model, run.frozen)
        t_warm = time.perf_counter()
        run_epoch(run, state, best)  # the warm-up: stops at run.max_steps
        sync(plan.device)
        t0 = time.perf_counter()
        run.max_steps = plan.warmup + plan.steps
        run_epoch(run, state, best)
        sync(plan.device)
        t1 = time.perf_counter()
    # the cache holds every train + validation token (no padding here) in fp32
    cache_tokens = (n + len(val_ex)) * plan.seq_len if run.train_cache is not None else 0
    audit = audit_of(built, job, spec, plan, cache_tokens=cache_tokens)
    fpt = audit["estimates"]["flops_per_token"]["train"]
    losses = [row["loss"] for row in state.loss_curve]
    row = {"recipe": "depthtune", "build_s": round(t_setup - t_build, 2), "setup_s": round(t_warm - t_setup, 2),
           "warmup_s": round(t0 - t_warm, 2),
           "timed": rates(plan, t1 - t0, state.step - plan.warmup, fpt, peak),
           "whole": rates(plan, t1 - t_setup, state.step, fpt, peak),
           "cached_prefix_layers": run.frozen if run.train_cache is not None else 0,
           "cache_mib": round(((run.train_cache.nbytes if run.train_cache else 0) +
                               (run.val_cache.nbytes if run.val_cache else 0)) / 2**20, 1),
           "peak_memory_bytes": mem.bytes, "memory_kind": mem.kind, "memory_at_start_bytes": mem.at_start,
           "first_loss": losses[0], "last_loss": losses[-1],
           "log": lines, **audit}
    del run, built, state, best
    return row


def run_trainer(plan: Plan, job: str, tok_dir: str, peak: float) -> dict:
    """The plain transformers.Trainer on the same variant, batches and steps (bf16 on the GPU)."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from depthtune.model.variants import build_variant

    model_cfg, spec, lr, arch = model_and_spec(plan, job, tok_dir)
    total = plan.warmup + plan.steps
    ex = synthetic_examples(total * plan.batch_size, plan.seq_len, arch["vocab_size"], seed=0)
    data = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
             "labels": label} for ids, label in zip(ex.input_ids, ex.labels)]
    step_end = {}

    class Clock(TrainerCallback):  # CUDA synchronised: the step's kernels are done when its time is taken
        def on_step_end(self, args, state, control, **kw):
            sync(plan.device)
            step_end[state.global_step] = time.perf_counter()

    out_dir = tempfile.mkdtemp(prefix="device-check-trainer-")
    try:
        with PeakCounter(plan.device) as mem:
            built = build_variant(model_cfg, spec, NUM_LABELS, device=plan.device, path=f"variants.{job}", seed=0)
            args = TrainingArguments(
                output_dir=out_dir, per_device_train_batch_size=plan.batch_size, max_steps=total, learning_rate=lr,
                weight_decay=0.01, warmup_steps=int(0.1 * total), max_grad_norm=1.0, lr_scheduler_type="linear",
                save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                logging_steps=total, use_cpu=plan.device == "cpu", bf16=plan.device == "cuda",
                dataloader_num_workers=0)
            trainer = Trainer(model=built.model, args=args, train_dataset=data, data_collator=default_data_collator,
                              callbacks=[Clock()])
            trainer.remove_callback(PrinterCallback)
            sync(plan.device)
            t_start = time.perf_counter()
            res = trainer.train()
            sync(plan.device)
            t_end = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    audit = audit_of(built, job, spec, plan, cache_tokens=0)
    fpt = audit["estimates"]["flops_per_token"]["train"]
    timed_s = step_end[total] - step_end[plan.warmup]
    row = {"recipe": "trainer", "optimizer": str(args.optim),
           "timed": rates(plan, timed_s, total - plan.warmup, fpt, peak),
           "whole": rates(plan, t_end - t_start, res.global_step, fpt, peak),
           "peak_memory_bytes": mem.bytes, "memory_kind": mem.kind, "memory_at_start_bytes": mem.at_start,
           "train_loss": res.training_loss, **audit}
    del trainer, built
    return row


def attempt(fn, *args) -> dict:
    """fn(*args), or {"error": ...} with the traceback printed: one failing run must not cost the
    GPU session the other jobs' figures."""
    import traceback

    from depthtune.errors import first_line

    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 -- recorded in the results and the exit code
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}


def run_job(plan: Plan, job: str, tok_dir: str, peak: float) -> dict:
    """One job by both recipes; the ratio and the memory figure when both ran."""
    family, raw_spec, lr = JOBS[job]
    out = {"job": job, "family": family, "spec": raw_spec, "lr": lr}
    log(f"{job}: depthtune ...")
    out["depthtune"] = dt_row = attempt(run_depthtune, plan, job, tok_dir, peak)
    free(plan.device)
    if "error" not in dt_row:
        out["memory_vs_estimate"] = round(dt_row["peak_memory_bytes"] / dt_row["estimates"]["memory_bytes"]["total"], 3)
        log(f"{job}: depthtune {dt_row['timed']['tokens_per_s']:,.0f} tokens/s, MFU {dt_row['timed']['mfu']:.1%}, "
            f"peak {dt_row['peak_memory_bytes'] / 2**30:.2f} GiB (audit estimate "
            f"{dt_row['estimates']['memory_bytes']['total'] / 2**30:.2f} GiB); Trainer ...")
    out["trainer"] = tr_row = attempt(run_trainer, plan, job, tok_dir, peak)
    free(plan.device)
    if "error" not in tr_row:
        log(f"{job}: Trainer {tr_row['timed']['tokens_per_s']:,.0f} tokens/s, MFU {tr_row['timed']['mfu']:.1%}")
    if "error" not in dt_row and "error" not in tr_row:
        out["ratio_tokens_per_s"] = round(dt_row["timed"]["tokens_per_s"] / tr_row["timed"]["tokens_per_s"], 3)
        log(f"{job}: ratio depthtune / Trainer {out['ratio_tokens_per_s']:.2f}x")
    return out


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the run


HEAVY = ("datasets", "evaluate", "mlflow", "prefect", "dvc")


def import_core() -> dict:
    """Import the modules the check uses (first: nothing else has imported anything heavy yet) and name the
    packages the GPU machine lacks that came with them (today datasets and evaluate, through
    depthtune.training.loop -> depthtune.evaluation.metric_modules)."""
    import importlib

    t = time.perf_counter()
    for name in ("depthtune.training.loop", "depthtune.model.variants", "depthtune.planning.audit"):
        importlib.import_module(name)
    return {"seconds": round(time.perf_counter() - t, 2),
            "heavy_imported": sorted(m for m in HEAVY if m in sys.modules)}


def machine(device: str) -> dict:
    import torch
    import transformers

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cores": os.cpu_count()}
    for name in ("peft", "accelerate", "tokenizers", "huggingface_hub", "safetensors"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def run(plan: Plan, save) -> dict:
    """The GEMM peak, then each job; `save(res)` after every job (a timeout still leaves results)."""
    import torch

    t_start = time.perf_counter()
    imports = import_core()
    log(f"imported depthtune.training/variants/audit in {imports['seconds']} s; "
        f"heavy packages imported with them: {imports['heavy_imported'] or 'none'}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run for the CPU check")
    info = machine(plan.device)
    log(f"{info.get('gpu', 'CPU')}; torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}")
    gemm = gemm_peak(plan.device, plan.gemm_n)
    log(f"GEMM peak ({gemm['dtype']}, {gemm['n']}^3): {gemm['peak_flops'] / 1e12:.4g} TFLOP/s")
    res = {"schema": "depthtune.bench.device_check/1", "date": dt.date.today().isoformat(), "dry_run": plan.dry_run,
           "complete": False, "plan": asdict(plan), "machine": info, "imports": imports, "gemm": gemm,
           "gemm_end": None, "mfu_peak_flops": gemm["peak_flops"], "jobs": [], "skipped": [], "targets": {},
           "wall_s": None}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        tok_dir = tokenizer_dir(Path(tmp))
        for job in plan.jobs:
            if time.perf_counter() - t_start > plan.budget_s:  # leave time to write and return
                log(f"{job}: skipped, {plan.budget_s} s budget spent")
                res["skipped"].append(job)
                continue
            res["jobs"].append(run_job(plan, job, tok_dir, gemm["peak_flops"]))
            res["wall_s"] = round(time.perf_counter() - t_start, 1)
            save(res)
    res["gemm_end"] = gemm_peak(plan.device, plan.gemm_n)
    rescale_mfu(res)
    res.update(targets=targets(plan, res["jobs"]), complete=True, wall_s=round(time.perf_counter() - t_start, 1))
    save(res)
    return res


def rescale_mfu(res: dict) -> None:
    """MFU against the higher of the two GEMM peaks (start, end): a cold first measurement (clocks still
    ramping) must not inflate every MFU. Sets res["mfu_peak_flops"]."""
    peak = max(res["gemm"]["peak_flops"], res["gemm_end"]["peak_flops"])
    res["mfu_peak_flops"] = peak
    for j in res["jobs"]:
        for rec in ("depthtune", "trainer"):
            row = j[rec]
            if "error" in row:
                continue
            fpt = row["estimates"]["flops_per_token"]["train"]
            for span in ("timed", "whole"):
                row[span]["mfu"] = float(f"{fpt * row[span]['tokens_per_s'] / peak:.4g}")


def failures(res: dict) -> list[str]:
    """'job/recipe: error' for every run that failed, and the skipped jobs."""
    out = [f"{j['job']}/{rec}: {j[rec]['error']}" for j in res["jobs"] for rec in ("depthtune", "trainer")
           if "error" in j[rec]]
    return out + [f"{job}: skipped (time budget)" for job in res["skipped"]]


def targets(plan: Plan, jobs: list) -> dict:
    """Issue 14's GPU targets for the jobs that have them (not judged on a dry run)."""
    out = {}
    for j in jobs:
        if j["job"] in TARGET_JOBS and "ratio_tokens_per_s" in j:
            mfu = j["depthtune"]["timed"]["mfu"]
            out[j["job"]] = {"ratio": j["ratio_tokens_per_s"], "ratio_target": TARGET_RATIO, "mfu": mfu,
                             "mfu_target": TARGET_MFU,
                             "met": None if plan.dry_run else (j["ratio_tokens_per_s"] >= TARGET_RATIO
                                                               and mfu >= TARGET_MFU)}
    return out


def row_cells(r: dict) -> str:
    """One recipe's table cells: samples/s .. trainable (or its error across them)."""
    if "error" in r:
        return f"failed: {r['error'][:120]} | | | | | | |"
    est = r["estimates"]["memory_bytes"]["total"]
    return (f"{r['timed']['samples_per_s']:,.1f} | {r['timed']['tokens_per_s']:,.0f} | {r['timed']['mfu']:.1%} | "
            f"{r['whole']['tokens_per_s']:,.0f} | {r['peak_memory_bytes'] / 2**30:.3f} | {est / 2**30:.3f} | "
            f"{r['trainable_params']:,}")


def markdown(res: dict) -> str:
    m, p, g, g_end = res["machine"], res["plan"], res["gemm"], res["gemm_end"]
    title = "Device check" + (" (DRY RUN: CPU, tiny shapes, fp32; the figures say nothing)" if res["dry_run"] else "")
    end = f"{g_end['peak_flops'] / 1e12:.4g} at the end" if g_end else "not measured at the end"
    lines = [f"# {title}, {res['date']}" + ("" if res["complete"] else " (INCOMPLETE)"), "",
             f"{m.get('gpu', 'CPU')}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"Python {m['python']}. {p['precision']}, batch {p['batch_size']} x {p['seq_len']} tokens, "
             f"{p['warmup']} warm-up + {p['steps']} timed steps per run. GEMM peak ({g['dtype']} {g['n']}^3): "
             f"{g['peak_flops'] / 1e12:.4g} TFLOP/s at the start, {end}. Heavy packages imported by "
             f"depthtune.training/variants/audit: {', '.join(res['imports']['heavy_imported']) or 'none'}. "
             f"Wall time {res['wall_s']} s.", "",
             "| job | recipe | samples/s | tokens/s | MFU | whole-run tokens/s | peak mem GiB | audit est. GiB "
             "| trainable | ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for j in res["jobs"]:
        ratio = f"{j['ratio_tokens_per_s']:.2f}x" if "ratio_tokens_per_s" in j else ""
        lines.append(f"| {j['job']} | depthtune | {row_cells(j['depthtune'])} | {ratio} |")
        lines.append(f"| {j['job']} | trainer | {row_cells(j['trainer'])} | |")
    lines += ["", "tokens/s and MFU: the timed steps (CUDA synchronised); whole-run: depthtune's set-up (prefix "
                  "caching) + all steps, the Trainer's whole train() call. MFU = audit flops_per_token.train x "
                  "tokens/s / the higher GEMM peak (model FLOPs: a cached train_top prefix is counted though not "
                  "recomputed). "
                  "Peak memory: " + ("CUDA max allocated over build + training" if not res["dry_run"]
                                     else "RSS growth (dry run)") + "; the audit assumes fp32 activations.", ""]
    for name, t in res["targets"].items():
        verdict = "not judged (dry run)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"- target {name}: ratio {t['ratio']:.2f}x (>= {t['ratio_target']}x), MFU {t['mfu']:.1%} "
                     f"(>= {t['mfu_target']:.0%}): {verdict}")
    lines += [f"- FAILED {f}" for f in failures(res)]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out_dir: Path) -> list[Path]:
    """bench/results/device-<gpu>-<date>[-dry-run].{json,md}; copies into $OUT when it is set."""
    from depthtune.files import write_json_atomic, write_text_atomic

    gpu = re.sub(r"[^a-z0-9]+", "-", res["machine"].get("gpu", "cpu").lower()).strip("-") or "gpu"
    stem = f"device-{gpu}-{res['date']}" + ("-dry-run" if res["dry_run"] else "")
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json_atomic(paths[0], res)
    write_text_atomic(paths[1], markdown(res))
    if os.environ.get("OUT"):  # the GPU machine's folder that comes back to the session
        for path in paths:
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32, 1 + 2 steps")
    p.add_argument("--print-wheels", action="store_true", help="print the pip download command for .whl/ and exit")
    p.add_argument("--download-wheels", action="store_true", help="run that command (needs the network) and exit")
    p.add_argument("--jobs", default="", help=f"comma-separated subset of {', '.join(JOBS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="start no job after this many seconds (default 330: the whole run stays under 8 min)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_wheels or args.download_wheels:
        cmd = download_command()
        print(shlex.join(cmd))
        return subprocess.call(cmd, cwd=ROOT) if args.download_wheels else 0
    from depthtune.runtime import configure_process

    configure_process()
    plan = make_plan(args)
    log(f"device check{' (dry run)' if plan.dry_run else ''}: jobs {', '.join(plan.jobs)} on {plan.device}")
    res = run(plan, save=lambda partial: write_results(partial, args.out))
    paths = write_results(res, args.out)
    print(markdown(res), flush=True)
    log(f"wrote {paths[0]} and {paths[1].name}" + (" (and into $OUT)" if os.environ.get("OUT") else ""))
    return 1 if failures(res) else 0


if __name__ == "__main__":
    sys.exit(main())
