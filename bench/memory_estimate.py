"""Measured training memory on the CPU against the audit's estimate, per precision and checkpointing.

    .venv/bin/python -m bench.memory_estimate                 # all settings, writes bench/results/
    .venv/bin/python -m bench.memory_estimate --steps 2 --layers 2 --out /tmp/x.md   # a quick run

A random-init Llama (causal_lm, untied lm_head) trains a few AdamW steps on random tokens. Each setting
runs in its own process (a fresh heap: RSS growth is not hidden by memory an earlier setting freed).
Measured: the weights' bytes (exact, from the parameters) and depthtune.training.memory.PeakMemory's RSS growth
over the steps (grads + activations + autocast copies + allocator overhead) plus the AdamW states' bytes
(allocated by a tiny warm-up step, with thread pools and kernel workspaces, before the measure); estimated:
depthtune.planning.costs.estimate for the same batch shape, total and the same total less the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [("fp32", False), ("bf16-autocast", False), ("bf16", False), ("fp32", True), ("bf16", True)]
RESULTS = Path(__file__).resolve().parent / "results" / "memory-estimate-cpu-2026-11-29.md"
MiB = 1 << 20
TRIM_ENV = "MALLOC_MMAP_THRESHOLD_=131072"  # glibc: a fixed mmap threshold, freed large blocks go back to the OS


def arch(args) -> dict:
    return {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "intermediate_size": args.intermediate, "max_position_embeddings": max(args.seq_len, 128),
            "tie_word_embeddings": False}


def measure_one(args, precision: str, checkpointing: bool) -> dict:
    """One setting in this process: build, audit, train `steps` steps under PeakMemory."""
    import torch

    from depthtune.planning.audit import audit_built
    from depthtune.config import ModelConfig, TrainConfig, parse_section, parse_variant
    from depthtune.training.memory import PeakMemory
    from depthtune.evaluation.next_token import mean_loss, token_nll
    from depthtune.training.precision import apply_precision, autocast_dtype, enable_gradient_checkpointing
    from depthtune.training.optimizer import build_optimizer
    from depthtune.model.variants import build_variant

    torch.set_num_threads(args.threads)
    model_cfg = parse_section(ModelConfig, {"source": "scratch", "scratch": arch(args)}, "model")
    spec = parse_variant("full", {}, "variants.full")
    built = build_variant(model_cfg, spec, 0, device="cpu", task="causal_lm")
    model = built.model
    apply_precision(model, precision)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    est = audit_built(built, variant_name="full", spec=spec, num_labels=0, batch_size=args.batch_size,
                      seq_len=args.seq_len, task="causal_lm", precision=precision,
                      gradient_checkpointing=checkpointing).estimates["memory_bytes"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-4), args.steps)
    gen = torch.Generator().manual_seed(0)
    dtype = autocast_dtype(precision)

    def step(batch_size: int, seq_len: int) -> torch.Tensor:
        ids = torch.randint(0, args.vocab, (batch_size, seq_len), generator=gen)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(input_ids=ids).logits
        # the training loop's loss (depthtune.training.loop.batch_lm_loss), not transformers' labels= loss:
        # token_nll's fp32 shifted copy of the logits is memory the estimate counts (20 B per logit)
        nll, tokens = token_nll(logits, ids, torch.ones_like(ids))
        loss = mean_loss(nll, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # one step on 1 x 8 tokens first: thread pools, kernels' workspaces and the AdamW states (counted in
    # the estimate, so their bytes are added back below) exist before the measured steps
    step(1, 8)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1)
    start = time.perf_counter()
    with PeakMemory("cpu") as peak:
        for _ in range(args.steps):
            loss = step(args.batch_size, args.seq_len)
    seconds = (time.perf_counter() - start) / args.steps
    return {"precision": precision, "gradient_checkpointing": checkpointing, "weights_measured": weights,
            "adamw_states_measured": states, "peak_growth": peak.peak_growth + states, "seconds_per_step": seconds,
            "loss": loss.item(), "estimate": est}


def bare_loop_estimate(e: dict) -> int:
    """The estimate's step peak less what this loop does not hold: no validation, so no best-weights copy."""
    return e["training_peak"] - e["best_weights"]


