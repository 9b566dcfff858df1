"""Reading labelled text for the `prepare` stage: files, the builtin data, the Hub -> raw rows.

Sources (the `data` section of params.yaml):
- `data.files: {train: a, validation: b, test: c}`: splits that come made (missing
  validation/test are split off train by `depthtune.data.preparation`);
- `data.source`: one local file, split into train/validation/test;
  `builtin:rotten_tomatoes` (see `depthtune.data.builtin_data`); or `hub:<dataset id>`.
Relative paths are relative to the working directory (the project root under DVC).

Formats: csv, tsv, jsonl (also a .json array of objects), parquet, and `labeltext`
(one `<label> <text>` example a line, label = first whitespace-separated token).
`auto` infers from the extension: .csv .tsv/.tab .jsonl/.json/.ndjson .parquet/.pq,
anything else labeltext. A csv/tsv file has a header row naming the columns, unless
`data.header: false`: then every row is data and the columns are named by position,
"0", "1", ... (`text_column: "0"`, `label_column: "1"`; quoted in YAML, names are strings).

Every reader returns rows as read, (row number, text or None, label or None); rows
whose text/label bytes do not decode in `data.encoding` are set aside as undecodable
(decoded with surrogateescape, so one bad byte costs one row, not the file). A file
that cannot be the data (missing, binary, no line breaks, a missing column, ragged
CSV rows) is a one-line DataError naming the file, the row and the option to check.
Cleaning, splitting and capping are `depthtune.data.preparation`'s.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from depthtune.data import builtin_data
from depthtune.config import DataConfig
from depthtune.errors import DataError, first_line
from depthtune.layout import SPLITS
from depthtune.records import PROMPT_SEP, TEXT_ONLY_LABEL
from depthtune.runtime import is_offline

FORMATS = ("csv", "tsv", "jsonl", "parquet", "labeltext")

EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that did not decode (surrogateescape)
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
    """Everything the configured source gave, before cleaning."""
    inputs: dict  # split name -> RawSplit (train always present)
    label_order: Optional[tuple] = None  # the source's own documented order, if any
    info: dict = field(default_factory=dict)  # kind, spec, provenance


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


def infer_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"data.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        return fmt
    return EXTENSIONS.get(Path(path).suffix.lower(), "labeltext")


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


def _missing_column(path, kind: str, column: str, found: list, key: str, header: Optional[bool] = None) -> DataError:
    """header: None for formats without a header row to get wrong (jsonl, parquet, hub), else data.header."""
    listed = ", ".join(map(str, found)) if found else "none"
    hint = ""
    if len(found) == 1 and any(d in str(found[0]) for d in ",;\t|"):
        hint = " (one column: check data.delimiter / data.format)"
    elif header is False:
        hint = f" (data.header: false names the columns by position, \"0\" to \"{len(found) - 1}\")"
    elif header and str(column).isdigit():
        hint = " (columns named by position need data.header: false)"
    elif header and looks_like_data(found):
        hint = (" (is the first row data? a file without a header row needs data.header: false, "
                "columns then named by position: \"0\", \"1\", ...)")
    listed = listed if len(listed) <= 300 else listed[:300] + "..."
    return DataError(f"{path}: no {kind} column {column!r} (data.{key}); columns found: {listed}{hint}")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")


def looks_like_data(header: list) -> bool:
    """A header row that is more likely the first example: a cell that is a number (a label, a score)
    or longer than 40 characters (a text). Column names are neither."""
    return any(_NUMBER.match(str(c).strip()) or len(str(c)) > 40 for c in header)


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


def read_delimited(path: str | Path, *, text_column: str, label_column: Optional[str], delimiter: Optional[str] = None,
                   quoting: bool = True, encoding: str = "utf-8", fmt: str = "csv", name: str = "train",
                   header: bool = True) -> RawSplit:
    """CSV/TSV. header=True: the first row names the columns; header=False: every row is data and the
    columns are named by position, "0", "1", ... A row with another number of fields than the first is an error."""
    path = Path(path)
    delim = delimiter if delimiter is not None else ("\t" if fmt == "tsv" else ",")
    if len(delim) != 1:
        raise DataError(f"data.delimiter: expected one character, got {delim!r}")
    text = _decode(path, _read_bytes(path, fmt=fmt, encoding=encoding), fmt=fmt, encoding=encoding)
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    out = RawSplit(name=name, origin=str(path), format=fmt)
    columns = None  # the header's names, or "0", "1", ... from the first row's width (header=False)
    data_row = 0
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip() and columns is not None
                              and len(columns) > 1):
                continue  # blank line
            if columns is None:
                columns = [c.strip() for c in record] if header else [str(i) for i in range(len(record))]
                out.columns = columns
                ti, li = column_indices(path, columns, text_column, label_column, header=header)
                if header:
                    continue
            data_row += 1
            if len(record) != len(columns):
                hint = ("texts may contain the delimiter" if not quoting else
                        "set data.quoting: false if texts contain quote characters")
                like = f"like the header ({', '.join(columns)})" if header else \
                    "like the first row (data.header: false)"
                raise DataError(f"{path}: row {data_row} (line {reader.line_num}) has {len(record)} fields, "
                                f"expected {len(columns)} {like}; {hint}")
            body, label = record[ti], record[li] if li is not None else TEXT_ONLY_LABEL
            if _has_undecodable(body, label):
                out.undecodable.append(reader.line_num)
            else:
                out.rows.append((reader.line_num, body, label))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed {fmt.upper()} ({exc})") from None
    if columns is None and header:
        raise DataError(f"{path}: empty file, expected a header row naming the columns")
    return out


def column_indices(path: Path, columns: list, text_column: str, label_column: Optional[str], *,
                   header: bool) -> tuple:
    """(text index, label index or None) in a csv/tsv row; a missing column is a DataError."""
    if text_column not in columns:
        raise _missing_column(path, "text", text_column, columns, "text_column", header=header)
    if label_column is not None and label_column not in columns:
        raise _missing_column(path, "label", label_column, columns, "label_column", header=header)
    return columns.index(text_column), columns.index(label_column) if label_column is not None else None


def read_jsonl(path: str | Path, *, text_column: str, label_column: Optional[str], encoding: str = "utf-8",
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
        if label_column is not None and label_column not in columns:
            raise _missing_column(path, "label", label_column, list(columns), "label_column")
    for number, obj in records:
        body = obj.get(text_column)
        label = obj.get(label_column) if label_column is not None else TEXT_ONLY_LABEL
        if _has_undecodable(body, label):
            out.undecodable.append(number)
        else:
            out.rows.append((number, _normalize_text(body), label))
    return out


def read_parquet(path: str | Path, *, text_column: str, label_column: Optional[str], name: str = "train") -> RawSplit:
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
        if label_column is not None and label_column not in columns:
            raise _missing_column(path, "label", label_column, columns, "label_column")
        table = pf.read(columns=list(dict.fromkeys([c for c in (text_column, label_column) if c])))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    texts = table.column(text_column).to_pylist()
    labels = table.column(label_column).to_pylist() if label_column else [TEXT_ONLY_LABEL] * len(texts)
    out = RawSplit(name=name, origin=str(path), format="parquet", columns=columns)
    out.rows = [(i, _normalize_text(t), lab) for i, (t, lab) in enumerate(zip(texts, labels), start=1)]
    return out


def read_file(path: str | Path, *, format: str = "auto", text_column: str = "text",
              label_column: Optional[str] = "label",
              delimiter: Optional[str] = None, quoting: bool = True, encoding: str = "utf-8",
              name: str = "train", header: bool = True) -> RawSplit:
    """Read one local file of labelled text in any supported format (header: csv/tsv only)."""
    fmt = infer_format(path, format)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    if not header and fmt in ("jsonl", "parquet"):
        raise DataError(f"data.header: false is for csv/tsv files; {path} is read as {fmt}, "
                        "whose column names come with every record")
    if fmt == "labeltext":
        raw = read_labeltext(path, encoding=encoding, name=name)
        if label_column is None:  # texts only: the first token is still the file's label, dropped here
            raw.rows = [(row, text, TEXT_ONLY_LABEL) for row, text, _ in raw.rows]
        return raw
    if fmt in ("csv", "tsv"):
        return read_delimited(path, text_column=text_column, label_column=label_column, delimiter=delimiter,
                              quoting=quoting, encoding=encoding, fmt=fmt, name=name, header=header)
    if fmt == "jsonl":
        return read_jsonl(path, text_column=text_column, label_column=label_column, encoding=encoding, name=name)
    return read_parquet(path, text_column=text_column, label_column=label_column, name=name)


_HUB_SPLITS = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "test": "test"}


def read_hub(dataset_id: str, *, config_name: Optional[str] = None, text_column: str = "text",
             label_column: Optional[str] = "label") -> SourceData:
    """`datasets.load_dataset(dataset_id, config_name)`; refused at once when the Hub is offline."""
    spec = f"hub:{dataset_id}"
    if not dataset_id:
        raise DataError("data.source: 'hub:' needs a dataset id, e.g. hub:stanfordnlp/sst2")
    if is_offline():
        raise DataError(f"data.source: {spec} needs the Hugging Face Hub, which is switched off here "
                        "(HF_HUB_OFFLINE is set); use a local file or builtin:rotten_tomatoes")
    import datasets

    try:
        dsd = datasets.load_dataset(dataset_id, config_name)
    except Exception as exc:  # network, missing dataset, bad config: one line for the user
        raise DataError(f"data.source: cannot load {spec}"
                        f"{f' (config {config_name})' if config_name else ''}: {first_line(exc)}") from None
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
        if label_column is not None and label_column not in ds.column_names:
            raise _missing_column(where, "label", label_column, ds.column_names, "label_column")
        feature = ds.features[label_column] if label_column else None
        names = getattr(feature, "names", None)  # ClassLabel
        labels = ds[label_column] if label_column else [TEXT_ONLY_LABEL] * len(ds)
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
    """A builtin dataset (verified, cached): rotten_tomatoes (its `plot` rows counted as outside the task)
    or chinese_reviews."""
    if name not in builtin_data.DATASETS:
        known = ", ".join(f"builtin:{n}" for n in builtin_data.DATASETS)
        raise DataError(f"data.source: unknown builtin dataset {name!r}, known: {known}")
    load, label_order = builtin_data.DATASETS[name]
    loaded = load(cache_dir)
    raw = RawSplit(name="train", origin=f"builtin:{name}", format="csv", columns=loaded.columns,
                   rows=loaded.rows, skipped=loaded.rows_skipped)
    provenance = {k: v for k, v in loaded.provenance.items() if k not in ("cache_path", "from_cache")}
    info = {"kind": "builtin", "spec": f"builtin:{name}", "provenance": provenance,
            "cache_path": loaded.provenance["cache_path"], "from_cache": loaded.provenance["from_cache"]}
    return SourceData(inputs={"train": raw}, label_order=label_order, info=info)


def read_source(cfg: DataConfig, *, cache_dir: str | Path | None = None, labelled: bool = True) -> SourceData:
    """The configured data as raw inputs: `data.files` if given, else `data.source`.

    labelled=False (task causal_lm): only the text column is read; every row is labelled TEXT_ONLY_LABEL.
    """
    if cfg.prompt_column is not None:
        return read_prompt_completion(cfg, cache_dir=cache_dir)
    source = read_labelled_source(cfg, cache_dir=cache_dir, label_column=cfg.label_column if labelled else None)
    if not labelled:
        for raw in source.inputs.values():  # the builtin data comes labelled: its labels are not the task's
            raw.rows = [(row, text, TEXT_ONLY_LABEL) for row, text, _ in raw.rows]
        source.label_order = None
    return source


def read_prompt_completion(cfg: DataConfig, *, cache_dir: str | Path | None = None) -> SourceData:
    """Prompt/completion pairs (task causal_lm): each row's text is prompt + PROMPT_SEP + completion, its label
    TEXT_ONLY_LABEL; a row with an empty prompt or completion is dropped as an empty text."""
    if (cfg.source or "").startswith("builtin:") and not cfg.files:
        raise DataError("data.prompt_column: the builtin data has no prompt/completion columns; point data.source "
                        "or data.files at your own file")
    try:
        source = read_labelled_source(dataclasses.replace(cfg, text_column=cfg.prompt_column), cache_dir=cache_dir,
                                      label_column=cfg.completion_column)
    except DataError as exc:  # the readers name text/label columns: here they are the prompt/completion ones
        message = str(exc).replace("no text column", "no prompt column").replace("(data.text_column)",
                                                                                 "(data.prompt_column)")
        raise DataError(message.replace("no label column", "no completion column").replace(
            "(data.label_column)", "(data.completion_column)")) from None
    for raw in source.inputs.values():
        raw.rows = [(row, join_prompt(prompt, completion), TEXT_ONLY_LABEL) for row, prompt, completion in raw.rows]
    source.label_order = None
    return source


def join_prompt(prompt, completion) -> Optional[str]:
    """prompt + PROMPT_SEP + completion (the separator removed from inside both), or None if either is empty.
    The completion keeps its leading space: "Sentiment:" + " positive" trains on " positive"."""
    parts = [None if v is None else str(v).replace(PROMPT_SEP, " ") for v in (prompt, completion)]
    if not all(p and p.strip() for p in parts):
        return None
    return parts[0] + PROMPT_SEP + parts[1]


def read_labelled_source(cfg: DataConfig, *, cache_dir: str | Path | None, label_column: Optional[str]) -> SourceData:
    """read_source's reading: each kind of source with the label column given (None: texts only)."""
    opts = dict(format=cfg.format, text_column=cfg.text_column, label_column=label_column,
                delimiter=cfg.delimiter, quoting=cfg.quoting, encoding=cfg.encoding, header=cfg.header)
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
                        text_column=cfg.text_column, label_column=label_column)
    raw = read_file(Path(source).expanduser(), name="train", **opts)
    return SourceData(inputs={"train": raw}, info={"kind": "file", "spec": source})
