"""DVC stage `promote`: register the best variant, move `@champion` only when it wins.

    python -m stages.promote [--params params.yaml] [--out reports/promotion.json]

Reads params `registry` and `tracking`; inputs metrics/eval/*.json, metrics/train/*.json,
audit/*.json, data/prepared/test.jsonl + labels.json (the champion is re-scored on
them now). Writes reports/promotion.json. The logic is depthtune/registry.py.
"""
from __future__ import annotations

import argparse

from depthtune import runtime  # noqa: F401  (offline defaults)
from depthtune.config import load_params
from depthtune.files import run_main
from depthtune.registry import promote


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/promotion.json")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    report = promote(params.registry, params.tracking, report_path=args.out)
    cand = report.get("candidate") or {}
    where = f" v{cand['version']}" if cand.get("version") else ""
    print(f"promote: {report['decision']}{where} ({cand.get('variant', '-')}): {report['reason']}")
    return report


if __name__ == "__main__":
    run_main(main)
