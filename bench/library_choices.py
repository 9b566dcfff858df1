"""Hand-written parts against the well-kept library that could replace them, on the same inputs: which to keep.

    python -m bench.library_choices [--out bench/results] [--progress-seconds 12]

- McNemar: our exact binomial tail summed in log space vs scipy.stats.binomtest(b, b + c, 0.5): the p-values and
  the seconds at 920, 80,500 and 1,001,000 discordant texts.
- The percentile bootstrap (1,000 resamples): our weighted resampling (every resample scored by matrix products)
  vs scipy.stats.bootstrap(paired, vectorized, method="percentile") with the registry's metric as the statistic:
  the intervals and the seconds for accuracy and macro-F1 at 1,000 / 10,000 texts and 2 / 77-150 classes.
- The progress line (depthtune/progress.py) in a log (stdout not a TTY, as under DVC and Prefect): a run of
  N steps at 20 ms a step through tqdm (its defaults), rich.progress (a non-terminal Console) and ours: the bytes and
  the update records each writes into the log.
- Data parallelism: whether torch's DistributedDataParallel averages a step that does not run through its forward,
  as the frozen-prefix cache's steps do (bench/ddp_bypass.py under torchrun, 2 processes).
Prints a table and writes bench/results/library-choices-<cpu>-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import time
from pathlib import Path

import numpy as np


def log_space_mcnemar(b: int, c: int) -> float:
    """The implementation depthtune had: 2 P(Binomial(b+c, 1/2) <= min(b, c)), summed with lgamma."""
    m, k = b + c, min(b, c)
    if m == 0 or b == c:
        return 1.0
    log_pmf = (math.lgamma(m + 1) - np.array([math.lgamma(j + 1) + math.lgamma(m - j + 1) for j in range(k + 1)])
               - m * math.log(2))
    top = log_pmf.max()
    return min(1.0, 2.0 * math.exp(top) * float(np.exp(log_pmf - top).sum()))


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def mcnemar_rows() -> list[str]:
    from scipy.stats import binomtest

    rows = []
    for b, c in ((400, 520), (40_000, 40_500), (500_000, 501_000)):
        ours, t1 = timed(lambda: log_space_mcnemar(b, c))
        theirs, t2 = timed(lambda: binomtest(b, b + c, 0.5).pvalue)
        rows.append(f"| McNemar b={b:,} c={c:,} | {ours:.12g} | {theirs:.12g} | {t1 * 1e3:.1f} | {t2 * 1e3:.1f} |")
    return rows


def bootstrap_rows() -> list[str]:
    from scipy.stats import bootstrap

    from depthtune.evaluation import metrics
    from depthtune.evaluation.significance import bootstrap_ci

    rng, rows = np.random.default_rng(0), []
    for n, k in ((1000, 2), (1000, 77), (10_000, 2), (10_000, 150)):
        refs = rng.integers(0, k, n)
        preds = np.where(rng.random(n) < 0.8, refs, rng.integers(0, k, n))
        for name in ("accuracy", "macro_f1"):
            m, classes = metrics.get(name), np.arange(k)

            def stat(r, p, axis=-1):  # the registry's metric per resample (scipy hands rows of indices' values)
                r, p = np.atleast_2d(r), np.atleast_2d(p)
                return np.array([m.weighted(np.ones((1, r.shape[1])), rr, pp, classes)[0] for rr, pp in zip(r, p)])

            ours, t1 = timed(lambda: bootstrap_ci(refs, preds, name, n=1000, seed=0, num_labels=k))
            res, t2 = timed(lambda: bootstrap((refs, preds), stat, paired=True, vectorized=True, n_resamples=1000,
                                              method="percentile", rng=np.random.default_rng(0)))
            ci = res.confidence_interval
            rows.append(f"| bootstrap {name}, {n:,} texts, {k} classes | {ours[0]:.4f}-{ours[1]:.4f} | "
                        f"{ci.low:.4f}-{ci.high:.4f} | {t1 * 1e3:.0f} | {t2 * 1e3:.0f} |")
    return rows


def progress_rows(seconds: float) -> list[str]:
    import io

    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from tqdm import tqdm

    from depthtune.progress import Progress

    steps, pause = int(seconds / 0.02), 0.02
    rows = []
    out = io.StringIO()
    for _ in tqdm(range(steps), desc="train", file=out):
        time.sleep(pause)
    text = out.getvalue()
    rows.append(f"| progress, tqdm, {steps} steps in a log | {len(text):,} bytes, {text.count(chr(13)) + 1} records "
                f"(carriage returns) | | | |")
    out = io.StringIO()
    with RichProgress(console=Console(file=out, force_terminal=False)) as bar:
        task = bar.add_task("train", total=steps)
        for _ in range(steps):
            time.sleep(pause)
            bar.advance(task)
    text = out.getvalue()
    rows.append(f"| progress, rich, {steps} steps in a log | {len(text):,} bytes, {len(text.splitlines())} lines "
                f"| | | |")
    lines = []
    ours = Progress("train", steps, log=lines.append, stream=io.StringIO(), log_every_s=seconds / 10)
    for step in range(1, steps + 1):
        time.sleep(pause)
        ours.update(step, loss=0.5, samples=step * 16)
    ours.close()
    rows.append(f"| progress, depthtune, {steps} steps in a log (a line every 10% and 10 s; here every "
                f"{seconds / 10:.1f} s) | {sum(len(x) + 1 for x in lines):,} bytes, {len(lines)} lines | | | |")
    return rows


def ddp_rows() -> list[str]:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "bench.ddp_bypass"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ddp_bypass:")), done.stderr[-300:])
    return [f"| DistributedDataParallel, 2 processes | {line.removeprefix('ddp_bypass: ')} | | | |"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.library_choices", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--progress-seconds", type=float, default=12.0)
    args = ap.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"# Hand-written vs library — {cpu}, {dt.date.today().isoformat()}", "",
             "| what | ours (or what happened) | the library (scipy.stats) | ours ms | library ms |",
             "|---|---|---|---:|---:|", *mcnemar_rows(),
             *bootstrap_rows(), *progress_rows(args.progress_seconds), *ddp_rows(), ""]
    text = "\n".join(lines)
    print(text)
    slug = "amd-epyc" if "AMD" in cpu else "intel-xeon" if "Intel" in cpu else "cpu"
    out = Path(args.out) / f"library-choices-{slug}-{dt.date.today().isoformat()}.md"
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