def row(r: dict, trimmed: dict) -> str:
    """One setting: measured with glibc's default heap (r) and with freed tensors returned to the OS (trimmed)."""
    e = r["estimate"]
    beyond = bare_loop_estimate(e) - e["weights"]
    return (f"| {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
            f"{r['weights_measured'] / MiB:.1f} | {e['weights'] / MiB:.1f} | {r['peak_growth'] / MiB:.1f} | "
            f"{trimmed['peak_growth'] / MiB:.1f} | {beyond / MiB:.1f} | {r['peak_growth'] / beyond:.2f} | "
            f"{trimmed['peak_growth'] / beyond:.2f} | {e['activations'] / MiB:.1f} | "
            f"{(e['gradients'] + e['adamw_states']) / MiB:.1f} | {e['autocast_weight_copies'] / MiB:.1f} | "
            f"{r['seconds_per_step']:.2f} |")


def report(args, results: list[tuple[dict, dict]], shared: str) -> str:
    a = arch(args)
    lines = [
        "# Training memory on the CPU: measured vs the audit's estimate",
        "",
        f"`python -m bench.memory_estimate` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}. "
        f"{shared}",
        "",
        f"Model: random-init Llama, causal_lm, untied lm_head: H {a['hidden_size']}, I {a['intermediate_size']}, "
        f"{a['num_hidden_layers']} layers, {a['num_attention_heads']} heads, {a['num_key_value_heads']} k/v heads, "
        f"vocab {a['vocab_size']}; batch {args.batch_size} x {args.seq_len} random tokens, full fine-tuning, "
        f"fused AdamW (depthtune.training.optimizer.build_optimizer), {args.steps} steps, each setting in a fresh process.",
        "",
        "Peak growth = depthtune.training.memory.PeakMemory RSS growth over the measured steps + the AdamW states' bytes "
        "(allocated by a 1 x 8-token warm-up step before them, with the thread pools and kernel workspaces; "
        "the weights exist before too). "
        "Estimate beyond weights = depthtune.planning.costs.estimate total - weights (grads + AdamW + activations "
        "incl. the logits + autocast weight copies). MiB. Two heaps: glibc's default, which keeps freed large "
        "blocks once its dynamic mmap threshold has grown (RSS then holds memory no tensor uses), and "
        f"`{TRIM_ENV}` (every block over 128 KiB is its own mmap, returned on free: RSS ~ live tensors).",
        "",
        "| precision | checkpointing | weights measured | weights est. | peak growth (default heap) | "
        "peak growth (trimmed heap) | est. beyond weights | measured / est. (default) | measured / est. (trimmed) | "
        "est. activations | est. grads + AdamW | est. autocast copies | s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(r, t) for r, t in results]

    def ratios(i: int) -> str:
        xs = [pair[i]["peak_growth"] / (bare_loop_estimate(pair[i]["estimate"]) - pair[i]["estimate"]["weights"])
              for pair in results]
        return f"{min(xs):.2f}-{max(xs):.2f}"
    lines += ["", f"Measured / estimated beyond the weights: {ratios(1)} with the trimmed heap (live tensors), "
              f"{ratios(0)} with glibc's default heap (its retained free blocks on top). The estimate is an upper "
              "bound on live tensors by construction: it counts every gradient as allocated at the peak, while "
              "backward allocates them block by block as the activations are freed."]
    lines += ["", "Raw figures (bytes), default heap then trimmed heap per setting:", "", "```"]
    lines += [json.dumps(r) for pair in results for r in pair] + ["```", ""]
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared", default="", help="a sentence on other load on the machine during the run")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help="internal: run one setting, PRECISION[:ckpt], print its JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.one:
        precision, _, ckpt = args.one.partition(":")
        print(json.dumps(measure_one(args, precision, ckpt == "ckpt")))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = []
    for precision, ckpt in SETTINGS:
        one = f"{precision}:ckpt" if ckpt else precision
        pair = []
        for extra_env in ({}, dict([TRIM_ENV.split("=")])):
            proc = subprocess.run([sys.executable, "-m", "bench.memory_estimate", *passthrough, "--one", one],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                  env={**os.environ, **extra_env})
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            pair.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results.append(tuple(pair))
        print(row(*pair), flush=True)
    text = report(args, results, args.shared)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    from depthtune.runtime import configure_process

    configure_process()
    sys.exit(main())
