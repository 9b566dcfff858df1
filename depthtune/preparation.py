"""The `prepare` stage's logic: read labelled text, clean it, split it, cap it, report it.

Pure functions (no orchestrator, no global state); `stages/prepare.py` is the thin
command-line wrapper and `write_prepared` the only function that touches the disk.

Sources (the `data` section of params.yaml):
- `data.files: {train: a, validation: b, test: c}`: splits that come made (missing
  validation/test are split off train);
- `data.source`: one local file, split into train/validation/test;
  `builtin:rotten_tomatoes` (see `depthtune.builtin_data`); or `hub:<dataset id>`.
Relative paths are relative to the working directory (the project root under DVC).

Formats: csv, tsv, jsonl (also a .json array of objects), parquet, and `labeltext`
(one `<label> <text>` example a line, label = first whitespace-separated token).
`auto` infers from the extension: .csv .tsv/.tab .jsonl/.json/.ndjson .parquet/.pq,
anything else labeltext.

Pipeline, in this order:
1. read every input (rows read; rows whose text/label bytes do not decode in
   `data.encoding` are dropped as `undecodable`);
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

import codecs
import csv
import io
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from depthtune.config import DataConfig
from depthtune.errors import DataError
from depthtune.files import atomic_dir

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")
DROP_REASONS = ("undecodable", "empty_text", "missing_label", "undeclared_label")
FORMATS = ("csv", "tsv", "jsonl", "parquet", "labeltext")
EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}
REPORT_VERSION = 1
_SAMPLE_ROWS = 5  # row numbers listed per drop reason in the report
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that did not decode (surrogateescape)
_INT_RE = re.compile(r"^[+-]?\d+$")
_MAGIC = (
    (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"PAR1", "Parquet"), (b"\x89PNG", "PNG"), (b"%PDF", "PDF"), (b"\x7fELF", "ELF"),
    (b"\x28\xb5\x2f\xfd", "zstd"), (b"ARROW1", "Arrow"), (b"SQLite format 3\x00", "SQLite"),
)


# ----------------------------------------------------------------------------- data types


@dataclass
class RawSplit:
    """One input as read: rows of (row number, text or None, label or None)."""
    name: str
    origin: str  # file path, builtin:..., hub:...
    format: str
    rows: list = field(default_factory=list)
    undecodable: list = field(default_factory=list)  # row numbers dropped at read time
    columns: list = field(default_factory=list)
    skipped: int = 0  # rows outside the task (builtin `plot` rows), not counted as read

    @property
    def rows_read(self) -> int:
        return len(self.rows) + len(self.undecodable)


@dataclass
class SourceData:
    inputs: dict  # split name -> RawSplit (train always present)
    label_order: Optional[tuple] = None  # the source's own documented order, if any
    info: dict = field(default_factory=dict)  # kind, spec, provenance


@dataclass
class CleanSplit:
    name: str
    origin: str
    examples: list  # (text, label name, row number)
    stats: dict


@dataclass
class Prepared:
    names: list  # label names, id = index
    splits: dict  # split name -> list of (text, label id)
    report: dict


# ----------------------------------------------------------------------------- helpers


def normalize_label(value) -> Optional[str]:
    """A label value from any format -> its string name, or None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    return text or None


