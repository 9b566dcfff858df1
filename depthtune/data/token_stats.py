"""The `tokenization` stage's logic: prepared JSONL splits -> tokenized DatasetDict + length stats.

Texts are tokenized with the model's fast tokenizer, truncated at `train.max_length`,
never padded (the training collator pads per batch). Saved columns:
  input_ids (int32 list), attention_mask (int8 list), token_type_ids (int8 list, when the
  tokenizer makes them), labels (ClassLabel: int ids with the names from labels.json),
  length (int32: tokens kept, special tokens included).
Token-length stats per split (of the kept lengths, plus the untruncated lengths and the
fraction truncated) go to report.json next to the dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from depthtune.data import coverage as vocab
from depthtune.errors import DataError
from depthtune.files import atomic_dir
from depthtune.layout import SPLITS
from depthtune.records import PROMPT_SEP, LabelSet, read_prepared_split
from depthtune.data.tokenized import encode_pair

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TRUNCATION_WARN_FRACTION = 0.05
# Rows per worker process below which a process pool costs more than it saves. The fast
# tokenizer already encodes each batch on all cores: on 2 cores, SST-2 train (60k rows)
# took 3.2 s in-process and 3.3 s with 2 workers, so only very large splits get workers.
MIN_ROWS_PER_PROC = 50_000
REPORT_VERSION = 1
_UNTRUNCATED = "untruncated_length"
_UNK = "unk_tokens"


@dataclass
class PreparedSplits:
    """The prepare stage's output, ready to tokenize."""
    splits: object  # datasets.DatasetDict: columns text, label (ClassLabel with the names below)
    names: list  # label names, id = index
    fingerprints: dict  # split -> "prepared-<split>-<sha256 of its file, 16 hex>": the datasets fingerprint


def load_prepared(prepared_dir: str | Path) -> PreparedSplits:
    """data/prepared -> PreparedSplits; every line is checked (depthtune.records)."""
    import datasets
    import pyarrow as pa

    prepared_dir = Path(prepared_dir)
    names = LabelSet.read(prepared_dir / "labels.json").names
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    splits, fingerprints = {}, {}
    for name in SPLITS:
        path = prepared_dir / f"{name}.jsonl"
        rows = read_prepared_split(path, len(names))
        fingerprints[name] = f"prepared-{name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        table = pa.Table.from_pydict({"text": [r.text for r in rows], "label": [r.label for r in rows]},
                                     schema=features.arrow_schema)
        # The fingerprint is given, so datasets does not hash the table itself: that hash pickles
        # the table with dill, which disassembles functions to stdout (a bytecode dump in the log
        # when stdout is a Prefect print logger) and reads every row once more.
        splits[name] = datasets.Dataset(table, info=datasets.DatasetInfo(features=features),
                                        fingerprint=fingerprints[name])
    return PreparedSplits(splits=datasets.DatasetDict(splits), names=names, fingerprints=fingerprints)


