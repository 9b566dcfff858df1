"""The tokenization stage: prepared JSONL -> tokenized DatasetDict + token-length report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from depthtune.config import DataConfig, ModelConfig
from depthtune.errors import DataError
from depthtune.data.preparation import prepare, write_prepared
from depthtune.records import PreparedExample
from depthtune.model.sources import load_tokenizer
from depthtune.data.token_stats import (
    choose_num_proc,
    load_prepared,
    run,
    tokenize_splits,
)
from stages import tokenization as tokenization_stage

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
TREC = SHARED / "trec" / "TREC.train.all"

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """TREC questions, prepared (300/100/100 rows), with one long text added to train."""
    out = tmp_path_factory.mktemp("prep") / "prepared"
    p = prepare(DataConfig(source=str(TREC), encoding="latin-1", max_train_samples=300, max_eval_samples=100))
    long_text = " ".join(["word"] * 300)
    p.splits["train"].append(PreparedExample(long_text, 0))
    write_prepared(p, out)
    return out


def _params(path: Path, max_length: int) -> Path:
    path.write_text(yaml.safe_dump({"variants": {"full": {}}, "train": {"max_length": max_length}}))
    return path


def test_tokenized_columns_types_and_no_padding(prepared_dir, tokenizer):
    dsd, report = run(prepared_dir, tokenizer, max_length=64, tokenizer_source="packaged:minilm-l6")
    assert list(dsd) == ["train", "validation", "test"]
    train = dsd["train"]
    assert train.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "length", "n_bytes",
                                  "loss_start"]
    f = train.features
    assert str(f["input_ids"].feature.dtype) == "int32" and str(f["attention_mask"].feature.dtype) == "int8"
    assert f["labels"].names == ["0", "1", "2", "3", "4", "5"]
    assert str(f["length"].dtype) == "int32"
    rows = [json.loads(ln) for ln in (prepared_dir / "train.jsonl").read_text().splitlines()]
    assert list(train["labels"]) == [r["label"] for r in rows]
    lengths = list(train["length"])
    assert lengths == [len(x) for x in train["input_ids"]]
    assert len(set(lengths)) > 5  # not padded to one length
    assert all(tokenizer.pad_token_id not in x and x[-1] == tokenizer.sep_token_id for x in train["input_ids"])
    assert all(sum(m) == n for m, n in zip(train["attention_mask"], lengths))
    assert max(lengths) == 64  # the long text is truncated, special tokens kept
    # bits per byte's denominator: a text's UTF-8 bytes, a truncated one's of what is kept; no prompt here
    assert list(train["n_bytes"])[0] == len(rows[0]["text"].encode()) and set(train["loss_start"]) == {0}
    long = lengths.index(64)
    assert list(train["n_bytes"])[long] < len(rows[long]["text"].encode())
    enc = tokenizer(rows[0]["text"])
    assert train[0]["input_ids"] == enc["input_ids"]

    s = report["splits"]["train"]
    assert s["rows"] == 301 and s["truncated"] == 1 and s["max"] == 64
    assert s["untruncated"]["max"] == 302
    assert s["fraction_truncated"] == round(1 / 301, 4)
    assert s["p50"] <= s["p95"] <= s["max"]
    assert report["tokenizer"]["vocab_size"] == 30522 and report["tokenizer"]["is_fast"] is True
    assert report["max_length"] == 64 and report["padding"] is False
    assert report["warnings"] == []


def test_num_proc_gives_identical_output(prepared_dir, tokenizer):
    prepared = load_prepared(prepared_dir)
    small = prepared.splits["validation"]
    import datasets

    env_before = os.environ.get("TOKENIZERS_PARALLELISM")
    dsd, fps = datasets.DatasetDict({"validation": small}), prepared.fingerprints
    one, _, w1 = tokenize_splits(dsd, tokenizer, max_length=32, fingerprints=fps, num_proc=1)
    two, _, w2 = tokenize_splits(dsd, tokenizer, max_length=32, fingerprints=fps, num_proc=2)
    assert (w1, w2) == ({"validation": 1}, {"validation": 2})
    assert one["validation"].to_dict() == two["validation"].to_dict()
    assert os.environ.get("TOKENIZERS_PARALLELISM") == env_before  # restored after the worker pool


def test_choose_num_proc():
    assert choose_num_proc(2000, max_procs=2) == 1
    assert choose_num_proc(60_000, max_procs=2) == 1
    assert choose_num_proc(120_000, max_procs=2) == 2
    assert choose_num_proc(10**7, max_procs=16) == 16
    assert choose_num_proc(0, max_procs=2) == 1


def test_stage_writes_dataset_and_warns_on_truncation(prepared_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "tokenized"
    params = _params(tmp_path / "params.yaml", max_length=12)
    tokenization_stage.main(["--params", str(params), "--prepared", str(prepared_dir), "--out", str(out)])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["fraction_truncated"] > 0.05
    assert "warning: train:" in captured.err and "truncated at max_length 12" in captured.err
    assert "tokenized with packaged:minilm-l6" in captured.out
    dsd = datasets.load_from_disk(str(out))
    assert {k: v.num_rows for k, v in dsd.items()} == {"train": 301, "validation": 100, "test": 100}
    assert max(dsd["train"]["length"]) == 12

    # a failed run (bad prepared data) leaves the previous output intact
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in prepared_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "test.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "bad", "label": 9}\n')
    with pytest.raises(DataError) as info:
        tokenization_stage.main(["--params", str(params), "--prepared", str(broken), "--out", str(out)])
    assert str(info.value) == f"{broken / 'test.jsonl'}:2: label 9 is not a label id in 0..5 (labels.json)"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["broken", "params.yaml", "tokenized"]


def test_missing_prepared_data(tmp_path, tokenizer):
    with pytest.raises(Exception, match="labels.json: not found"):
        load_prepared(tmp_path)
    (tmp_path / "labels.json").write_text('{"names": ["a", "b"]}')
    with pytest.raises(DataError, match="train.jsonl: not found"):
        load_prepared(tmp_path)


def test_loading_prints_nothing_to_stdout(prepared_dir, tokenizer, monkeypatch):
    """Prefect's log_prints sends every print(file=None) to the run log. Building the datasets once
    let datasets hash the Arrow table with dill, whose dis.dis() wrote pages of bytecode there."""
    import builtins
    import sys

    import datasets

    printed = []
    real_print = builtins.print

    def recording_print(*args, **kwargs):
        if kwargs.get("file") in (None, sys.stdout):
            printed.append(" ".join(map(str, args)))
        return real_print(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", recording_print)
    prepared = load_prepared(prepared_dir)
    small = datasets.DatasetDict({"validation": prepared.splits["validation"]})
    tokenize_splits(small, tokenizer, max_length=32, fingerprints=prepared.fingerprints, num_proc=2)
    assert printed == []


def test_no_progress_bars_after_configure_process(tmp_path):
    """Libraries imported before configure_process() still get their bars switched off."""
    import subprocess
    import sys

    script = (
        "import datasets, tempfile\n"  # imports huggingface_hub, which reads its env var now
        "from depthtune import runtime\n"
        "runtime.configure_process()\n"
        "from depthtune.config import ModelConfig, VariantSpec\n"
        "from depthtune.model.variants import build_variant\n"
        "built = build_variant(ModelConfig(), VariantSpec(), num_labels=2, device='cpu')\n"
        "built.model.save_pretrained(tempfile.mkdtemp(dir=%r))\n" % str(tmp_path)
    )
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr, proc.stderr
    assert "%|" not in proc.stderr + proc.stdout
