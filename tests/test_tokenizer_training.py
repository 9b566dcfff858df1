"""Tokenizers trained on the corpus (depthtune.model.tokenizer_training), on Chinese reviews and English snippets:
the packaged MiniLM vocabulary leaves much of Chinese text unknown, a WordPiece trained on the training texts
almost nothing, a byte-level BPE nothing; the saved folder loads and round-trips through a scratch model."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from depthtune.config import ConfigError, ModelConfig, parse_section, parse_variant
from depthtune.model.sources import load_tokenizer
from depthtune.model.tokenizer_training import coverage, train_tokenizer
from depthtune.model.variants import build_variant

ZH = ["这本书写得非常好，推荐给大家。", "酒店的服务态度很差，房间也不干净。", "物流很快，包装完好，质量不错。",
      "价格太贵了，性价比不高，不会再买。", "故事情节引人入胜，人物刻画生动。", "屏幕有坏点，客服也不理人，差评。"] * 20


@pytest.fixture(scope="module")
def zh_wordpiece(tmp_path_factory):
    return train_tokenizer(ZH[:90], tmp_path_factory.mktemp("zh") / "tok", kind="wordpiece", vocab_size=500,
                           min_frequency=1)


def test_a_wordpiece_from_the_corpus_reads_chinese_the_packaged_one_cannot(zh_wordpiece):
    packaged = load_tokenizer(ModelConfig())
    ours = AutoTokenizer.from_pretrained(str(zh_wordpiece))
    held_out = ZH[90:]
    before, after = coverage(packaged, held_out), coverage(ours, held_out)
    assert before["unk_fraction"] > 0.10, before  # MiniLM: a sizeable share of these characters are [UNK]
    assert after["unk_fraction"] == 0.0, after
    enc = ours("物流很快")
    assert enc["input_ids"][0] == ours.cls_token_id and enc["input_ids"][-1] == ours.sep_token_id
    assert ours.decode(enc["input_ids"], skip_special_tokens=True).replace(" ", "") == "物流很快"


def test_bytelevel_bpe_has_no_unknowns_and_builds_a_decoder(tmp_path):
    english = ["a gorgeous, witty, seductive movie.", "the film is a charming and often affecting journey."] * 30
    folder = train_tokenizer(english + ZH, tmp_path / "bpe", kind="bytelevel_bpe", vocab_size=400, min_frequency=1)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert coverage(tok, ["完全没见过的字：龘靐齉", "zyzzyva qoph"])["unk_fraction"] == 0.0
    assert tok.decode(tok("酒店 hotel")["input_ids"]) == "酒店 hotel"
    model_cfg = parse_section(ModelConfig, {"source": "scratch", "tokenizer": str(folder), "scratch": {
        "model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64}}, "model")
    built = build_variant(model_cfg, parse_variant("full", {}, "v"), 0, task="causal_lm")
    ids = tok(["酒店 hotel"], return_tensors="pt")["input_ids"]
    assert built.model(input_ids=ids).logits.shape[-1] == len(tok)


def test_bad_kind_and_no_texts_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer kind 'sentencepiece': expected one of wordpiece, bytelevel_bpe"):
        train_tokenizer(["a"], tmp_path / "x", kind="sentencepiece")
    with pytest.raises(ConfigError, match="no texts"):
        train_tokenizer([], tmp_path / "x")
    assert not (tmp_path / "x").exists()