def choose_num_proc(num_rows: int, *, max_procs: Optional[int] = None,
                    min_rows_per_proc: int = MIN_ROWS_PER_PROC) -> int:
    """Worker processes worth starting for `num_rows` (1 = in-process)."""
    cores = max_procs if max_procs is not None else (len(os.sched_getaffinity(0))
                                                     if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, min(cores, num_rows // max(1, min_rows_per_proc)))


def _encode(batch, tokenizer, max_length, keys, unk_id):
    texts = batch["text"]
    enc = tokenizer(texts, truncation=False, padding=False, verbose=False)
    full = [len(ids) for ids in enc["input_ids"]]
    # vocabulary coverage: [UNK]s in the whole text (list.count runs in C: no measurable cost)
    n_unk = [ids.count(unk_id) for ids in enc["input_ids"]] if unk_id is not None else [0] * len(texts)
    long = [i for i, n in enumerate(full) if n > max_length]
    out = {k: list(enc[k]) for k in keys}
    # bits per byte (causal_lm) divides by the UTF-8 bytes a model saw: a truncated text's are those of its kept tokens
    out["n_bytes"] = [len(t.encode("utf-8")) for t in texts]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length, padding=False,
                        verbose=False)
        for j, i in enumerate(long):
            for k in keys:
                out[k][i] = cut[k][j]
            out["n_bytes"][i] = len(tokenizer.decode(cut["input_ids"][j], skip_special_tokens=True).encode("utf-8"))
    out["loss_start"] = [0] * len(texts)  # causal_lm: every token is trained on, except in prompt/completion pairs
    for i, text in enumerate(texts):
        if PROMPT_SEP in text:  # prompt/completion (task causal_lm): only the completion's tokens count
            prompt, completion = text.split(PROMPT_SEP, 1)
            pair = encode_pair(tokenizer, prompt, completion, max_length)
            out["input_ids"][i], out["loss_start"][i], out["n_bytes"][i] = (pair["input_ids"], pair["loss_start"],
                                                                             pair["n_bytes"])
            for k in keys[1:]:  # attention_mask: all ones; token_type_ids: all zeros (one segment)
                out[k][i] = [1 if k == "attention_mask" else 0] * len(pair["input_ids"])
            full[i] = pair["untruncated_length"]
    out["labels"] = batch["label"]
    out["length"] = [len(ids) for ids in out["input_ids"]]
    out[_UNTRUNCATED] = full
    out[_UNK] = n_unk
    return out


def _percentile(sorted_values, q: float) -> float:
    import numpy as np

    return float(np.percentile(sorted_values, q)) if len(sorted_values) else 0.0


def length_stats(lengths, untruncated, *, max_length: int) -> dict:
    """Token-length stats for one split (lengths in tokens, special tokens included)."""
    import numpy as np

    kept = np.asarray(lengths)
    full = np.asarray(untruncated)
    n = int(kept.size)
    truncated = int((full > max_length).sum())
    return {
        "rows": n,
        "mean": round(float(kept.mean()), 2) if n else 0.0,
        "p50": round(_percentile(kept, 50), 1),
        "p95": round(_percentile(kept, 95), 1),
        "max": int(kept.max()) if n else 0,
        "min": int(kept.min()) if n else 0,
        "tokens": int(kept.sum()),
        "truncated": truncated,
        "fraction_truncated": round(truncated / n, 4) if n else 0.0,
        "untruncated": {
            "mean": round(float(full.mean()), 2) if n else 0.0,
            "p95": round(_percentile(full, 95), 1),
            "max": int(full.max()) if n else 0,
        },
    }


def tokenize_splits(dsd, tokenizer, *, max_length: int, fingerprints: dict, num_proc: Optional[int] = None,
                    min_rows_per_proc: int = MIN_ROWS_PER_PROC, batch_size: int = 1000):
    """DatasetDict(text, label) -> (tokenized DatasetDict, {split: length stats}, {split: workers}).

    `fingerprints` (split -> the input's fingerprint) and the tokenizer name the outputs' fingerprints.
    """
    import datasets

    probe = tokenizer(["a"], truncation=True, max_length=max_length)
    keys = [k for k in MODEL_INPUTS if k in probe]
    label_feature = dsd[next(iter(dsd))].features["label"]
    feats = {"input_ids": datasets.List(datasets.Value("int32"))}
    for k in keys[1:]:
        feats[k] = datasets.List(datasets.Value("int8"))
    feats.update({"labels": label_feature, "length": datasets.Value("int32"), "n_bytes": datasets.Value("int32"),
                  "loss_start": datasets.Value("int32"),
                  _UNTRUNCATED: datasets.Value("int32"), _UNK: datasets.Value("int32")})
    features = datasets.Features(feats)
    unk_id = vocab.unk_token_id(tokenizer)
    specials = tokenizer.num_special_tokens_to_add()  # [CLS] .. [SEP]: not text, not counted in the unk share
    tok_id = f"{getattr(tokenizer, 'name_or_path', '')}|{type(tokenizer).__name__}|{len(tokenizer)}|{max_length}"
    out, stats, workers = {}, {}, {}
    for name, ds in dsd.items():
        procs = num_proc if num_proc is not None else choose_num_proc(ds.num_rows,
                                                                      min_rows_per_proc=min_rows_per_proc)
        procs = max(1, min(procs, ds.num_rows))
        fp = hashlib.sha256(f"{fingerprints[name]}|{tok_id}".encode()).hexdigest()[:16]
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        if procs > 1:
            # forked workers inherit a tokenizer whose thread pool has run: keep them single-threaded
            # (otherwise tokenizers warns and may deadlock); restored for the in-process splits
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            mapped = ds.map(
                _encode, batched=True, batch_size=batch_size, num_proc=procs if procs > 1 else None,
                fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "keys": keys, "unk_id": unk_id},
                remove_columns=ds.column_names, features=features, load_from_cache_file=False,
                new_fingerprint=f"tokenized-{fp}", desc=f"tokenizing {name} ({procs} proc)",
            )
        finally:
            if procs > 1:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        table = mapped.data
        stats[name] = length_stats(table.column("length").to_numpy(), table.column(_UNTRUNCATED).to_numpy(),
                                   max_length=max_length)
        untruncated = int(table.column(_UNTRUNCATED).to_numpy().sum())
        stats[name]["unk_tokens"] = int(table.column(_UNK).to_numpy().sum())
        stats[name]["text_tokens"] = max(0, untruncated - specials * ds.num_rows)
        out[name] = mapped.remove_columns([_UNTRUNCATED, _UNK], new_fingerprint=f"tokenized-{fp}-final")
        workers[name] = procs
    return datasets.DatasetDict(out), stats, workers


