"""Bad data at the stage level: `python -m stages.prepare --params P --out OUT` in a temp folder.

Every case: exit 2, exactly one stderr line naming the file (and the row, key or column) and
what was expected, no traceback, and the outputs of an earlier good run in OUT byte-identical
(no temp copies left beside them). The reader-level versions of several cases live in
tests/data/test_preparation.py; this file checks the whole stage process.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.reliability._util import assert_one_line_error, leftovers, run, snapshot, stage
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)

GOOD_ROWS = "".join(f"this is example text number {i},{['neg', 'pos'][i % 2]}\n" for i in range(200))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A folder with a good CSV and the outputs of a good prepare run."""
    d = tmp_path_factory.mktemp("bad_data")
    (d / "good.csv").write_text("text,label\n" + GOOD_ROWS)
    params = write_params(d / "good.yaml", {"source": str(d / "good.csv")})
    proc = stage("prepare", "--params", params, "--out", d / "out", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((d / "out/labels.json").read_text()) == {"names": ["neg", "pos"]}
    return d


def write_params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": data, "variants": {"full": {}}}))
    return path


def csv_rows(rows: list[tuple]) -> str:
    return "".join(",".join(map(str, r)) + "\n" for r in rows)


def build(d: Path, name: str):
    """(data options, expected needles) for one bad-data case; files are written into d."""
    f = d / name
    latin = "".join(f"café crème brûlée numéro {i},{i % 2}\n" for i in range(60))
    cases = {
        "missing_file": ({"source": str(d / "nope.csv")}, [f"{d / 'nope.csv'}: file not found"]),
        "wrong_column_name": ("text_review", ["no text column 'text' (data.text_column)",
                                              "columns found: review, label"]),
        "wrong_delimiter": ("semicolon", ["no text column 'text'", "columns found: text;label",
                                          "check data.delimiter"]),
        "wrong_encoding_latin1_as_utf8": ("latin1", ["60 of 60 rows dropped", "undecodable 60",
                                                     "first at row 2", "check data.encoding"]),
        "wrong_encoding_utf16_as_utf8": ("utf16", ["is a binary file (NUL bytes)", "data.encoding"]),
        "empty_csv_file": ("empty_csv", ["empty file, expected a header row"]),
        "empty_jsonl_file": ("empty_jsonl", ["no rows (split train is empty)"]),
        "header_only": ("header_only", ["no rows (split train is empty)"]),
        "single_class": ("single", ["fewer than 2 classes remain in train after cleaning (found: 'pos')"]),
        "labels_outside_declared_set": ("undeclared", ["20 of 60 rows dropped", "undeclared label 20",
                                                       "labels found but not in data.labels: 'neutral'"]),
        "all_texts_empty": ("all_empty", ["50 of 50 rows dropped (100.0%: empty text 50; first at row 2)",
                                          "above data.max_drop_fraction 0.2"]),
        "all_texts_empty_drop_allowed": ("all_empty_allowed", ["split train is empty after cleaning"]),
        "all_labels_missing": ("no_labels", ["40 of 40 rows dropped (100.0%: missing label 40"]),
        "split_ends_up_empty": ("leak", ["split validation is empty, 2 rows removed as also in an earlier split"]),
        "too_few_rows_to_split": ("tiny", ["too few to split off"]),
        "binary_gzip": ("gzip", ["is a binary file (gzip), not csv text"]),
        "binary_png_named_csv": ("png", ["is a binary file (PNG), not csv text"]),
        "ragged_csv_row": ("ragged", ["row 3 (line 4) has 3 fields, expected 2 like the header (text, label)"]),
        "malformed_jsonl_line": ("bad_jsonl", ["line 2: not valid JSON"]),
        "directory_not_file": ({"source": str(d)}, ["is a directory, expected a data file"]),
        "unknown_builtin": ({"source": "builtin:imdb"}, ["data.source: unknown builtin dataset 'imdb'"]),
    }
    spec, needles = cases[name]
    if isinstance(spec, dict):
        return spec, needles
    if spec == "text_review":
        f = f.with_suffix(".csv")
        f.write_text("review,label\n" + GOOD_ROWS)
    elif spec == "semicolon":
        f = f.with_suffix(".csv")
        f.write_text("text;label\n" + GOOD_ROWS.replace(",", ";"))
    elif spec == "latin1":
        f = f.with_suffix(".csv")
        f.write_bytes(("text,label\n" + latin).encode("latin-1"))
    elif spec == "utf16":
        f = f.with_suffix(".csv")
        f.write_bytes(("text,label\n" + GOOD_ROWS).encode("utf-16"))
    elif spec == "empty_csv":
        f = f.with_suffix(".csv")
        f.write_bytes(b"")
    elif spec == "empty_jsonl":
        f = f.with_suffix(".jsonl")
        f.write_bytes(b"")
    elif spec == "header_only":
        f = f.with_suffix(".csv")
        f.write_text("text,label\n")
    elif spec == "single":
        f = f.with_suffix(".csv")
        f.write_text("text,label\n" + csv_rows([(f"text {i}", "pos") for i in range(60)]))
    elif spec == "undeclared":
        f = f.with_suffix(".csv")
        f.write_text("text,label\n" + csv_rows([(f"t {i}", ["neg", "pos", "neutral"][i % 3]) for i in range(60)]))
        return {"source": str(f), "labels": ["neg", "pos"]}, [str(f)] + needles
    elif spec in ("all_empty", "all_empty_allowed"):
        f = f.with_suffix(".csv")
        f.write_text("text,label\n" + csv_rows([("  ", i % 2) for i in range(50)]))
        if spec == "all_empty_allowed":
            return {"source": str(f), "max_drop_fraction": 1.0}, [str(f)] + needles
    elif spec == "no_labels":
        f = f.with_suffix(".csv")
        f.write_text("text,label\n" + csv_rows([(f"text {i}", "") for i in range(40)]))
    elif spec == "leak":
        train, dev = d / "train.txt", d / "dev.txt"
        train.write_text("".join(f"{i % 2} text {i}\n" for i in range(20)))
        dev.write_text("1 text 1\n0 text 2\n")
        return {"files": {"train": str(train), "validation": str(dev)}}, [str(dev)] + needles
    elif spec == "tiny":
        f = f.with_suffix(".txt")
        f.write_text("1 a\n0 b\n")
    elif spec == "gzip":
        f = f.with_suffix(".csv")
        f.write_bytes(gzip.compress(("text,label\n" + GOOD_ROWS).encode()))
    elif spec == "png":
        f = f.with_suffix(".csv")
        f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif spec == "ragged":
        f = f.with_suffix(".csv")
        f.write_text("text,label\nok,1\nfine,0\ntoo,many,fields\nlast,1\n")
    elif spec == "bad_jsonl":
        f = f.with_suffix(".jsonl")
        f.write_text('{"text": "a", "label": 1}\n{"text": "b", "label"\n')
    return {"source": str(f)}, [str(f)] + needles


CASES = ["missing_file", "wrong_column_name", "wrong_delimiter", "wrong_encoding_latin1_as_utf8",
         "wrong_encoding_utf16_as_utf8", "empty_csv_file", "empty_jsonl_file", "header_only", "single_class",
         "labels_outside_declared_set", "all_texts_empty", "all_texts_empty_drop_allowed", "all_labels_missing",
         "split_ends_up_empty", "too_few_rows_to_split", "binary_gzip", "binary_png_named_csv", "ragged_csv_row",
         "malformed_jsonl_line", "directory_not_file", "unknown_builtin"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_gives_one_line_and_keeps_earlier_outputs(case, good, tmp_path):
    data, needles = build(tmp_path, case)
    params = write_params(tmp_path / "params.yaml", data)
    before = snapshot(good / "out")
    proc = stage("prepare", "--params", params, "--out", good / "out", cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert snapshot(good / "out") == before
    assert leftovers(good, "out") == []


PEAK_RSS = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stderr.write(p.stderr)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"  # KiB, the prepare process's peak
            "sys.exit(p.returncode)\n")


def peak_rss_kib(params: Path, out: Path, cwd: Path):
    proc = run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "stages.prepare", "--params", params,
                "--out", out], cwd)
    return proc, int(proc.stdout.strip().splitlines()[-1])


def test_huge_single_line_is_refused_with_bounded_memory(good, tmp_path):
    """A 64 MiB line (a file without line breaks): refused while streaming; the process grows < 16 MiB
    over a normal run. Reading it whole cost ~10x its size (100 MiB line: 1 GiB peak) before the fix."""
    big = tmp_path / "huge.csv"
    with open(big, "w") as fh:
        fh.write("text,label\n" + GOOD_ROWS[:2000])
        fh.write("x" * (64 << 20) + ",pos\n")
        fh.write(GOOD_ROWS[:2000])
    _, baseline = peak_rss_kib(good / "good.yaml", tmp_path / "base-out", tmp_path)
    before = snapshot(good / "out")
    proc, peak = peak_rss_kib(write_params(tmp_path / "huge.yaml", {"source": str(big)}), good / "out", tmp_path)
    line = GOOD_ROWS[:2000].count("\n") + 2
    assert_one_line_error(proc, str(big), f"line {line} is longer than 8 MiB", "expected one example per line")
    assert peak - baseline < 16 << 10, f"peak RSS {peak} KiB vs {baseline} KiB for a normal run"
    assert snapshot(good / "out") == before
