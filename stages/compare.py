"""DVC stage `compare`: one comparison report over every variant's records.

Reads params sections `variants` (names, in order), `compare` (`tolerance`, `alpha`)
and `evaluation.metric`; reads every variant's audit record (--audit), train record
(--train) and eval record (--eval), and the pretrain record (--pretrain: what developing
the base model cost, shown beside the variants when pretraining ran); no model is loaded: the intervals come from the
eval records, the paired tests against the best variant run on their stored test
predictions. Writes, each file atomically, under --out (reports/): comparison.md,
comparison.json (also a DVC metrics file: its `variants` section), variants.csv (DVC
scatter plot), pareto.png, depth.png, index.html (all of it on one page that opens offline). Everything is
rendered in memory before the first write,
so a failure leaves the previous report intact. Then it logs every variant's eval
record (test metrics, confusion matrix) into that variant's MLflow run, the one its
finetune stage recorded: one MLflow start-up for all variants instead of one per
evaluation stage (params `tracking`; logging failures warn once and change no output).
"""
from __future__ import annotations

from depthtune import layout, stopwatch

from depthtune.tracking import log_runs as tracking
from depthtune.config import load_params
from depthtune.errors import DepthtuneError
from depthtune.files import run_main, write_bytes_atomic
from depthtune.report.comparison import build_report, load_results
from depthtune.report.text import comparison_table, render_outputs
from depthtune.runtime import configure_process


def main(argv: list | None = None) -> dict:
    args = layout.parse_stage_args("compare", argv, __doc__)
    params = load_params(args.params)
    variants = list(params.variants)
    print(f"compare: {len(variants)} variants; records from {args.audit}/, {args.train}/, {args.eval}/")
    results = load_results(variants, audit_dir=args.audit, train_dir=args.train, eval_dir=args.eval)
    report = build_report(results, metric=params.evaluation.metric, tolerance=params.compare.tolerance,
                          alpha=params.compare.alpha, pretraining=read_pretraining(args.pretrain))
    outputs = render_outputs(report)
    for name, data in outputs.items():
        write_bytes_atomic(args.out / name, data)
    print(comparison_table(report))
    print()
    print(report["verdict"]["sentence"].replace("**", ""))
    print(f"compare: {len(report['rows'])} variants -> {args.out}/ ({', '.join(outputs)})")
    log_evaluations(params.tracking, results)
    return report


def read_pretraining(path) -> dict | None:
    """The pretrain stage's record (its cost goes into the report), None when absent or pretraining was off."""
    import json

    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DepthtuneError(f"{path}: not a JSON pretrain record ({exc}); rerun the pretrain stage") from None
    return record if isinstance(record, dict) and record.get("enabled") else None


def log_evaluations(cfg, results) -> None:
    """Each variant's test metrics into its MLflow run (never raises: tracking records failures)."""
    if not cfg.enabled:
        return
    with stopwatch.measure("mlflow"):
        logged = [tracking.log_variant_evaluation(cfg, r.variant, eval_result=r.eval, run_id=r.train.run_id())
                  for r in results]
    ok = [r.variant for r, rec in zip(results, logged) if rec.get("logged")]
    print(f"compare: test metrics of {len(ok)}/{len(results)} variants logged to MLflow "
          f"({logged[0].get('tracking_uri') if logged else '-'})")


if __name__ == "__main__":
    configure_process()
    run_main(main)