def tokenizer_info(tokenizer, *, source: str) -> dict:
    return {
        "source": source,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "is_fast": bool(getattr(tokenizer, "is_fast", False)),
        "vocab_size": len(tokenizer),
        "model_max_length": int(tokenizer.model_max_length) if tokenizer.model_max_length < 10**9 else None,
    }


def build_report(*, stats: dict, workers: dict, tokenizer: dict, max_length: int, names: list,
                 columns: list, coverage: Optional[dict] = None, coverage_warnings: Optional[list] = None) -> dict:
    warnings = list(coverage_warnings or [])
    for name, s in stats.items():
        if s["fraction_truncated"] > TRUNCATION_WARN_FRACTION:
            warnings.append(f"{name}: {s['fraction_truncated']:.1%} of texts truncated at max_length {max_length} "
                            f"(untruncated p95 {s['untruncated']['p95']:.0f} tokens); consider raising "
                            "train.max_length")
    mml = tokenizer.get("model_max_length")
    if mml and max_length > mml:
        warnings.append(f"train.max_length {max_length} exceeds the tokenizer's model_max_length {mml}")
    return {
        "report_version": REPORT_VERSION,
        "tokenizer": tokenizer,
        "max_length": max_length,
        "padding": False,
        "columns": columns,
        "labels": names,
        "splits": stats,
        "num_proc": workers,
        "coverage": coverage or {},
        "warnings": warnings,
    }


def write_tokenized(dsd, report: dict, out_dir: str | Path) -> Path:
    """save_to_disk + report.json into out_dir, all or nothing."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        dsd.save_to_disk(str(tmp))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def measure_coverage(splits, stats: dict, tokenizer) -> dict:
    """{split: coverage record} (depthtune.data.coverage) from the texts and the [UNK] counts in `stats`."""
    cache: dict = {}  # char -> uncovered, shared by the splits: each distinct character is tokenized once
    return {name: vocab.split_coverage(ds.data.column("text").to_pylist(), unk_tokens=stats[name]["unk_tokens"],
                                       tokens=stats[name]["text_tokens"], tokenizer=tokenizer, cache=cache)
            for name, ds in splits.items()}


def run(prepared_dir: str | Path, tokenizer, *, max_length: int, tokenizer_source: str,
        num_proc: Optional[int] = None, max_unk_fraction: float = 0.2):
    """Load, tokenize, report (in memory): -> (DatasetDict, report).

    Raises DataError (nothing written yet) when more than `max_unk_fraction` of a split's tokens or
    characters are unknown to the tokenizer: a model that cannot read its text scores noise."""
    prepared = load_prepared(prepared_dir)
    tokenized, stats, workers = tokenize_splits(prepared.splits, tokenizer, max_length=max_length,
                                                fingerprints=prepared.fingerprints, num_proc=num_proc)
    coverage = measure_coverage(prepared.splits, stats, tokenizer)
    warnings, refusal = vocab.check(coverage, source=tokenizer_source, max_fraction=max_unk_fraction)
    if refusal:
        raise DataError(refusal)
    info = tokenizer_info(tokenizer, source=tokenizer_source)
    columns = list(tokenized["train"].column_names)
    return tokenized, build_report(stats=stats, workers=workers, tokenizer=info, max_length=max_length,
                                   names=prepared.names, columns=columns, coverage=coverage,
                                   coverage_warnings=warnings)


def summary_lines(report: dict) -> list:
    tok = report["tokenizer"]
    lines = [f"tokenized with {tok['source']} ({tok['class']}, vocab {tok['vocab_size']}), "
             f"max_length {report['max_length']}, no padding"]
    for name, s in report["splits"].items():
        lines.append(f"  {name:<10} {s['rows']:>7} rows  tokens mean {s['mean']:.1f} p50 {s['p50']:.0f} "
                     f"p95 {s['p95']:.0f} max {s['max']}  truncated {s['fraction_truncated']:.1%}")
    coverage = report.get("coverage", {})
    if coverage and vocab.worst(coverage)[2] == 0:
        lines.append("  vocabulary coverage: no unknown tokens, every character representable")
    else:
        lines += [f"  coverage {vocab.describe(name, c)}" for name, c in coverage.items()]
    return lines


def warn(report: dict, stream=None) -> None:
    stream = stream or sys.stderr
    for w in report["warnings"]:
        print(f"warning: {w}", file=stream)
