"""DVC stage `prepare`: the `data` section of params.yaml -> data/prepared/.

Outputs (written all at once; a failed run leaves the previous ones intact):
  data/prepared/{train,validation,test}.jsonl  one {"text": str, "label": int id} a line
  data/prepared/labels.json                    {"names": [...]}; label id = index
  data/prepared/report.json                    rows read/dropped/deduplicated/leaked/capped, balance

Usage: python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""
from __future__ import annotations

import argparse
import sys
import time

from depthtune.config import load_params
from depthtune.files import run_main
from depthtune.preparation import prepare, read_source, summary_lines, write_prepared


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default="data/prepared", help="output directory (default: data/prepared)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cfg = load_params(args.params).data
    source = read_source(cfg)
    if source.info.get("cache_path"):
        state = "cached" if source.info.get("from_cache") else "downloaded to"
        print(f"{source.info['spec']}: {state} {source.info['cache_path']}", file=sys.stderr)
    prepared = prepare(cfg, source=source)
    write_prepared(prepared, args.out)
    for line in summary_lines(prepared.report):
        print(line)
    for warning in prepared.report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
