"""The `prepare` stage's logic: clean the raw inputs, split them, cap them, report them.

Pure functions (no orchestrator, no global state). `depthtune.data.readers` reads the
inputs; `stages/prepare.py` is the thin command-line wrapper and `write_prepared` the
only function here that touches the disk.

Pipeline, in this order:
1. read every input (`depthtune.data.readers`: rows read; rows whose text/label bytes
   do not decode in `data.encoding` are dropped as `undecodable`);
2. clean each input: strip the text; drop `empty_text` (empty or whitespace),
   `missing_label`, `undeclared_label` (not in `data.labels`, when declared). More than
   `data.max_drop_fraction` of an input dropped this way is an error (duplicates and
   conflicts below are properties of the data, not signs of a wrong option: not counted);
3. label conflicts: a text seen with two or more labels, in any of the inputs, is
   resolved the same way in all of them by `data.conflicts`: `drop` (default) removes
   every copy, `first` keeps the label of its first row (inputs in train, validation,
   test order), `majority` keeps the most frequent label (a tie drops the text). Then
   exact duplicate texts within an input are removed (the first row with the kept label
   stays). Each row read ends as exactly one of: dropped (reason), duplicate, conflict,
   kept: rows_read = dropped_total + duplicates_removed + label_conflicts.rows_dropped
   + rows_kept;
4. split: inputs that are missing (validation, test) are split off train, stratified
   by label, seeded with `data.seed`, sizes `data.split.*` x the train rows;
5. leakage: a text in train is removed from validation and test, a text in
   validation is removed from test;
6. cap: `max_train_samples` caps train, `max_eval_samples` caps validation and test
   (stratified, seeded); the training rows the cap leaves out are kept apart (train_left_out.jsonl):
   never fine-tuned on, they are training-split text the pretrain stage may read;
7. labels -> ids: the order of `data.labels` when declared, else the source's own
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from depthtune.config import DataConfig
from depthtune.data.readers import RawSplit, SourceData, normalize_label, read_source
from depthtune.errors import DataError
from depthtune.files import atomic_dir
from depthtune.layout import SPLITS, TRAIN_LEFT_OUT_FILE
from depthtune.records import LabelSet, PreparedExample, prepared_split_text

EVAL_SPLITS = ("validation", "test")
DROP_REASONS = ("undecodable", "empty_text", "missing_label", "undeclared_label")
REPORT_VERSION = 2  # 2: label_conflicts (data.conflicts) replaced duplicate_label_conflicts
_SAMPLE_ROWS = 5  # row numbers listed per drop reason in the report
_CONFLICT_EXAMPLES = 5  # conflicting texts shown per input in the report (most rows first)
_EXAMPLE_CHARS = 200  # a conflicting text in the report is cut to this many characters
_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass
class CleanSplit:
    name: str
    origin: str
    examples: list  # (text, label name, row number)
    stats: dict
    conflicting: dict = field(default_factory=dict)  # text seen with another label (here or elsewhere) -> kept


@dataclass
class Prepared:
    names: list  # label names, id = index
    splits: dict  # split name -> list of PreparedExample (text, label id)
    report: dict
    train_left_out: list = field(default_factory=list)  # training rows max_train_samples left out (pretraining may read them)


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


@dataclass
class UsableRows:
    """One input's rows that can be used, before duplicates and conflicts: (text, label name, row number)."""
    rows: list
    dropped: dict  # reason -> row numbers
    undeclared: Counter  # label not in data.labels -> rows


def usable_rows(raw: RawSplit, *, labels: Optional[Iterable[str]] = None) -> UsableRows:
    """Strip texts; set aside undecodable, empty-text, missing-label and undeclared-label rows."""
    allowed = set(labels) if labels is not None else None
    dropped = {reason: [] for reason in DROP_REASONS}
    dropped["undecodable"] = list(raw.undecodable)
    undeclared, rows = Counter(), []
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
        else:
            rows.append((text, name, row))
    return UsableRows(rows=rows, dropped=dropped, undeclared=undeclared)


def kept_label(counts: Counter, first: str, policy: str) -> Optional[str]:
    """The label a conflicting text keeps under data.conflicts (None: every copy dropped)."""
    if policy == "first":
        return first
    if policy == "majority":
        (top, n), (_, second) = counts.most_common(2)
        return None if n == second else top  # 2 pos vs 2 neg: no majority, dropped
    return None  # drop


