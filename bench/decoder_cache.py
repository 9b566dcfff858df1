"""A decoder's train_top variant with and without the frozen-prefix cache: same steps, one run.

    python -m bench.decoder_cache                  # ~20 s on 2 idle cores (minutes on shared ones)
    python -m bench.decoder_cache --threads 1      # one torch thread: steadier when other jobs share the cores
    python -m bench.decoder_cache --repeats 1 --n-train 64 --n-val 16 --tag quick   # a smoke run
    python -m bench.decoder_cache --task causal_lm # the same decoder trained on next-token loss (lm_head tied
                                                   # to the frozen embeddings: blocks 6-7 + final norm train)

The job: a random-init Llama classifier (hidden 256, 8 blocks, 4 query heads and 2 key/value heads of
64 dims, SwiGLU intermediate 688, the packaged MiniLM tokenizer), `train_top: 2` (embeddings + blocks
0-5 frozen, blocks 6-7, the final norm and `score` trained), 512 SST-2 training phrases and 128
validation phrases (../shared/data/sst2/train.tsv, a seeded sample), 3 epochs of batch 16, validated
at each epoch's end, no early stopping: 3 x 32 = 96 optimizer steps either way.

`depthtune.training.loop.train` runs it with `train.cache_frozen_prefix` true and false, alternating which
goes first over --repeats (cached-uncached, uncached-cached, ...): both meet the same machine load.
Per run: the seconds of the whole train() call (caching the training and validation texts included,
the per-epoch validations included), its steps, samples/s (training samples / those seconds), the
loop's own training seconds (train_time_s: no caching, no validation) and the final loss. The
speed-up is the uncached call's seconds over the cached call's, paired within a repeat.
Target: at least 1.5x on the CPU.

Where the saving comes from, per text and epoch (forward of one block = 1, its backward ~ 2):
uncached 8 forward + 2 x 2 backward = 12 block-units; cached, the 6 frozen blocks once per text for
the whole run (6 / 3 epochs = 2 per epoch) plus the top: its last block runs the MLP (~3/4 of the
block's weights here) on the pooled token only, so the 2 top blocks cost ~1.27 forward, ~3.8 with
backward: 12 / (2 + 3.8) = ~2x at best; validation runs only the top on cached states.

Writes bench/results/decoder-cache-<device>-<date>[-tag].{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import time
from pathlib import Path

from bench import harness as H
from depthtune.files import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA = {"model_type": "llama", "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 8,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 688,
         "max_position_embeddings": 512}
TARGET = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-top", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (all cores)")
    p.add_argument("--task", default="classification", choices=("classification", "causal_lm"))
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def load_data(tokenizer, n_train: int, n_val: int):
    """(train, validation) Examples: a seeded sample of SST-2 phrases, split in two."""
    from depthtune.data.batching import Examples

    texts, labels = H.read_sst2(H.SHARED_DATA / "sst2" / "train.tsv", n_train + n_val, seed=0)
    enc = tokenizer(texts, truncation=True, max_length=H.MAX_LENGTH)
    ids = enc["input_ids"]
    return (Examples(input_ids=ids[:n_train], labels=labels[:n_train]),
            Examples(input_ids=ids[n_train:], labels=labels[n_train:]))


def one_run(model_cfg, spec, train_ex, val_ex, cfg, pad_id: int, task: str = "classification") -> dict:
    """Build the variant (seed 0: the same weights every run), train it, time the train() call."""
    from depthtune.training.loop import train
    from depthtune.model.variants import build_variant

    built = build_variant(model_cfg, spec, 2, device="cpu", path="variants.top2", seed=0, task=task)
    metric = "accuracy" if task == "classification" else "perplexity"
    lines = []
    t0 = time.perf_counter()
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                cfg=cfg, metric=metric, device="cpu", pad_id=pad_id, num_labels=2, log=lines.append, task=task)
    seconds = time.perf_counter() - t0
    cache_s = [float(m.group(1)) for line in lines if (m := re.search(r"cached frozen prefix .* in ([0-9.]+) s", line))]
    return {"cached": cfg.cache_frozen_prefix, "train_call_s": round(seconds, 3), "steps": out.steps,
            "samples": out.samples, "samples_per_s": round(out.samples / seconds, 2),
            "loop_train_time_s": round(out.train_time_s, 3), "caching_s": cache_s[0] if cache_s else 0.0,
            "cached_prefix_layers": out.cached_prefix_layers, "cache_mib": round(out.cache_bytes / 2**20, 2),
            "final_loss": out.loss_curve[-1]["loss"], "best_val": out.best_val.get(metric), "metric": metric,
            "trainable_params": built.trainable_params, "total_params": built.total_params}


def run(args) -> dict:
    import torch

    from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_section, parse_variant
    from depthtune.model.sources import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    args.loadavg_start = list(os.getloadavg())
    model_cfg = parse_section(ModelConfig, {"source": "scratch", "scratch": LLAMA}, "model")
    spec = parse_variant("top2", {"train_top": args.train_top}, "variants.top2")
    tokenizer = load_tokenizer(model_cfg)
    train_ex, val_ex = load_data(tokenizer, args.n_train, args.n_val)
    runs = []
    for r in range(args.repeats):
        order = (True, False) if r % 2 == 0 else (False, True)  # alternate who goes first
        for cached in order:
            cfg = TrainConfig(convergence=FIXED_BUDGET, epochs=args.epochs, batch_size=args.batch_size, lr=2e-4, evals_per_epoch=1, patience=0,
                              checkpoint_every=0, seed=0, cache_frozen_prefix=cached)
            row = {"repeat": r, **one_run(model_cfg, spec, train_ex, val_ex, cfg, tokenizer.pad_token_id, args.task)}
            print(f"repeat {r} cache {'on ' if cached else 'off'}: {row['train_call_s']:7.2f} s, {row['steps']} steps, "
                  f"{row['samples_per_s']:6.1f} samples/s (caching {row['caching_s']:.2f} s), "
                  f"final loss {row['final_loss']:.4f}", flush=True)
            runs.append(row)
    return summarize(args, runs, train_ex, val_ex)


def summarize(args, runs: list, train_ex, val_ex) -> dict:
    import torch

    by = {(row["repeat"], row["cached"]): row for row in runs}
    speedups = [by[(r, False)]["train_call_s"] / by[(r, True)]["train_call_s"] for r in range(args.repeats)]
    side = {c: {"train_call_s_median": statistics.median(row["train_call_s"] for row in runs if row["cached"] == c),
                "samples_per_s_median": statistics.median(row["samples_per_s"] for row in runs if row["cached"] == c)}
            for c in (True, False)}
    machine = H.machine_info(torch.get_num_threads(), "cpu")
    machine["loadavg_start"] = args.loadavg_start  # other processes on the cores slow both sides alike (alternated)
    machine["loadavg_end"] = list(os.getloadavg())
    return {"schema": "depthtune.bench.decoder_cache/1", "date": dt.date.today().isoformat(), "machine": machine,
            "job": {"model": LLAMA, "task": args.task, "variant": {"train_top": args.train_top}, "epochs": args.epochs,
                    "batch_size": args.batch_size, "n_train": len(train_ex), "n_val": len(val_ex),
                    "train_tokens": H.length_stats(train_ex.lengths), "repeats": args.repeats},
            "runs": runs, "cached": side[True], "uncached": side[False],
            "speedup_per_repeat": [round(s, 3) for s in speedups], "speedup_median": round(statistics.median(speedups), 3),
            "target": TARGET, "meets_target": statistics.median(speedups) >= TARGET}


def markdown(res: dict) -> str:
    job, m = res["job"], res["machine"]
    lines = [f"# Decoder frozen-prefix cache, {res['date']}", "",
             f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; load average {m['loadavg_start'][0]:.2f} "
             f"at the start, {m['loadavg_end'][0]:.2f} at the end; torch {m['torch']}, transformers {m['transformers']}.",
             "",
             f"Random-init Llama ({job['model']['hidden_size']} hidden, {job['model']['num_hidden_layers']} blocks, "
             f"{job['model']['num_attention_heads']}/{job['model']['num_key_value_heads']} heads, intermediate "
             f"{job['model']['intermediate_size']}), task {job.get('task', 'classification')}, "
             f"`train_top: {job['variant']['train_top']}`, "
             f"{job['n_train']} SST-2 phrases (mean {job['train_tokens']['mean']:.1f} tokens) + {job['n_val']} "
             f"validation, {job['epochs']} epochs of batch {job['batch_size']}. Seconds: the whole `train()` call "
             "(caching and per-epoch validation included).", "",
             f"| repeat | cache | train() s | steps | samples/s | caching s | loop s | final loss | "
             f"val {res['runs'][0]['metric']} |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["runs"]:
        lines.append(f"| {row['repeat']} | {'on' if row['cached'] else 'off'} | {row['train_call_s']:.2f} | "
                     f"{row['steps']} | {row['samples_per_s']:.1f} | {row['caching_s']:.2f} | "
                     f"{row['loop_train_time_s']:.2f} | {row['final_loss']:.4f} | {row['best_val']:.3f} |")
    verdict = "meets" if res["meets_target"] else "misses"
    lines += ["", f"Speed-up (uncached s / cached s, per repeat): "
                  f"{', '.join(f'{s:.2f}x' for s in res['speedup_per_repeat'])}; median **{res['speedup_median']:.2f}x** "
                  f"({verdict} the {res['target']}x target).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from depthtune.runtime import configure_process

    configure_process()
    args = parse_args(argv)
    res = run(args)
    stem = f"decoder-cache-cpu-{res['date']}" + ("-causal-lm" if args.task == "causal_lm" else "")
    stem += f"-{args.tag}" if args.tag else ""
    write_json_atomic(RESULTS / f"{stem}.json", res)
    md = markdown(res)
    write_text_atomic(RESULTS / f"{stem}.md", md)
    print(md)
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