def _normalize_text(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if isinstance(value, str) else str(value)


def _has_undecodable(*values) -> bool:
    return any(isinstance(v, str) and _SURROGATE.search(v) for v in values)


def sort_labels(found: Iterable[str]) -> list:
    found = sorted(set(found))
    if found and all(_INT_RE.match(x) for x in found):
        return sorted(found, key=int)
    return found


def infer_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"data.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        return fmt
    return EXTENSIONS.get(Path(path).suffix.lower(), "labeltext")


def is_hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")


# A physical line longer than this is a file without line breaks (or the wrong file), not one
# example: refused while streaming, before the file is read whole (reading it whole would cost
# ~10x its size in memory: bytes, str, the csv module's copies).
MAX_LINE_BYTES = 8 << 20
_CHUNK_BYTES = 1 << 20


def check_line_lengths(path: Path, *, fmt: str, encoding: str, limit: int = MAX_LINE_BYTES) -> None:
    """Stream the file once, 1 MiB at a time (bounded memory): refuse a binary file or a line above `limit` bytes."""
    with open(path, "rb") as fh:
        line, carry = 1, 0  # current line number, bytes of it seen so far
        chunk = fh.read(_CHUNK_BYTES)
        if chunk:
            check_not_binary(path, chunk[:65536], fmt=fmt, encoding=encoding)
            if fmt == "jsonl" and chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
                return  # one JSON array: a single line by design
        while chunk:
            first = chunk.find(b"\n")
            if first >= 0 and carry + first <= limit:
                line += chunk.count(b"\n")
                carry = len(chunk) - chunk.rfind(b"\n") - 1
            else:
                carry += len(chunk) if first < 0 else first
            if carry > limit:
                raise DataError(f"{path}: line {line} is longer than {limit >> 20} MiB (reading stopped there); "
                                "expected one example per line: check data.format and the file's line breaks")
            chunk = fh.read(_CHUNK_BYTES)


def _read_bytes(path: Path, *, fmt: Optional[str] = None, encoding: str = "utf-8") -> bytes:
    _check_file(path)
    try:
        if fmt is not None:
            check_line_lengths(path, fmt=fmt, encoding=encoding)
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def check_not_binary(path: str | Path, head: bytes, *, fmt: str, encoding: str) -> None:
    """Refuse a compressed/binary file given as text (a NUL byte or a known magic number)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if magic == b"BZh" and not head[4:10] == b"1AY&SY":
                continue
            raise DataError(f"{path}: is a binary file ({kind}), not {fmt} text; "
                            "check data.format / the file")
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    if not wide and b"\x00" in head[:65536]:
        raise DataError(f"{path}: is a binary file (NUL bytes), not {fmt} text; "
                        "check data.format / data.encoding")


def _decode(path: Path, data: bytes, *, fmt: str, encoding: str) -> str:
    check_not_binary(path, data[:65536], fmt=fmt, encoding=encoding)
    text = data.decode(encoding, errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _lines(text: str):
    """(line number, line) on '\\n' only: str.splitlines would also split on NEL (\\x85),
    which occurs inside latin-1 texts."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line[:-1] if line.endswith("\r") else line


def _missing_column(path, kind: str, column: str, found: list, key: str) -> DataError:
    listed = ", ".join(map(str, found)) if found else "none"
    hint = ""
    if len(found) == 1 and any(d in str(found[0]) for d in ",;\t|"):
        hint = " (one column: check data.delimiter / data.format)"
    return DataError(f"{path}: no {kind} column {column!r} (data.{key}); columns found: {listed}{hint}")


# ----------------------------------------------------------------------------- readers


def read_labeltext(path: str | Path, *, encoding: str = "utf-8", name: str = "train") -> RawSplit:
    """One `<label> <text>` example a line; blank lines are skipped."""
    path = Path(path)
    text = _decode(path, _read_bytes(path, fmt="labeltext", encoding=encoding), fmt="labeltext", encoding=encoding)
    out = RawSplit(name=name, origin=str(path), format="labeltext", columns=["label", "text"])
    for number, line in _lines(text):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        label = parts[0]
        body = parts[1] if len(parts) > 1 else ""
        if _has_undecodable(label, body):
            out.undecodable.append(number)
        else:
            out.rows.append((number, body, label))
    return out


def read_delimited(path: str | Path, *, text_column: str, label_column: str, delimiter: Optional[str] = None,
                   quoting: bool = True, encoding: str = "utf-8", fmt: str = "csv",
                   name: str = "train") -> RawSplit:
    """CSV/TSV with a header row. A row with another number of fields than the header is an error."""
    path = Path(path)
    delim = delimiter if delimiter is not None else ("\t" if fmt == "tsv" else ",")
    if len(delim) != 1:
        raise DataError(f"data.delimiter: expected one character, got {delim!r}")
    text = _decode(path, _read_bytes(path, fmt=fmt, encoding=encoding), fmt=fmt, encoding=encoding)
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    out = RawSplit(name=name, origin=str(path), format=fmt)
    header = None
    data_row = 0
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip() and header is not None
                              and len(header) > 1):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in record]
                out.columns = header
                if text_column not in header:
                    raise _missing_column(path, "text", text_column, header, "text_column")
                if label_column not in header:
                    raise _missing_column(path, "label", label_column, header, "label_column")
                ti, li = header.index(text_column), header.index(label_column)
                continue
            data_row += 1
            if len(record) != len(header):
                hint = ("texts may contain the delimiter" if not quoting else
                        "set data.quoting: false if texts contain quote characters")
                raise DataError(f"{path}: row {data_row} (line {reader.line_num}) has {len(record)} fields, "
                                f"expected {len(header)} like the header ({', '.join(header)}); {hint}")
            body, label = record[ti], record[li]
            if _has_undecodable(body, label):
                out.undecodable.append(reader.line_num)
            else:
                out.rows.append((reader.line_num, body, label))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed {fmt.upper()} ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty file, expected a header row naming the columns")
    return out


