"""DVC stage `compare`: one comparison report over every variant's records.

Reads params sections `variants` (names, in order), `compare.tolerance` and
`evaluation.metric`; reads every variant's audit record (--audit), train record
(--train) and eval record (--eval); nothing is recomputed. Writes, each file
atomically, under --out (reports/): comparison.md, comparison.json (also a DVC
metrics file: its `variants` section), variants.csv (DVC scatter plot),
pareto.png, depth.png. Everything is rendered in memory before the first write,
so a failure leaves the previous report intact.
"""
from __future__ import annotations

from depthtune import layout
from depthtune.config import load_params
from depthtune.files import run_main, write_bytes_atomic
from depthtune.report import build_report, comparison_table, load_results, render_outputs
from depthtune.runtime import configure_process


def main(argv: list | None = None) -> dict:
    args = layout.parse_stage_args("compare", argv, __doc__)
    params = load_params(args.params)
    variants = list(params.variants)
    print(f"compare: {len(variants)} variants; records from {args.audit}/, {args.train}/, {args.eval}/")
    results = load_results(variants, audit_dir=args.audit, train_dir=args.train, eval_dir=args.eval)
    report = build_report(results, metric=params.evaluation.metric, tolerance=params.compare.tolerance)
    outputs = render_outputs(report)
    for name, data in outputs.items():
        write_bytes_atomic(args.out / name, data)
    print(comparison_table(report))
    print()
    print(report["verdict"]["sentence"].replace("**", ""))
    print(f"compare: {len(report['rows'])} variants -> {args.out}/ ({', '.join(outputs)})")
    return report


if __name__ == "__main__":
    configure_process()
    run_main(main)
