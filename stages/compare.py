"""DVC stage `compare`: one comparison report over every variant's result files.

    python -m stages.compare [--params params.yaml] [--out reports]
                             [--audit audit] [--train metrics/train] [--eval metrics/eval]

Reads params sections `variants` (names, in order), `compare.tolerance` and
`evaluation.metric`; reads audit/<v>.json, metrics/train/<v>.json and
metrics/eval/<v>.json for every variant (nothing is recomputed). Writes, each
file atomically, under --out: comparison.md, comparison.json (also a DVC
metrics file: its `variants` section), variants.csv (DVC scatter plot),
pareto.png, depth.png. Everything is rendered in memory before the first
write, so a failure leaves the previous report intact.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from depthtune.config import load_params
from depthtune.files import run_main
from depthtune.report import build_report, comparison_table, load_results, render_outputs


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--audit", default="audit", help="folder of audit/<variant>.json")
    ap.add_argument("--train", default="metrics/train", help="folder of metrics/train/<variant>.json")
    ap.add_argument("--eval", default="metrics/eval", help="folder of metrics/eval/<variant>.json")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    results = load_results(list(params.variants), audit_dir=args.audit, train_dir=args.train,
                           eval_dir=args.eval)
    report = build_report(results, metric=params.evaluation.metric, tolerance=params.compare.tolerance)
    outputs = render_outputs(report)
    out = Path(args.out)
    for name, data in outputs.items():
        write_bytes_atomic(out / name, data)
    print(comparison_table(report))
    print()
    print(report["verdict"]["sentence"].replace("**", ""))
    print(f"compare: {len(report['rows'])} variants -> {out}/ ({', '.join(outputs)})")
    return report


if __name__ == "__main__":
    run_main(main)