def read_jsonl(path: str | Path, *, text_column: str, label_column: str, encoding: str = "utf-8",
               name: str = "train") -> RawSplit:
    """JSON Lines (one object a line), or a .json file holding one array of objects."""
    path = Path(path)
    text = _decode(path, _read_bytes(path, fmt="jsonl", encoding=encoding), fmt="jsonl", encoding=encoding)
    records = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        for i, obj in enumerate(array, start=1):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: element {i}: expected a JSON object, got {type(obj).__name__}")
            records.append((i, obj))
    else:
        for number, line in _lines(text):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
            records.append((number, obj))
    columns: dict = {}
    for _, obj in records:
        for key in obj:
            columns.setdefault(key, None)
    out = RawSplit(name=name, origin=str(path), format="jsonl", columns=list(columns))
    if records:
        if text_column not in columns:
            raise _missing_column(path, "text", text_column, list(columns), "text_column")
        if label_column not in columns:
            raise _missing_column(path, "label", label_column, list(columns), "label_column")
    for number, obj in records:
        body, label = obj.get(text_column), obj.get(label_column)
        if _has_undecodable(body, label):
            out.undecodable.append(number)
        else:
            out.rows.append((number, _normalize_text(body), label))
    return out


def read_parquet(path: str | Path, *, text_column: str, label_column: str, name: str = "train") -> RawSplit:
    import pyarrow.parquet as pq

    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head != b"PAR1":
        raise DataError(f"{path}: not a Parquet file (no PAR1 magic); check data.format")
    try:
        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)
        if text_column not in columns:
            raise _missing_column(path, "text", text_column, columns, "text_column")
        if label_column not in columns:
            raise _missing_column(path, "label", label_column, columns, "label_column")
        table = pf.read(columns=list(dict.fromkeys([text_column, label_column])))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    texts = table.column(text_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    out = RawSplit(name=name, origin=str(path), format="parquet", columns=columns)
    out.rows = [(i, _normalize_text(t), lab) for i, (t, lab) in enumerate(zip(texts, labels), start=1)]
    return out


def read_file(path: str | Path, *, format: str = "auto", text_column: str = "text", label_column: str = "label",
              delimiter: Optional[str] = None, quoting: bool = True, encoding: str = "utf-8",
              name: str = "train") -> RawSplit:
    """Read one local file of labelled text in any supported format."""
    fmt = infer_format(path, format)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    if fmt == "labeltext":
        return read_labeltext(path, encoding=encoding, name=name)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, text_column=text_column, label_column=label_column, delimiter=delimiter,
                              quoting=quoting, encoding=encoding, fmt=fmt, name=name)
    if fmt == "jsonl":
        return read_jsonl(path, text_column=text_column, label_column=label_column, encoding=encoding, name=name)
    return read_parquet(path, text_column=text_column, label_column=label_column, name=name)


_HUB_SPLITS = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "test": "test"}


def read_hub(dataset_id: str, *, config_name: Optional[str] = None, text_column: str = "text",
             label_column: str = "label") -> SourceData:
    """`datasets.load_dataset(dataset_id, config_name)`; refused at once when the Hub is offline."""
    spec = f"hub:{dataset_id}"
    if not dataset_id:
        raise DataError("data.source: 'hub:' needs a dataset id, e.g. hub:stanfordnlp/sst2")
    if is_hub_offline():
        raise DataError(f"data.source: {spec} needs the Hugging Face Hub, which is switched off here "
                        "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); use a local file or builtin:rotten_tomatoes")
    import datasets

    try:
        dsd = datasets.load_dataset(dataset_id, config_name)
    except Exception as exc:  # network, missing dataset, bad config: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"data.source: cannot load {spec}"
                        f"{f' (config {config_name})' if config_name else ''}: {first}") from None
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    inputs, label_order, ignored = {}, None, []
    for hub_split, ds in dsd.items():
        name = _HUB_SPLITS.get(hub_split)
        if name is None or name in inputs:
            ignored.append(hub_split)
            continue
        where = f"{spec} split {hub_split}"
        if text_column not in ds.column_names:
            raise _missing_column(where, "text", text_column, ds.column_names, "text_column")
        if label_column not in ds.column_names:
            raise _missing_column(where, "label", label_column, ds.column_names, "label_column")
        feature = ds.features[label_column]
        names = getattr(feature, "names", None)  # ClassLabel
        labels = ds[label_column]
        if names:
            label_order = tuple(str(n) for n in names)
            labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else None for v in labels]
        raw = RawSplit(name=name, origin=f"{spec}[{hub_split}]", format="hub", columns=list(ds.column_names))
        raw.rows = [(i, _normalize_text(t), lab) for i, (t, lab) in enumerate(zip(ds[text_column], labels), start=1)]
        inputs[name] = raw
    if "train" not in inputs:
        raise DataError(f"data.source: {spec} has no train split (splits: {', '.join(dsd)})")
    info = {"kind": "hub", "spec": spec, "config": config_name, "ignored_splits": ignored}
    return SourceData(inputs=inputs, label_order=label_order, info=info)


