"""DVC stage `prepare`: the `data` section of params.yaml -> data/prepared/.

Outputs (written all at once; a failed run leaves the previous ones intact):
  data/prepared/{train,validation,test}.jsonl  one {"text": str, "label": int id} a line
  data/prepared/labels.json                    {"names": [...]}; label id = index
  data/prepared/report.json                    rows read/dropped/deduplicated/leaked/capped, balance,
                                               texts with conflicting labels (data.conflicts) with examples

Usage: python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""
from __future__ import annotations

import sys
import time

from depthtune import layout, runtime, tasks
from depthtune.config import load_params
from depthtune.data.readers import read_source
from depthtune.files import run_main
from depthtune.data.preparation import prepare, summary_lines, write_prepared


def main(argv: list | None = None) -> None:
    args = layout.parse_stage_args("prepare", argv, __doc__)
    start = time.perf_counter()
    params = load_params(args.params)
    cfg, labelled = params.data, tasks.get(params.task).labelled  # causal_lm: texts only
    source = read_source(cfg, labelled=labelled)
    if source.info.get("cache_path"):
        state = "cached" if source.info.get("from_cache") else "downloaded to"
        print(f"{source.info['spec']}: {state} {source.info['cache_path']}", file=sys.stderr)
    prepared = prepare(cfg, source=source, labelled=labelled)
    write_prepared(prepared, args.out)
    for line in summary_lines(prepared.report):
        print(line)
    for warning in prepared.report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    runtime.configure_process()
    run_main(main)