def conflict_decisions(rows: list, *, policy: str) -> dict:
    """text -> (label counts, label kept or None), for each text seen with two or more labels.

    rows: (text, label, row number) of every input, in train, validation, test order. Two passes,
    so that texts with one label (nearly all) cost a dict entry, not a Counter.
    """
    first, conflicting = {}, set()
    for text, label, _ in rows:
        if first.setdefault(text, label) != label:
            conflicting.add(text)
    counts = {text: Counter() for text in conflicting}
    for text, label, _ in rows:
        if text in counts:
            counts[text][label] += 1
    return {text: (c, kept_label(c, first[text], policy)) for text, c in counts.items()}


def dedupe(rows: list, decisions: dict, *, policy: str) -> tuple[list, list, dict, dict]:
    """One example per text: the first row with the kept label. Returns (examples, duplicate row
    numbers, conflict stats of this input, its conflicting texts -> label kept or None)."""
    examples, kept_texts, duplicates = [], set(), []
    here: dict = {}  # conflicting text -> [rows here, rows dropped here, first row here]
    for text, label, row in rows:
        if text in decisions:
            seen = here.setdefault(text, [0, 0, row])
            seen[0] += 1
            if label != decisions[text][1]:  # another label than the kept one, or the text is dropped
                seen[1] += 1
                continue
        if text in kept_texts:
            duplicates.append(row)
        else:
            kept_texts.add(text)
            examples.append((text, label, row))
    shown = sorted(here, key=lambda t: (-here[t][0], here[t][2]))[:_CONFLICT_EXAMPLES]
    stats = {
        "policy": policy,
        "texts": len(here),  # texts of this input with another label somewhere (this input or another)
        "rows": sum(n for n, _, _ in here.values()),
        "texts_dropped": sum(1 for t in here if t not in kept_texts),
        "rows_dropped": sum(d for _, d, _ in here.values()),
        "examples": [{"text": t[:_EXAMPLE_CHARS] + ("..." if len(t) > _EXAMPLE_CHARS else ""),
                      "labels": dict(decisions[t][0].most_common()), "kept": decisions[t][1],
                      "first_row": here[t][2]} for t in shown],
    }
    return examples, duplicates, stats, {t: decisions[t][1] for t in here}


def clean_split(raw: RawSplit, *, labels: Optional[Iterable[str]] = None, conflicts: str = "drop",
                usable: Optional[UsableRows] = None, decisions: Optional[dict] = None) -> CleanSplit:
    """Drop unusable rows (with reasons), resolve label conflicts, remove exact duplicate texts.

    One input alone by default; `clean_inputs` passes `usable` and the `decisions` made over all inputs.
    """
    usable = usable if usable is not None else usable_rows(raw, labels=labels)
    if decisions is None:
        decisions = conflict_decisions(usable.rows, policy=conflicts)
    examples, duplicates, conflict, conflicting = dedupe(usable.rows, decisions, policy=conflicts)
    counts = {reason: len(rows) for reason, rows in usable.dropped.items()}
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
        "dropped_rows_sample": {r: rows[:_SAMPLE_ROWS] for r, rows in usable.dropped.items() if rows},
        "duplicates_removed": len(duplicates),  # same text, same (kept) label as a row kept
        "duplicate_rows_sample": duplicates[:_SAMPLE_ROWS],
        "label_conflicts": conflict,
        "rows_kept": len(examples),
    }
    if raw.skipped:
        stats["rows_outside_task"] = raw.skipped
    if usable.undeclared:
        stats["undeclared_labels_found"] = dict(usable.undeclared.most_common(10))
    return CleanSplit(name=raw.name, origin=raw.origin, examples=examples, stats=stats, conflicting=conflicting)


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


def cap_splits(splits: dict, *, max_train: Optional[int], max_eval: Optional[int], seed: int,
               left_out: Optional[dict] = None) -> dict:
    """Stratified, seeded caps; returns rows removed per split (and puts them in `left_out`[split])."""
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
        if left_out is not None:
            kept = set(keep)
            left_out[name] = [e for i, e in enumerate(examples) if i not in kept]
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
            "conflicts": cfg.conflicts, "header": cfg.header,
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
            "conflicts_removed": sum(c.stats["label_conflicts"]["rows_dropped"] for c in cleaned.values()),
            "leakage_removed": sum(leakage.values()),
            "capped_removed": sum(capped.values()),
            "rows_out": sum(len(splits[n]) for n in SPLITS),
        },
        "warnings": warnings,
        "outputs": {**{name: f"{name}.jsonl" for name in SPLITS}, "labels": "labels.json"},
    }