def read_builtin(name: str, *, cache_dir: str | Path | None = None) -> SourceData:
    from depthtune import builtin_data

    if name != builtin_data.NAME:
        raise DataError(f"data.source: unknown builtin dataset {name!r}, known: builtin:{builtin_data.NAME}")
    loaded = builtin_data.load_rows(cache_dir)
    raw = RawSplit(name="train", origin=f"builtin:{name}", format="csv", columns=loaded.columns,
                   rows=loaded.rows, skipped=loaded.rows_skipped)
    provenance = {k: v for k, v in loaded.provenance.items() if k not in ("cache_path", "from_cache")}
    info = {"kind": "builtin", "spec": f"builtin:{name}", "provenance": provenance,
            "cache_path": loaded.provenance["cache_path"], "from_cache": loaded.provenance["from_cache"]}
    return SourceData(inputs={"train": raw}, label_order=builtin_data.LABELS, info=info)


def read_source(cfg: DataConfig, *, cache_dir: str | Path | None = None) -> SourceData:
    """The configured data as raw inputs: `data.files` if given, else `data.source`."""
    opts = dict(format=cfg.format, text_column=cfg.text_column, label_column=cfg.label_column,
                delimiter=cfg.delimiter, quoting=cfg.quoting, encoding=cfg.encoding)
    if cfg.files:
        unknown = [k for k in cfg.files if k not in SPLITS]
        if unknown:
            raise DataError(f"data.files.{unknown[0]}: unknown split, expected {', '.join(SPLITS)}")
        if "train" not in cfg.files:
            raise DataError("data.files: needs a train file (validation/test are split off train when missing)")
        inputs = {}
        for name in SPLITS:
            if name in cfg.files:
                path = cfg.files[name]
                if not isinstance(path, str) or not path.strip():
                    raise DataError(f"data.files.{name}: expected a file path, got {path!r}")
                inputs[name] = read_file(Path(path).expanduser(), name=name, **opts)
        info = {"kind": "files", "files": {k: str(v) for k, v in cfg.files.items()}}
        return SourceData(inputs=inputs, info=info)
    source = (cfg.source or "").strip()
    if not source:
        raise DataError("data.source: empty; give a file path, builtin:rotten_tomatoes or hub:<dataset id>")
    if source.startswith("builtin:"):
        return read_builtin(source[len("builtin:"):], cache_dir=cache_dir)
    if source.startswith("hub:"):
        return read_hub(source[len("hub:"):].strip(), config_name=cfg.hub_config,
                        text_column=cfg.text_column, label_column=cfg.label_column)
    raw = read_file(Path(source).expanduser(), name="train", **opts)
    return SourceData(inputs={"train": raw}, info={"kind": "file", "spec": source})


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


