"""DVC stage `promote`: register the best variant, move `@champion` only when it wins.

    python -m stages.promote [--params params.yaml] [--audit audit] [--train metrics/train]
        [--eval metrics/eval] [--test data/prepared/test.jsonl] [--labels data/prepared/labels.json]
        [--out reports/promotion.json]

Reads params `registry` and `tracking`; the eval, train and audit records of every
evaluated variant; the prepared test split + labels (candidate and champion are both
re-scored on them now, and their predictions paired: the candidate replaces the champion only
when a paired test says it is better at `registry.alpha` and by `registry.min_delta`). Writes the
promotion report. The steps are depthtune/tracking/registry.py.
"""
from __future__ import annotations

from depthtune import layout, runtime
from depthtune.config import load_params
from depthtune.files import run_main, write_json_atomic
from depthtune.tracking.registry import promote, summary_lines


def main(argv=None) -> dict:
    args = layout.parse_stage_args("promote", argv, __doc__)
    params = load_params(args.params)
    report = promote(params.registry, params.tracking, eval_dir=args.eval, train_dir=args.train,
                     audit_dir=args.audit, test_path=args.test, labels_path=args.labels)
    write_json_atomic(args.out, report)
    for line in summary_lines(report):
        print(line)
    print(f"promote: report -> {args.out}")
    return report


if __name__ == "__main__":
    runtime.configure_process()
    run_main(main)