def clean_inputs(source: SourceData, *, declared: Optional[list], max_drop_fraction: float,
                 conflicts: str = "drop") -> dict:
    """Every input cleaned (name -> CleanSplit); too many drops or nothing left is an error.

    Conflicts are decided over all inputs at once, so a text labelled pos in train and neg in test
    is resolved the same way in both (drop: gone from both; first: train's label).
    """
    order = [n for n in SPLITS if n in source.inputs]
    usable = {name: usable_rows(source.inputs[name], labels=declared) for name in order}
    decisions = conflict_decisions([r for n in order for r in usable[n].rows], policy=conflicts)
    cleaned = {name: clean_split(source.inputs[name], conflicts=conflicts, usable=usable[name], decisions=decisions)
               for name in order}
    for clean in cleaned.values():
        check_drop_fraction(clean, max_drop_fraction=max_drop_fraction)
    for name, clean in cleaned.items():
        if not clean.examples:
            s = clean.stats
            why = (f", {s['label_conflicts']['rows_dropped']} rows of texts with conflicting labels dropped "
                   f"(data.conflicts: {conflicts})" if s["label_conflicts"]["rows_dropped"] else "")
            raise DataError(f"{clean.origin}: split {name} is empty after cleaning "
                            f"({s['rows_read']} rows read, {s['duplicates_removed']} duplicates{why})")
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
    conflicts = conflict_warning(cleaned)
    if conflicts:
        warnings.append(conflicts)
    for name in EVAL_SPLITS:
        if leakage[name]:
            warnings.append(f"split {name}: {leakage[name]} texts also in an earlier split were removed (leakage)")
    return warnings


def conflict_warning(cleaned: dict) -> Optional[str]:
    """One line for the texts seen with different labels: how many, what became of them, the key to change."""
    found = [c for c in cleaned.values() if c.stats["label_conflicts"]["texts"]]
    if not found:
        return None
    stats = [c.stats["label_conflicts"] for c in found]
    kept = {t: label for c in found for t, label in c.conflicting.items()}  # a text in train and test counts once
    texts = len(kept)
    rows = sum(s["rows_dropped"] for s in stats)
    where = ", ".join(c.origin + (f" ({s['texts']})" if len(found) > 1 else "") for c, s in zip(found, stats))
    policy = stats[0]["policy"]
    if policy == "drop":
        what = (f"all {rows} of their rows dropped (data.conflicts: drop; majority keeps the most frequent "
                "label, first the first one)")
    elif policy == "majority":
        ties = sum(1 for label in kept.values() if label is None)
        what = (f"the most frequent label kept; {rows} rows dropped, among them every copy of the {ties} texts "
                "without a majority (data.conflicts: majority; drop removes every copy)")
    else:
        what = (f"the first label kept, {rows} rows with another label dropped (data.conflicts: first; drop "
                "removes every copy)")
    appear = "text appears" if texts == 1 else "texts appear"
    return f"{where}: {texts} {appear} with different labels: {what}; examples in the prepare report"