def stratified_sample(labels: list, n: int, *, rng: random.Random) -> list:
    """Indices of `n` items whose class proportions match `labels`' as closely as possible.

    Per class, floor(n * share) items, then the remaining slots to the largest
    fractional remainders (ties by class name); items within a class at random.
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
    chosen = []
    for c in classes:
        idx = list(by_class[c])
        rng.shuffle(idx)
        chosen.extend(idx[:take[c]])
    return sorted(chosen)


def split_off(examples: list, *, fractions: dict, seed: int) -> tuple[list, dict]:
    """Split `fractions` (name -> share of all rows) off `examples`, stratified by label.

    Returns (what is left, {name: split}). Each split made gets at least one row.
    """
    rng = random.Random(f"{seed}:split")
    total = len(examples)
    sizes = {name: max(1, round(frac * total)) for name, frac in fractions.items()}
    if total - sum(sizes.values()) < 1:
        wanted = ", ".join(f"{n} {fractions[n]}" for n in fractions)
        raise DataError(f"split: {total} train rows are too few to split off {wanted}; "
                        "provide more data or the splits as data.files")
    rest, made = list(examples), {}
    for name in sorted(fractions, key=lambda n: SPLITS.index(n), reverse=True):  # test first, then validation
        picked = set(stratified_sample([e[1] for e in rest], sizes[name], rng=rng))
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
        keep = stratified_sample([e[1] for e in examples], cap, rng=rng)
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


def prepare(cfg: DataConfig, *, cache_dir: str | Path | None = None, source: Optional[SourceData] = None) -> Prepared:
    """The whole prepare stage in memory: DataConfig -> label names, id-labelled splits, report."""
    declared = declared_labels(cfg.labels)
    source = source if source is not None else read_source(cfg, cache_dir=cache_dir)
    cleaned = {}
    for name, raw in source.inputs.items():
        clean = clean_split(raw, labels=declared)
        check_drop_fraction(clean, max_drop_fraction=cfg.max_drop_fraction)
        cleaned[name] = clean
    for name, clean in cleaned.items():
        if not clean.examples:
            raise DataError(f"{clean.origin}: split {name} is empty after cleaning "
                            f"({clean.stats['rows_read']} rows read, {clean.stats['duplicates_removed']} duplicates)")
    try:
        splits, origin = make_splits({n: c.examples for n, c in cleaned.items()},
                                     validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed)
    except DataError as exc:  # name the file the rows came from
        raise DataError(f"{cleaned['train'].origin}: {exc}") from None
    leakage = remove_leakage(splits)
    capped = cap_splits(splits, max_train=cfg.max_train_samples, max_eval=cfg.max_eval_samples, seed=cfg.seed)
    names, order = label_names(splits, declared=declared, source_order=source.label_order)

    where = {n: (cleaned[n].origin if n in cleaned else f"{cleaned['train'].origin} (split {n})") for n in SPLITS}
    for name in SPLITS:
        if not splits[name]:
            why = f", {leakage[name]} rows removed as also in an earlier split" if leakage[name] else ""
            raise DataError(f"{where[name]}: split {name} is empty{why}")
    train_classes = sorted({e[1] for e in splits["train"]})
    if len(train_classes) < 2:
        raise DataError(f"{where['train']}: fewer than 2 classes remain in train after cleaning "
                        f"(found: {', '.join(map(repr, train_classes)) or 'none'})")
    warnings = []
    for name in SPLITS:
        present = {e[1] for e in splits[name]}
        missing = [n for n in names if n not in present]
        if missing:
            warnings.append(f"split {name} has no examples of {', '.join(map(repr, missing))}")
    for name, clean in cleaned.items():
        if clean.stats["duplicate_label_conflicts"]:
            warnings.append(f"{clean.origin}: {clean.stats['duplicate_label_conflicts']} duplicate texts had "
                            "another label than their first occurrence (first kept)")
    for name in EVAL_SPLITS:
        if leakage[name]:
            warnings.append(f"split {name}: {leakage[name]} texts also in an earlier split were removed (leakage)")

    report = build_report(source=source, cleaned=cleaned, origin=origin, leakage=leakage, capped=capped,
                          splits=splits, names=names, label_order=order, cfg=cfg, warnings=warnings)
    ids = {name: i for i, name in enumerate(names)}
    out = {name: [(text, ids[label]) for text, label, _ in splits[name]] for name in SPLITS}
    return Prepared(names=names, splits=out, report=report)


# Characters that str.splitlines() (and some JSONL readers) take as line breaks but
# json.dumps(ensure_ascii=False) leaves raw: escape them so one example stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_text(examples: list) -> str:
    """One {"text", "label"} object a line; UTF-8, non-ASCII kept readable."""
    return "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"
                   for t, y in examples)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    """Write {train,validation,test}.jsonl, labels.json, report.json into out_dir, all or nothing."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            (tmp / f"{name}.jsonl").write_text(jsonl_text(prepared.splits[name]), encoding="utf-8")
        # plain writes: the whole directory is swapped in atomically
        (tmp / "labels.json").write_text(json.dumps({"names": prepared.names}, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
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
