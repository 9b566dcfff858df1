"""DVC stage `audit`: exact parameter buckets and cost estimates for every variant.

Reads params `task` and sections `model`, `variants`, `train` (batch_size, max_length,
cache_frozen_prefix, device and precision: the precision finetune will train in,
gradient_checkpointing), the label count from --labels (data/prepared/labels.json)
and the train split's longest text (the peak batch's shape) and the train + validation token count
from --token-report (data/tokenized/report.json); both are optional for a quick
audit (2 labels, no typical-shape estimate). Builds every variant on the meta
device (no weights load) and writes, all at once, under --out (audit/):
<variant>.json (an AuditRecord) for each variant and summary.md.
"""
from __future__ import annotations

import time
from pathlib import Path

from depthtune import layout
from depthtune.planning.audit import (audit_variants, planned_precision, read_num_labels, read_token_stats, summary_markdown,
                             summary_table)
from depthtune.config import load_params
from depthtune.files import atomic_dir, run_main, write_text_atomic
from depthtune.provenance import provenance
from depthtune.records import TokenReport
from depthtune.runtime import configure_process


def main(argv: list | None = None) -> None:
    args = layout.parse_stage_args("audit", argv, __doc__)
    start = time.perf_counter()
    params = load_params(args.params)
    num_labels = read_num_labels(args.labels)
    longest, tokens = read_token_stats(args.token_report)  # the peak batch's shape: 16 x the longest text
    # the share of the text the tokenizer cannot read: accuracy on unreadable text means little (the report says so)
    unknown = TokenReport.read(args.token_report).unknown_fraction() if args.token_report.exists() else None
    labels_from = args.labels if args.labels.exists() else "default, no labels file yet"
    print(f"audit: {len(params.variants)} variants of {params.model.source}; {num_labels} labels ({labels_from}); "
          f"longest train text {longest if longest is not None else 'unknown'} tokens, "
          f"{tokens:,} train + validation tokens "
          f"({args.token_report}); unknown to the tokenizer "
          f"{'not measured' if unknown is None else f'{unknown:.1%}'}")
    precision = planned_precision(params)
    print(f"audit: task {params.task}, precision {precision} (train.precision {params.train.precision}), "
          f"gradient checkpointing {'on' if params.train.gradient_checkpointing else 'off'}")
    records = audit_variants(params, num_labels, typical_seq_len=longest, cache_tokens=tokens, precision=precision)
    # versions only: a git commit alone must not change every audit file and re-run every finetune
    versions = provenance()["versions"]
    summary = summary_markdown(records)
    with atomic_dir(args.out) as tmp:  # all variants or nothing
        for rec in records:
            rec.versions = versions
            rec.unknown_fraction = unknown
            rec.write(tmp / Path(layout.audit_record(rec.variant)).name)
        write_text_atomic(tmp / Path(layout.AUDIT_SUMMARY).name, summary)
    print(summary_table(records))
    print(f"audit: {len(records)} variants in {time.perf_counter() - start:.1f} s -> "
          f"{args.out}/<variant>.json, {args.out}/{Path(layout.AUDIT_SUMMARY).name}")


if __name__ == "__main__":
    configure_process()
    run_main(main)