def prepare(cfg: DataConfig, *, cache_dir: str | Path | None = None, source: Optional[SourceData] = None,
            labelled: bool = True) -> Prepared:
    """The whole prepare stage in memory: DataConfig -> label names, id-labelled splits, report.

    labelled=False (task causal_lm): texts only; every row carries the one label TEXT_ONLY_LABEL.
    """
    declared = declared_labels(cfg.labels) if labelled else None
    source = source if source is not None else read_source(cfg, cache_dir=cache_dir, labelled=labelled)
    cleaned = clean_inputs(source, declared=declared, max_drop_fraction=cfg.max_drop_fraction,
                           conflicts=cfg.conflicts)
    try:
        splits, origin = make_splits({n: c.examples for n, c in cleaned.items()},
                                     validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed)
    except DataError as exc:  # name the file the rows came from
        raise DataError(f"{cleaned['train'].origin}: {exc}") from None
    leakage = remove_leakage(splits)
    left_out: dict = {}
    capped = cap_splits(splits, max_train=cfg.max_train_samples, max_eval=cfg.max_eval_samples, seed=cfg.seed,
                        left_out=left_out)
    names, order = label_names(splits, declared=declared, source_order=source.label_order)
    check_splits(splits, cleaned=cleaned, leakage=leakage, labelled=labelled)
    warnings = split_warnings(splits, names=names, cleaned=cleaned, leakage=leakage)
    report = build_report(source=source, cleaned=cleaned, origin=origin, leakage=leakage, capped=capped,
                          splits=splits, names=names, label_order=order, cfg=cfg, warnings=warnings)
    ids = {name: i for i, name in enumerate(names)}
    out = {name: [PreparedExample(text, ids[label]) for text, label, _ in splits[name]] for name in SPLITS}
    # every class survives the cap (one_each_from=1), so every left-out label has an id
    train_left_out = [PreparedExample(text, ids[label]) for text, label, _ in left_out.get("train", [])]
    return Prepared(names=names, splits=out, report=report, train_left_out=train_left_out)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    """Write {train,validation,test}.jsonl, train_left_out.jsonl, labels.json, report.json into out_dir, all
    or nothing."""
    out_dir = Path(out_dir)
    labels = LabelSet(names=list(prepared.names)).to_dict()
    # plain writes: atomic_dir swaps the whole directory in at once
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            (tmp / f"{name}.jsonl").write_text(prepared_split_text(prepared.splits[name]), encoding="utf-8")
        (tmp / TRAIN_LEFT_OUT_FILE).write_text(prepared_split_text(prepared.train_left_out), encoding="utf-8")
        (tmp / "labels.json").write_text(json.dumps(labels, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    return out_dir



SHOWN_CLASSES = 8  # the log's class balance line names this many classes at most (150 intents: one long line)


def class_balance_text(fractions: dict) -> str:
    """`a=50.0% b=50.0%`; many classes: the 4 largest and 4 smallest shares (report.json has all)."""
    items = sorted(fractions.items(), key=lambda kv: -kv[1])
    if len(items) <= SHOWN_CLASSES:
        return " ".join(f"{n}={f:.1%}" for n, f in fractions.items())
    half = SHOWN_CLASSES // 2
    shown = items[:half] + items[-half:]
    return (f"{len(items)} classes, largest {' '.join(f'{n}={f:.1%}' for n, f in shown[:half])} ... smallest "
            f"{' '.join(f'{n}={f:.1%}' for n, f in shown[half:])}")


def summary_lines(report: dict) -> list:
    """A short console summary of a prepare report."""
    src = report["source"]
    spec = src.get("spec") or ", ".join(f"{k}={v}" for k, v in src.get("files", {}).items())
    names = report["labels"]["names"]
    lines = [f"prepared {spec}: labels {', '.join(f'{i}={n}' for i, n in enumerate(names))}"]
    for name, s in report["inputs"].items():
        drops = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in s["dropped"].items() if n) or "none"
        conflict = s["label_conflicts"]
        conflicts = (f"; conflicting labels {conflict['texts']} texts, {conflict['rows_dropped']} rows dropped "
                     f"(data.conflicts: {conflict['policy']})" if conflict["texts"] else "")
        lines.append(f"  read {name}: {s['rows_read']} rows from {s['origin']}; dropped {s['dropped_total']} "
                     f"({drops}); duplicates {s['duplicates_removed']}{conflicts}")
        for example in conflict["examples"][:3]:
            text = example["text"] if len(example["text"]) <= 60 else example["text"][:57] + "..."
            labels = ", ".join(f"{label} x{n}" for label, n in example["labels"].items())
            kept = f"kept {example['kept']}" if example["kept"] is not None else "dropped"
            lines.append(f"    conflict at row {example['first_row']}: {text!r} ({labels}) -> {kept}")
    for name, s in report["splits"].items():
        bal = class_balance_text(s["class_balance"]["fractions"])
        extra = []
        if s["leakage_removed"]:
            extra.append(f"leakage -{s['leakage_removed']}")
        if s["capped_removed"]:
            extra.append(f"capped -{s['capped_removed']}")
        lines.append(f"  {name:<10} {s['rows']:>7} rows  {bal}" + (f"  ({', '.join(extra)})" if extra else ""))
    return lines
