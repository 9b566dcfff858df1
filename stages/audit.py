"""DVC stage `audit`: exact parameter buckets and cost estimates for every variant.

    python -m stages.audit [--params params.yaml] [--out audit]

Reads params sections `model`, `variants`, `train` (batch_size, max_length),
the label count from data/prepared/labels.json and the training split's p95
token length from data/tokenized/report.json (both optional for a quick audit).
Writes audit/<variant>.json and audit/summary.md. Builds on the meta device:
no weights are loaded.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from depthtune import runtime  # noqa: F401  (offline defaults)
from depthtune.audit import audit_built, summary_markdown
from depthtune.config import Params, load_params
from depthtune.files import atomic_dir, read_json, run_main
from depthtune.provenance import provenance
from depthtune.variants import build_variant, load_base_config


def num_labels_from(labels_path: Path) -> int:
    if not labels_path.exists():
        return 2
    return len(read_json(labels_path)["names"])


def token_stats_from(report_path: Path) -> tuple:
    """(p95 token length of train, tokens in train + validation) from the tokenization report."""
    if not report_path.exists():
        return None, 0
    splits = read_json(report_path).get("splits", {})
    try:
        p95 = int(splits["train"]["p95"])
    except (KeyError, TypeError, ValueError):
        p95 = None
    tokens = sum(int(splits.get(s, {}).get("tokens", 0)) for s in ("train", "validation"))
    return p95, tokens


def audit_variants(*, params: Params, num_labels: int, typical_seq_len=None, cache_tokens: int = 0) -> list[dict]:
    base = load_base_config(params.model)
    results = []
    for name, spec in params.variants.items():
        built = build_variant(params.model, spec, num_labels, device="meta", base_config=base,
                              path=f"variants.{name}")
        results.append(audit_built(built, variant_name=name, spec=spec, num_labels=num_labels,
                                   batch_size=params.train.batch_size, seq_len=params.train.max_length,
                                   typical_seq_len=typical_seq_len,
                                   cache_tokens=cache_tokens if params.train.cache_frozen_prefix else 0))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--labels", default="data/prepared/labels.json")
    ap.add_argument("--token-report", default="data/tokenized/report.json")
    ap.add_argument("--out", default="audit")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    params = load_params(args.params)
    p95, tokens = token_stats_from(Path(args.token_report))
    results = audit_variants(params=params, num_labels=num_labels_from(Path(args.labels)),
                             typical_seq_len=p95, cache_tokens=tokens)
    # versions only: a git commit alone must not change every audit file and re-run every finetune
    prov = {"versions": provenance()["versions"]}
    import json
    with atomic_dir(args.out) as tmp:  # all variants or nothing
        for r in results:
            r.update(prov)
            (tmp / f"{r['variant']}.json").write_text(json.dumps(r, indent=2) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results).split("\n## ")[0])
    print(f"audit: {len(results)} variants in {time.perf_counter() - t0:.1f} s -> {args.out}/")


if __name__ == "__main__":
    run_main(main)
