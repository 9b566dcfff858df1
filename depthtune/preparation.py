"""The `prepare` stage's logic: clean the raw inputs, split them, cap them, report them.

Pure functions (no orchestrator, no global state). `depthtune.data_readers` reads the
inputs; `stages/prepare.py` is the thin command-line wrapper and `write_prepared` the
only function here that touches the disk.

Pipeline, in this order:
1. read every input (`depthtune.data_readers`: rows read; rows whose text/label bytes
   do not decode in `data.encoding` are dropped as `undecodable`);
2. clean each input: strip the text; drop `empty_text` (empty or whitespace),
   `missing_label`, `undeclared_label` (not in `data.labels`, when declared); then
   drop exact duplicate texts within the input (first occurrence kept; a duplicate
   with another label counts as a label conflict). More than `data.max_drop_fraction`
   of an input dropped (duplicates excluded) is an error;
3. split: inputs that are missing (validation, test) are split off train, stratified
   by label, seeded with `data.seed`, sizes `data.split.*` x the train rows;
4. leakage: a text in train is removed from validation and test, a text in
   validation is removed from test;
5. cap: `max_train_samples` caps train, `max_eval_samples` caps validation and test
   (stratified, seeded);
6. labels -> ids: the order of `data.labels` when declared, else the source's own
   documented order (builtin: rotten=0, fresh=1; a Hub ClassLabel's names), else
   the labels found sorted (numerically when all are integers, else as strings).
   Label names are strings (`labels: [0, 1]` in YAML gives names "0", "1").
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from depthtune.config import DataConfig
from depthtune.data_readers import RawSplit, SourceData, normalize_label, read_source
from depthtune.errors import DataError
from depthtune.files import atomic_dir
from depthtune.layout import SPLITS
from depthtune.records import LabelSet, PreparedExample, prepared_split_text

EVAL_SPLITS = ("validation", "test")
DROP_REASONS = ("undecodable", "empty_text", "missing_label", "undeclared_label")
REPORT_VERSION = 1
_SAMPLE_ROWS = 5  # row numbers listed per drop reason in the report
_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass
class CleanSplit:
    name: str
    origin: str
    examples: list  # (text, label name, row number)
    stats: dict


@dataclass
class Prepared:
    names: list  # label names, id = index
    splits: dict  # split name -> list of PreparedExample (text, label id)
    report: dict


def sort_labels(found: Iterable[str]) -> list:
    found = sorted(set(found))
    if found and all(_INT_RE.match(x) for x in found):
        return sorted(found, key=int)
    return found


# ----------------------------------------------------------------------------- cleaning


def declared_labels(labels) -> Optional[list]:
    """`data.labels` as string names (None when not declared); duplicates are an error."""
    if labels is None:
        return None
    names = []
    for value in labels:
        name = normalize_label(value)
        if name is None:
            raise DataError(f"data.labels: empty label name in {list(labels)!r}")
        if name in names:
            raise DataError(f"data.labels: {name!r} is listed twice")
        names.append(name)
    if len(names) < 2:
        raise DataError(f"data.labels: {names!r} declares fewer than 2 classes")
    return names


def clean_split(raw: RawSplit, *, labels: Optional[Iterable[str]] = None) -> CleanSplit:
    """Drop unusable rows (with reasons) and exact duplicate texts; strip texts."""
    allowed = set(labels) if labels is not None else None
    dropped = {reason: [] for reason in DROP_REASONS}
    dropped["undecodable"] = list(raw.undecodable)
    undeclared = Counter()
    examples, seen = [], {}
    duplicates, conflicts, duplicate_rows = 0, 0, []
    for row, text, label in raw.rows:
        text = text.strip() if isinstance(text, str) else text
        name = normalize_label(label)
        if not text:
            dropped["empty_text"].append(row)
        elif name is None:
            dropped["missing_label"].append(row)
        elif allowed is not None and name not in allowed:
            dropped["undeclared_label"].append(row)
            undeclared[name] += 1
        elif text in seen:
            duplicates += 1
            if len(duplicate_rows) < _SAMPLE_ROWS:
                duplicate_rows.append(row)
            if seen[text] != name:
                conflicts += 1
        else:
            seen[text] = name
            examples.append((text, name, row))
    counts = {reason: len(rows) for reason, rows in dropped.items()}
    total = sum(counts.values())
    stats = {
        "origin": raw.origin,
        "format": raw.format,
        # what the row numbers below count: file lines (text formats) or 1-based rows (parquet, hub)
        "row_numbers": "row index" if raw.format in ("parquet", "hub") else "line",
        "rows_read": raw.rows_read,
        "dropped": counts,
        "dropped_total": total,
        "drop_fraction": round(total / raw.rows_read, 6) if raw.rows_read else 0.0,
        "dropped_rows_sample": {r: rows[:_SAMPLE_ROWS] for r, rows in dropped.items() if rows},
        "duplicates_removed": duplicates,
        "duplicate_label_conflicts": conflicts,
        "duplicate_rows_sample": duplicate_rows,
        "rows_kept": len(examples),
    }
    if raw.skipped:
        stats["rows_outside_task"] = raw.skipped
    if undeclared:
        stats["undeclared_labels_found"] = dict(undeclared.most_common(10))
    return CleanSplit(name=raw.name, origin=raw.origin, examples=examples, stats=stats)


def check_drop_fraction(clean: CleanSplit, *, max_drop_fraction: float) -> None:
    s = clean.stats
    if s["rows_read"] == 0:
        raise DataError(f"{clean.origin}: no rows (split {clean.name} is empty)")
    if s["drop_fraction"] > max_drop_fraction:
        reasons = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in s["dropped"].items() if n)
        extra = ""
        if s.get("undeclared_labels_found"):
            extra = "; labels found but not in data.labels: " + ", ".join(map(repr, s["undeclared_labels_found"]))
        if s["dropped"].get("undecodable"):
            extra += "; undecodable rows are not valid text in data.encoding: check data.encoding"
        first = next((f"; first at row {rows[0]}" for rows in s["dropped_rows_sample"].values() if rows), "")
        raise DataError(f"{clean.origin}: {s['dropped_total']} of {s['rows_read']} rows dropped "
                        f"({s['drop_fraction']:.1%}: {reasons}{first}), above data.max_drop_fraction "
                        f"{max_drop_fraction}{extra}")


# ----------------------------------------------------------------------------- splitting


def stratified_sample(labels: list, n: int, *, rng: random.Random, one_each_from: Optional[int] = None) -> list:
    """Indices of `n` items whose class proportions match `labels`' as closely as possible.

    Per class, floor(n * share) items, then the remaining slots to the largest
    fractional remainders (ties by class name); items within a class at random.
    `one_each_from`: every class with at least that many items gets at least one (taken from the
    largest classes), so a rare class is not left out of a small split: TREC's ABBR is 1.6% of the
    rows, and a 50-row split would get floor(0.8) = 0 of it by proportion alone.
    Returns sorted indices (the input order is kept).
    """
    total = len(labels)
    if n >= total:
        return list(range(total))
    if n <= 0:
        return []
    by_class: dict = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    quota = {c: n * len(by_class[c]) / total for c in classes}
    take = {c: min(len(by_class[c]), math.floor(quota[c])) for c in classes}
    left = n - sum(take.values())
    for c in sorted(classes, key=lambda c: (-(quota[c] - take[c]), c)):
        if left <= 0:
            break
        if take[c] < len(by_class[c]):
            take[c] += 1
            left -= 1
    if one_each_from is not None:
        ensure_one_each(take, {c: len(by_class[c]) for c in classes}, n, one_each_from)
    chosen = []
    for c in classes:
        idx = list(by_class[c])
        rng.shuffle(idx)
        chosen.extend(idx[:take[c]])
    return sorted(chosen)


def ensure_one_each(take: dict, sizes: dict, n: int, one_each_from: int) -> None:
    """Raise to 1 the take of each class with >= one_each_from items; the slots come from the largest takes."""
    short = sorted(c for c in take if take[c] == 0 and sizes[c] >= one_each_from)
    for c in short[:n]:  # never more classes than slots
        donor = max((d for d in take if take[d] > 1), key=lambda d: (take[d], d), default=None)
        if donor is None:
            return
        take[donor] -= 1
        take[c] = 1


def split_off(examples: list, *, fractions: dict, seed: int) -> tuple[list, dict]:
    """Split `fractions` (name -> share of all rows) off `examples`, stratified by label.

    Returns (what is left, {name: split}). Each split made gets at least one row, and one row of
    every class that has enough rows to leave one for each split still to make (train included):
    3 rows for the first split off (test), 2 for the next (validation).
    """
    rng = random.Random(f"{seed}:split")
    total = len(examples)
    sizes = {name: max(1, round(frac * total)) for name, frac in fractions.items()}
    if total - sum(sizes.values()) < 1:
        wanted = ", ".join(f"{n} {fractions[n]}" for n in fractions)
        raise DataError(f"split: {total} train rows are too few to split off {wanted}; "
                        "provide more data or the splits as data.files")
    rest, made = list(examples), {}
    order = sorted(fractions, key=lambda n: SPLITS.index(n), reverse=True)  # test first, then validation
    for i, name in enumerate(order):
        picked = set(stratified_sample([e[1] for e in rest], sizes[name], rng=rng,
                                       one_each_from=len(order) - i + 1))
        made[name] = [e for i, e in enumerate(rest) if i in picked]
        rest = [e for i, e in enumerate(rest) if i not in picked]
    return rest, made


def make_splits(inputs: dict, *, validation: float, test: float, seed: int) -> tuple[dict, dict]:
    """Inputs (name -> examples) -> train/validation/test; missing eval splits come from train."""
    fractions = {name: frac for name, frac in (("validation", validation), ("test", test)) if name not in inputs}
    splits = {name: list(examples) for name, examples in inputs.items()}
    origin = {name: "input" for name in inputs}
    if fractions:
        rest, made = split_off(splits["train"], fractions=fractions, seed=seed)
        splits["train"] = rest
        for name, examples in made.items():
            splits[name] = examples
            origin[name] = f"split off train (stratified, {fractions[name]:g} of {len(inputs['train'])} rows)"
    return {name: splits[name] for name in SPLITS}, origin


def remove_leakage(splits: dict) -> dict:
    """Remove from validation texts also in train, and from test texts in train or validation."""
    removed = {"train": 0}
    seen = {text for text, _, _ in splits["train"]}
    for name in EVAL_SPLITS:
        kept = [e for e in splits[name] if e[0] not in seen]
        removed[name] = len(splits[name]) - len(kept)
        splits[name] = kept
        seen.update(text for text, _, _ in kept)
    return removed


def cap_splits(splits: dict, *, max_train: Optional[int], max_eval: Optional[int], seed: int) -> dict:
    """Stratified, seeded caps; returns rows removed per split."""
    removed = {}
    for name in SPLITS:
        cap = max_train if name == "train" else max_eval
        examples = splits[name]
        if cap is None or len(examples) <= cap:
            removed[name] = 0
            continue
        rng = random.Random(f"{seed}:cap:{name}")
        keep = stratified_sample([e[1] for e in examples], cap, rng=rng, one_each_from=1)  # every class stays
        splits[name] = [examples[i] for i in keep]
        removed[name] = len(examples) - cap
    return removed


def label_names(splits: dict, *, declared: Optional[list] = None, source_order: Optional[Iterable] = None) -> tuple:
    """(names in id order, how the order was chosen)."""
    found = {e[1] for examples in splits.values() for e in examples}
    if declared is not None:
        return list(declared), "declared (data.labels)"
    if source_order is not None:
        order = [str(x) for x in source_order]
        if found <= set(order):
            return order, "source (the dataset's documented order)"
    return sort_labels(found), "sorted (numeric when all labels are integers, else by string)"


def class_balance(examples: list, names: list) -> dict:
    counts = Counter(e[1] for e in examples)
    n = len(examples)
    return {
        "counts": {name: counts.get(name, 0) for name in names},
        "fractions": {name: round(counts.get(name, 0) / n, 4) if n else 0.0 for name in names},
    }


# ----------------------------------------------------------------------------- orchestration


def build_report(*, source: SourceData, cleaned: dict, origin: dict, leakage: dict, capped: dict,
                 splits: dict, names: list, label_order: str, cfg: DataConfig, warnings: list) -> dict:
    info = {k: v for k, v in source.info.items() if k not in ("cache_path", "from_cache")}
    return {
        "report_version": REPORT_VERSION,
        "source": info,
        "options": {
            "format": cfg.format, "text_column": cfg.text_column, "label_column": cfg.label_column,
            "delimiter": cfg.delimiter, "quoting": cfg.quoting, "encoding": cfg.encoding,
            "labels": list(cfg.labels) if cfg.labels is not None else None,
            "split": {"validation": cfg.split.validation, "test": cfg.split.test},
            "seed": cfg.seed, "max_train_samples": cfg.max_train_samples,
            "max_eval_samples": cfg.max_eval_samples, "max_drop_fraction": cfg.max_drop_fraction,
        },
        "labels": {"names": names, "order": label_order},
        "inputs": {name: clean.stats for name, clean in cleaned.items()},
        "splits": {
            name: {
                "from": origin[name],
                "leakage_removed": leakage[name],
                "capped_removed": capped[name],
                "rows": len(splits[name]),
                "class_balance": class_balance(splits[name], names),
            }
            for name in SPLITS
        },
        "totals": {
            "rows_read": sum(c.stats["rows_read"] for c in cleaned.values()),
            "dropped": sum(c.stats["dropped_total"] for c in cleaned.values()),
            "duplicates_removed": sum(c.stats["duplicates_removed"] for c in cleaned.values()),
            "leakage_removed": sum(leakage.values()),
            "capped_removed": sum(capped.values()),
            "rows_out": sum(len(splits[n]) for n in SPLITS),
        },
        "warnings": warnings,
        "outputs": {**{name: f"{name}.jsonl" for name in SPLITS}, "labels": "labels.json"},
    }


def clean_inputs(source: SourceData, *, declared: Optional[list], max_drop_fraction: float) -> dict:
    """Every input cleaned (name -> CleanSplit); too many drops or nothing left is an error."""
    cleaned = {}
    for name, raw in source.inputs.items():
        clean = clean_split(raw, labels=declared)
        check_drop_fraction(clean, max_drop_fraction=max_drop_fraction)
        cleaned[name] = clean
    for name, clean in cleaned.items():
        if not clean.examples:
            raise DataError(f"{clean.origin}: split {name} is empty after cleaning "
                            f"({clean.stats['rows_read']} rows read, {clean.stats['duplicates_removed']} duplicates)")
    return cleaned


def check_splits(splits: dict, *, cleaned: dict, leakage: dict, labelled: bool = True) -> None:
    """Every split has rows and train has at least 2 classes; the error names the file the rows came from."""
    where = {n: (cleaned[n].origin if n in cleaned else f"{cleaned['train'].origin} (split {n})") for n in SPLITS}
    for name in SPLITS:
        if not splits[name]:
            why = f", {leakage[name]} rows removed as also in an earlier split" if leakage[name] else ""
            raise DataError(f"{where[name]}: split {name} is empty{why}")
    train_classes = sorted({e[1] for e in splits["train"]})
    if len(train_classes) < 2 and labelled:  # texts only (causal_lm): one class, TEXT_ONLY_LABEL
        raise DataError(f"{where['train']}: fewer than 2 classes remain in train after cleaning "
                        f"(found: {', '.join(map(repr, train_classes)) or 'none'})")


def split_warnings(splits: dict, *, names: list, cleaned: dict, leakage: dict) -> list:
    """What the user should know but that does not stop the stage: missing classes, conflicts, leakage."""
    warnings = []
    rows = Counter(e[1] for split in splits.values() for e in split)
    for name in SPLITS:
        present = {e[1] for e in splits[name]}
        missing = [n for n in names if n not in present]
        if missing:
            few = [f"{n!r} ({rows[n]} rows in all, fewer than one per split)" for n in missing if rows[n] < len(SPLITS)]
            warnings.append(f"split {name} has no examples of {', '.join(map(repr, missing))}"
                            + (f"; {', '.join(few)}" if few else ""))
    for clean in cleaned.values():
        if clean.stats["duplicate_label_conflicts"]:
            warnings.append(f"{clean.origin}: {clean.stats['duplicate_label_conflicts']} duplicate texts had "
                            "another label than their first occurrence (first kept)")
    for name in EVAL_SPLITS:
        if leakage[name]:
            warnings.append(f"split {name}: {leakage[name]} texts also in an earlier split were removed (leakage)")
    return warnings


def prepare(cfg: DataConfig, *, cache_dir: str | Path | None = None, source: Optional[SourceData] = None,
            labelled: bool = True) -> Prepared:
    """The whole prepare stage in memory: DataConfig -> label names, id-labelled splits, report.

    labelled=False (task causal_lm): texts only; every row carries the one label TEXT_ONLY_LABEL.
    """
    declared = declared_labels(cfg.labels) if labelled else None
    source = source if source is not None else read_source(cfg, cache_dir=cache_dir, labelled=labelled)
    cleaned = clean_inputs(source, declared=declared, max_drop_fraction=cfg.max_drop_fraction)
    try:
        splits, origin = make_splits({n: c.examples for n, c in cleaned.items()},
                                     validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed)
    except DataError as exc:  # name the file the rows came from
        raise DataError(f"{cleaned['train'].origin}: {exc}") from None
    leakage = remove_leakage(splits)
    capped = cap_splits(splits, max_train=cfg.max_train_samples, max_eval=cfg.max_eval_samples, seed=cfg.seed)
    names, order = label_names(splits, declared=declared, source_order=source.label_order)
    check_splits(splits, cleaned=cleaned, leakage=leakage, labelled=labelled)
    warnings = split_warnings(splits, names=names, cleaned=cleaned, leakage=leakage)
    report = build_report(source=source, cleaned=cleaned, origin=origin, leakage=leakage, capped=capped,
                          splits=splits, names=names, label_order=order, cfg=cfg, warnings=warnings)
    ids = {name: i for i, name in enumerate(names)}
    out = {name: [PreparedExample(text, ids[label]) for text, label, _ in splits[name]] for name in SPLITS}
    return Prepared(names=names, splits=out, report=report)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    """Write {train,validation,test}.jsonl, labels.json, report.json into out_dir, all or nothing."""
    out_dir = Path(out_dir)
    labels = LabelSet(names=list(prepared.names)).to_dict()
    # plain writes: atomic_dir swaps the whole directory in at once
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            (tmp / f"{name}.jsonl").write_text(prepared_split_text(prepared.splits[name]), encoding="utf-8")
        (tmp / "labels.json").write_text(json.dumps(labels, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    return out_dir


def summary_lines(report: dict) -> list:
    """A short console summary of a prepare report."""
    src = report["source"]
    spec = src.get("spec") or ", ".join(f"{k}={v}" for k, v in src.get("files", {}).items())
    names = report["labels"]["names"]
    lines = [f"prepared {spec}: labels {', '.join(f'{i}={n}' for i, n in enumerate(names))}"]
    for name, s in report["inputs"].items():
        drops = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in s["dropped"].items() if n) or "none"
        lines.append(f"  read {name}: {s['rows_read']} rows from {s['origin']}; dropped {s['dropped_total']} "
                     f"({drops}); duplicates {s['duplicates_removed']}")
    for name, s in report["splits"].items():
        bal = " ".join(f"{n}={f:.1%}" for n, f in s["class_balance"]["fractions"].items())
        extra = []
        if s["leakage_removed"]:
            extra.append(f"leakage -{s['leakage_removed']}")
        if s["capped_removed"]:
            extra.append(f"capped -{s['capped_removed']}")
        lines.append(f"  {name:<10} {s['rows']:>7} rows  {bal}" + (f"  ({', '.join(extra)})" if extra else ""))
    return lines
