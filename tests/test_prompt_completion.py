"""task causal_lm on prompt/completion pairs (data.prompt_column / data.completion_column): the prompt is
context, only the completion's tokens are trained on and scored.

- prepare joins each pair with records.PROMPT_SEP, drops pairs with an empty side, names the columns in errors;
- tokenized.encode_pair puts the tokenizer's special tokens around prompt + completion and marks where the
  completion starts (loss_start); truncation keeps the bytes of what is left;
- through the stages (prepare, tokenization, audit, finetune, evaluation) a tiny Llama's test record counts
  exactly the completion tokens (+ the closing [SEP]) of every text, and its continuations start from the prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthtune.config import ConfigError, parse_params, parse_section, DataConfig
from depthtune.errors import DataError
from depthtune.data.preparation import prepare
from depthtune.records import PROMPT_SEP
from depthtune.model.sources import load_tokenizer
from depthtune.data.tokenized import encode_pair
from tests.conftest import in_project, make_project, read_sst2, tiny_params
from tests.test_decoders import model_cfg

LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def write_pairs(path: Path, shared: Path, n: int, offset: int = 0, empty_every: int = 0) -> Path:
    texts, labels = read_sst2(shared / "sst2" / "train.tsv", n, offset)
    with path.open("w") as fh:
        for i, (t, y) in enumerate(zip(texts, labels)):
            completion = "" if empty_every and i % empty_every == 0 else (" positive" if y else " negative")
            fh.write(json.dumps({"prompt": f"Review: {t}\nSentiment:", "completion": completion}) + "\n")
    return path


def pair_cfg(path: Path, **kw) -> DataConfig:
    return parse_section(DataConfig, {"source": str(path), "prompt_column": "prompt", "completion_column": "completion",
                                      "max_drop_fraction": 0.5, **kw}, "data")


def test_prepare_joins_pairs_and_drops_an_empty_side(tmp_path, shared_data):
    path = write_pairs(tmp_path / "pairs.jsonl", shared_data, 200, empty_every=10)
    prepared = prepare(pair_cfg(path), labelled=False)
    rows = [r for split in prepared.splits.values() for r in split]
    assert prepared.names == ["text"] and len(rows) == 180  # every 10th pair had an empty completion
    assert all(r.text.count(PROMPT_SEP) == 1 and r.text.split(PROMPT_SEP)[1] in (" positive", " negative")
               for r in rows)
    with pytest.raises(DataError, match=r"no completion column 'answer' \(data.completion_column\)"):
        prepare(pair_cfg(path, completion_column="answer"), labelled=False)


def test_prompt_and_completion_columns_are_validated():
    base = {"variants": {"full": {}}, "task": "causal_lm",
            "evaluation": {"metric": "perplexity"}, "registry": {"metric": "perplexity"}}
    with pytest.raises(ConfigError, match="give both"):
        parse_params({**base, "data": {"prompt_column": "q"}})
    with pytest.raises(ConfigError, match="data.prompt_column: prompt/completion data is for task causal_lm"):
        parse_params({"variants": {"full": {}}, "data": {"prompt_column": "q", "completion_column": "a"}})


def test_encode_pair_marks_where_the_completion_starts():
    tok = load_tokenizer(model_cfg("llama"))  # MiniLM's BERT tokenizer: [CLS] ... [SEP]
    p = tok("Review: a fine film\nSentiment:", add_special_tokens=False)["input_ids"]
    c = tok(" positive", add_special_tokens=False)["input_ids"]
    pair = encode_pair(tok, "Review: a fine film\nSentiment:", " positive", max_length=64)
    assert pair["input_ids"] == [tok.cls_token_id] + p + c + [tok.sep_token_id]
    assert pair["loss_start"] == 1 + len(p) and pair["n_bytes"] == len(" positive".encode())
    cut = encode_pair(tok, "Review: a fine film\nSentiment:", " positive", max_length=1 + len(p))
    assert cut["input_ids"] == [tok.cls_token_id] + p and cut["n_bytes"] == 0  # the completion truncated away
    assert cut["untruncated_length"] == len(pair["input_ids"])


def test_only_completion_tokens_are_trained_and_scored(tmp_path, shared_data):
    train = write_pairs(tmp_path / "train.jsonl", shared_data, 120)
    test = write_pairs(tmp_path / "test.jsonl", shared_data, 30, offset=3000)
    params = tiny_params(shared_data, variants={"full": {}, "top1": {"train_top": 1}})
    params.update(task="causal_lm")
    params["model"]["scratch"] = {**params["model"]["scratch"], **LLAMA}
    params["data"] = {"files": {"train": str(train), "test": str(test)}, "prompt_column": "prompt",
                      "completion_column": "completion", "max_train_samples": 120, "max_eval_samples": 30}
    params["evaluation"] = {**params["evaluation"], "metric": "perplexity", "generations": 2, "max_new_tokens": 3}
    params["registry"] = {"model_name": "tiny-lm", "metric": "perplexity", "min_delta": 0.0}
    params["tracking"] = {"enabled": False}
    proj = make_project(tmp_path / "proj", params, git=False)
    import importlib
    with in_project(proj):
        for stage, argv in (("prepare", []), ("tokenization", []), ("audit", []), ("finetune", ["--variant", "top1"]),
                            ("evaluation", ["--variant", "top1"])):
            importlib.import_module(f"stages.{stage}").main(argv)
    ev = json.loads((proj / "metrics" / "eval" / "top1.json").read_text())
    tok = load_tokenizer(model_cfg("llama"))
    word = {label: len(tok(label, add_special_tokens=False)["input_ids"]) for label in (" positive", " negative")}
    # every test text scores its completion's tokens and the closing [SEP]: 2 tokens, never the prompt's
    assert set(ev["tokens"]) <= {w + 1 for w in word.values()} and len(ev["tokens"]) == ev["n"] == 30
    assert set(ev["n_bytes"]) == {len(" positive".encode())}  # bits per byte over the completions' bytes only
    assert all(g["prompt"].startswith("review :") and g["prompt"].endswith("sentiment :") for g in ev["generations"])
    assert all(g["reference"] in ("positive", "negative") for g in ev["generations"])
