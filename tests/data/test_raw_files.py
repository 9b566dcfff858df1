"""Raw files as users bring them (issue 16): conflicting labels, a headerless TSV, a latin-1 CSV of tweets.

Each test builds a small file shaped like the real one, reproduces what the old code did with it (the
silent choice or the unhelpful error), then checks the new behaviour. Real sets behind them: 38,158 raw
tweets in latin-1 with a confidence column (prepare said "456 duplicate texts had another label than their
first occurrence (first kept)" and trained on whichever label came first), and a headerless news TSV
(`text<TAB>label`), whose first example was read as the header row.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from depthtune.config import DataConfig, load_params
from depthtune.errors import ConfigError, DataError
from depthtune.layout import SPLITS
from depthtune.data.preparation import prepare
from stages import prepare as prepare_stage

ROOT = Path(__file__).resolve().parents[2]


def cfg(**kw) -> DataConfig:
    kw.setdefault("max_train_samples", None)
    kw.setdefault("max_eval_samples", None)
    return DataConfig(**kw)


def err(c: DataConfig) -> str:
    with pytest.raises(DataError) as info:
        prepare(c)
    return str(info.value)


def labels_by_text(p) -> dict:
    return {e.text: p.names[e.label] for split in SPLITS for e in p.splits[split]}


def params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": data, "variants": {"full": {}}}))
    return path


def accounted(stats: dict) -> bool:
    """Every row read is exactly one of: dropped, duplicate, conflict, kept."""
    return stats["rows_read"] == (stats["dropped_total"] + stats["duplicates_removed"]
                                  + stats["label_conflicts"]["rows_dropped"] + stats["rows_kept"])


# ----------------------------------------------------------------------------- tweets: latin-1, confidence, conflicts

DELAYED = "delayed again... thanks"  # first labelled positive (sarcasm misread), then negative twice
TIES = ("ok I guess", 'seat 12C "fine"')  # one row each of two labels: no majority


def tweets_csv(path: Path) -> Path:
    """id,sentiment,confidence,text in latin-1: 60 tweets, a retweet 3 times, 3 texts with conflicting labels.

    71 rows: duplicates 2 (the retweet's copies); conflicting rows 7 (DELAYED x3, each of TIES x2).
    """
    moods = ["positive", "negative", "neutral"]
    rows = [(moods[i % 3], 0.6 + (i % 4) / 10, f"@airline flight {i} was {['great', 'awful', 'on time'][i % 3]}, "
             f"café crème, año {i}") for i in range(60)]
    rows[5:5] = [("positive", 0.4, DELAYED)]  # the first copy: the label the old code kept
    rows[20:20] = [("negative", 1.0, "RT @bob: lost my bag again ¡qué horror!")] * 3
    rows[30:30] = [("negative", 0.7, DELAYED), ("positive", 0.5, TIES[0]), ("neutral", 0.6, TIES[1])]
    rows[45:45] = [("neutral", 0.5, TIES[0]), ("negative", 0.9, DELAYED), ("positive", 0.6, TIES[1])]
    rows.append(("positive", 0.8, "thank you\nfor the upgrade"))  # a quoted field over two lines
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["id", "sentiment", "confidence", "text"])
    writer.writerows((1000 + i, y, c, t) for i, (y, c, t) in enumerate(rows))
    path.write_bytes(buf.getvalue().encode("latin-1"))
    return path


TWEET_KEYS = {"format": "csv", "encoding": "latin-1", "text_column": "text", "label_column": "sentiment"}


def test_tweets_old_behaviour_kept_the_first_label_silently(tmp_path):
    """The finding: `first` (the only behaviour before) trains on DELAYED as positive, 1 row against 2."""
    f = tweets_csv(tmp_path / "tweets.csv")
    p = prepare(cfg(source=str(f), conflicts="first", **TWEET_KEYS))
    s = p.report["inputs"]["train"]
    assert s["rows_read"] == 71 and s["dropped_total"] == 0
    assert labels_by_text(p)[DELAYED] == "positive"  # the first row's label, not the majority
    assert labels_by_text(p)[TIES[0]] == "positive" and labels_by_text(p)[TIES[1]] == "neutral"
    assert s["duplicates_removed"] == 2
    assert s["label_conflicts"] == {**s["label_conflicts"], "policy": "first", "texts": 3, "rows": 7,
                                    "texts_dropped": 0, "rows_dropped": 4}  # the other-label rows
    assert accounted(s)
    assert p.report["warnings"] == [
        f"{f}: 3 texts appear with different labels: the first label kept, 4 rows with another label dropped "
        "(data.conflicts: first; drop removes every copy); examples in the prepare report"]


def test_tweets_run_with_data_keys_only_and_conflicts_are_dropped(tmp_path, capsys):
    """The stage, params = the data keys of the file alone: conflicting texts dropped in every copy, counted,
    shown with examples; the confidence column ignored; latin-1 and a two-line tweet read as written."""
    f = tweets_csv(tmp_path / "tweets.csv")
    out = tmp_path / "prepared"
    prepare_stage.main(["--params", str(params(tmp_path / "params.yaml", {"source": str(f), **TWEET_KEYS})),
                        "--out", str(out)])
    printed = capsys.readouterr()
    warning = (f"warning: {f}: 3 texts appear with different labels: all 7 of their rows dropped "
               "(data.conflicts: drop; majority keeps the most frequent label, first the first one); "
               "examples in the prepare report")
    assert warning in printed.err.splitlines()
    assert "duplicates 2; conflicting labels 3 texts, 7 rows dropped (data.conflicts: drop)" in printed.out
    assert f"conflict at row 7: {DELAYED!r} (negative x2, positive x1) -> dropped" in printed.out

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    s = report["inputs"]["train"]
    assert (s["rows_read"], s["duplicates_removed"], s["rows_kept"]) == (71, 2, 62)
    conflicts = s["label_conflicts"]
    assert [conflicts[k] for k in ("texts", "rows", "texts_dropped", "rows_dropped")] == [3, 7, 3, 7]
    assert conflicts["examples"][0] == {"text": DELAYED, "labels": {"negative": 2, "positive": 1}, "kept": None,
                                        "first_row": 7}  # most rows first; row = file line (header = line 1)
    assert [e["text"] for e in conflicts["examples"][1:]] == list(TIES)
    assert report["options"]["conflicts"] == "drop" and report["totals"]["conflicts_removed"] == 7
    assert accounted(s)

    texts = [json.loads(ln)["text"] for split in SPLITS
             for ln in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not {DELAYED, *TIES} & set(texts)
    assert "thank you\nfor the upgrade" in texts and any("café crème, año" in t for t in texts)
    assert json.loads((out / "labels.json").read_text())["names"] == ["negative", "neutral", "positive"]


def test_tweets_majority_keeps_the_most_frequent_label_and_drops_ties(tmp_path):
    f = tweets_csv(tmp_path / "tweets.csv")
    p = prepare(cfg(source=str(f), conflicts="majority", **TWEET_KEYS))
    s = p.report["inputs"]["train"]
    assert labels_by_text(p)[DELAYED] == "negative"
    assert not set(TIES) & set(labels_by_text(p))
    assert s["duplicates_removed"] == 3  # the retweet's 2 copies + DELAYED's second negative row
    assert (s["label_conflicts"]["texts_dropped"], s["label_conflicts"]["rows_dropped"]) == (2, 5)
    assert s["label_conflicts"]["examples"][0]["kept"] == "negative"
    assert accounted(s)
    assert p.report["warnings"] == [
        f"{f}: 3 texts appear with different labels: the most frequent label kept; 5 rows dropped, among them "
        "every copy of the 2 texts without a majority (data.conflicts: majority; drop removes every copy); "
        "examples in the prepare report"]


def test_conflicts_are_resolved_the_same_way_in_every_input(tmp_path):
    """A text labelled 1 in train and 0 in the given test file: one decision for both files."""
    train = [(f"train text {i}", str(i % 2)) for i in range(40)]
    test = [("train text 1", "0"), ("fresh test", "1"), ("other test", "0"), ("third test", "1")]
    ft = tmp_path / "train.tsv"
    ft.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in train))
    fs = tmp_path / "test.tsv"
    fs.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in test))
    files = {"train": str(ft), "test": str(fs)}
    # first (the old outcome): train's label wins; the test copy goes (before: as leakage, now as a conflict)
    p = prepare(cfg(files=files, conflicts="first"))
    assert labels_by_text(p)["train text 1"] == "1"
    assert p.report["inputs"]["test"]["label_conflicts"]["rows_dropped"] == 1
    assert p.report["splits"]["test"]["leakage_removed"] == 0
    # drop: gone from both files; one line names both
    p = prepare(cfg(files=files))
    assert "train text 1" not in labels_by_text(p)
    assert [p.report["inputs"][n]["label_conflicts"]["rows_dropped"] for n in ("train", "test")] == [1, 1]
    assert p.report["warnings"][-1].startswith(f"{ft} (1), {fs} (1): 1 text appears with different labels: "
                                               "all 2 of their rows dropped")


def test_every_text_conflicting_says_so_in_the_error(tmp_path):
    """A label column that is not the label (each text with both labels): the empty-split error says why."""
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"text {i},{y}\n" for i in range(20) for y in (0, 1)))
    assert err(cfg(source=str(f))) == (f"{f}: split train is empty after cleaning (40 rows read, 0 duplicates, "
                                       "40 rows of texts with conflicting labels dropped (data.conflicts: drop))")


def test_causal_lm_texts_have_no_conflicts(tmp_path):
    """Texts only (one pseudo-label): duplicates are removed, nothing is a conflict."""
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"text {i % 30},{i % 2}\n" for i in range(60)))
    p = prepare(cfg(source=str(f)), labelled=False)
    s = p.report["inputs"]["train"]
    assert s["duplicates_removed"] == 30 and s["label_conflicts"]["texts"] == 0 and accounted(s)


# ----------------------------------------------------------------------------- headerless news TSV

FIRST = "Wall St. Bears Claw Back Into the Black"


def news_tsv(path: Path, extra: str = "") -> Path:
    """`headline<TAB>label` (labels 1-4), no header row: 40 lines; quotes inside headlines."""
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    lines = [f"{FIRST}\t3"] + [f"{topics[i % 4]} story {i}: \"quoted\" words it's\t{i % 4 + 1}" for i in range(1, 40)]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def test_headerless_tsv_old_behaviour_read_the_first_example_as_the_header(tmp_path):
    """Before: `no text column 'text' (data.text_column); columns found: Wall St. Bears Claw Back Into the
    Black, 3`; now the same line says what to set."""
    f = news_tsv(tmp_path / "news.tsv")
    assert err(cfg(source=str(f))) == (
        f"{f}: no text column 'text' (data.text_column); columns found: {FIRST}, 3 (is the first row data? "
        "a file without a header row needs data.header: false, columns then named by position: \"0\", \"1\", ...)")
    assert err(cfg(source=str(f), text_column="0", label_column="1")) == (
        f"{f}: no text column '0' (data.text_column); columns found: {FIRST}, 3 "
        "(columns named by position need data.header: false)")


def test_headerless_tsv_with_header_false_keeps_every_row(tmp_path):
    f = news_tsv(tmp_path / "news.tsv")
    p = prepare(cfg(source=str(f), header=False, text_column="0", label_column="1"))
    s = p.report["inputs"]["train"]
    assert s["rows_read"] == 40 and s["dropped_total"] == 0  # the first line is an example
    assert p.names == ["1", "2", "3", "4"]
    assert labels_by_text(p)[FIRST] == "3"
    assert labels_by_text(p)["World story 4: \"quoted\" words it's"] == "1"
    assert p.report["options"]["header"] is False


def test_headerless_errors_name_the_key(tmp_path):
    f = news_tsv(tmp_path / "news.tsv")
    assert err(cfg(source=str(f), header=False)) == (
        f"{f}: no text column 'text' (data.text_column); columns found: 0, 1 "
        "(data.header: false names the columns by position, \"0\" to \"1\")")
    ragged = news_tsv(tmp_path / "ragged.tsv", extra="one\ttoo\tmany\n")
    assert err(cfg(source=str(ragged), header=False, text_column="0", label_column="1")) == (
        f"{ragged}: row 41 (line 41) has 3 fields, expected 2 like the first row (data.header: false); "
        "set data.quoting: false if texts contain quote characters")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n')
    assert err(cfg(source=str(jl), header=False)) == (
        f"data.header: false is for csv/tsv files; {jl} is read as jsonl, whose column names come with every record")


def test_headerless_tsv_through_the_stage(tmp_path, capsys):
    """params: data keys only; column names by position are strings: "0" works, the YAML int 0 is refused
    by the params check (one line naming the key)."""
    f = news_tsv(tmp_path / "news.tsv")
    data = {"source": str(f), "header": False, "text_column": "0", "label_column": "1"}
    out = tmp_path / "prepared"
    prepare_stage.main(["--params", str(params(tmp_path / "p.yaml", data)), "--out", str(out)])
    assert json.loads((out / "labels.json").read_text())["names"] == ["1", "2", "3", "4"]
    assert "read train: 40 rows" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="params.data.text_column: 0 is not a string"):
        load_params(params(tmp_path / "int.yaml", {**data, "text_column": 0}))
    # the old default (header row expected) at the stage process: exit 2, one line
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    bad = params(tmp_path / "bad.yaml", {"source": str(f)})
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(bad), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {f}: no text column 'text'") and "data.header: false" in proc.stderr
    assert json.loads((out / "labels.json").read_text())["names"] == ["1", "2", "3", "4"]  # kept


def test_header_false_does_not_change_other_formats(tmp_path):
    """labeltext has no header either way; the builtin and Hub sources ignore data.header."""
    f = tmp_path / "d.txt"
    f.write_text("".join(f"{i % 2} text {i}\n" for i in range(30)))
    assert prepare(cfg(source=str(f), header=False)).splits == prepare(cfg(source=str(f))).splits
