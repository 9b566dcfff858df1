"""Vocabulary coverage (issue 16): text the model cannot read is measured, warned about, refused.

Before: on Chinese hotel reviews the packaged MiniLM (244 single CJK characters in its vocabulary)
turned most characters into [UNK] and the tokenization stage only said that texts were truncated.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from depthtune.data import coverage
from depthtune.config import ModelConfig
from depthtune.errors import DataError
from depthtune.data.preparation import Prepared, write_prepared
from depthtune.records import PreparedExample, TokenReport
from depthtune.model.sources import load_tokenizer
from depthtune.data.token_stats import run
from stages import tokenization as tokenization_stage

# ~50 hotel-review-like sentences (written for this test), label 1 = positive, 0 = negative
ZH_REVIEWS = [
    ("房间干净整洁，服务员态度非常好，下次还会再来。", 1),
    ("酒店位置很方便，离地铁站只有五分钟的路程。", 1),
    ("早餐种类丰富，味道也不错，性价比很高。", 1),
    ("前台办理入住很快，工作人员热情周到。", 1),
    ("床很舒服，睡得很香，隔音效果也好。", 1),
    ("房间宽敞明亮，窗外的风景特别美。", 1),
    ("卫生间设施齐全，热水充足，洗澡很舒服。", 1),
    ("酒店环境安静，适合商务出差休息。", 1),
    ("服务很贴心，还送了水果和矿泉水。", 1),
    ("装修很新，家具用品都很干净。", 1),
    ("停车方便，周边有很多餐厅和商店。", 1),
    ("价格合理，房间比照片上看起来还要好。", 1),
    ("网络速度快，工作起来非常方便。", 1),
    ("泳池和健身房都很不错，孩子玩得很开心。", 1),
    ("入住体验很好，推荐给朋友们。", 1),
    ("前台小姐姐帮我们叫了出租车，很感谢。", 1),
    ("房间有浴缸，泡澡很放松。", 1),
    ("酒店提供免费接机服务，省了不少麻烦。", 1),
    ("整体感觉物超所值，五星好评。", 1),
    ("枕头很软，空调温度合适，睡眠质量很好。", 1),
    ("楼层高，视野开阔，晚上能看到城市夜景。", 1),
    ("退房手续简单，服务效率很高。", 1),
    ("餐厅的中餐做得很地道，推荐尝试。", 1),
    ("大堂很气派，整体设计很有品味。", 1),
    ("离景点很近，步行就能到，非常方便。", 1),
    ("房间太小了，行李箱都打不开。", 0),
    ("隔音很差，晚上一直听到走廊的噪音。", 0),
    ("卫生间有异味，毛巾也不干净。", 0),
    ("前台服务态度冷淡，问问题也不耐烦。", 0),
    ("早餐品种很少，而且都是凉的。", 0),
    ("空调坏了，报修后等了两个小时才有人来。", 0),
    ("价格偏贵，和房间的条件不相符。", 0),
    ("床单上有污渍，让人很不舒服。", 0),
    ("网络信号很差，根本连不上。", 0),
    ("热水时有时无，洗澡很麻烦。", 0),
    ("位置偏僻，打车很不方便。", 0),
    ("装修老旧，家具都有破损。", 0),
    ("窗户关不严，风很大，晚上很冷。", 0),
    ("停车场太小，找不到车位。", 0),
    ("入住时房间还没有打扫，等了很久。", 0),
    ("房间里有蚊子，一晚上没睡好。", 0),
    ("电梯很慢，高峰时要等十几分钟。", 0),
    ("照片和实际差别很大，感觉被骗了。", 0),
    ("服务员打扫时把我的东西弄乱了。", 0),
    ("退房时多收了费用，解释了半天。", 0),
    ("酒店外面在施工，早上很吵。", 0),
    ("浴室地面很滑，差点摔倒。", 0),
    ("电视遥控器不能用，也没人来修。", 0),
    ("房间有烟味，明明订的是无烟房。", 0),
    ("不会再住这家酒店了，太失望了。", 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def _prepared(tmp_path: Path, rows: list) -> Path:
    examples = [PreparedExample(text, label) for text, label in rows]
    splits = {"train": examples[::2], "validation": examples[1::4], "test": examples[3::4]}
    return write_prepared(Prepared(names=["negative", "positive"], splits=splits, report={}), tmp_path / "prepared")


def test_uncovered_characters_counted_once_each(tokenizer):
    cache: dict = {}
    chars, missing = coverage.uncovered_chars(["酒店的人 hello", "酒店 é\x00"], tokenizer, cache)
    assert chars == 13  # spaces not counted; \x00 is counted but dropped by the normalizer, not [UNK]
    assert missing == {"酒": 2, "店": 2}  # 的 and 人 are among MiniLM's 244 CJK characters
    assert cache["h"] is False and cache["\x00"] is False
    coverage.uncovered_chars(["酒"], tokenizer, cache)  # cached: no new characters to tokenize
    assert set(cache) == {"酒", "店", "的", "人", "h", "e", "l", "o", "é", "\x00"}


def test_chinese_text_is_refused_with_the_way_out(tmp_path, tokenizer):
    prepared = _prepared(tmp_path, ZH_REVIEWS)
    with pytest.raises(DataError) as info:
        run(prepared, tokenizer, max_length=128, tokenizer_source="packaged:minilm-l6")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("packaged:minilm-l6 cannot read this text: ")
    assert "above tokenization.max_unk_fraction 0.2" in msg and "pretrain.enabled: true" in msg

    # allowed through: the figures are in the report, with the characters it cannot read
    _, report = run(prepared, tokenizer, max_length=128, tokenizer_source="packaged:minilm-l6",
                    max_unk_fraction=1.0)
    c = report["coverage"]["train"]
    assert c["unk_fraction"] > 0.3 and c["uncovered_char_fraction"] > 0.3
    assert len(c["top_uncovered"]) == 10 and c["top_uncovered"][0][1] >= c["top_uncovered"][-1][1]
    assert sum("cannot read this text" in w for w in report["warnings"]) == 1
    assert TokenReport.from_dict(json.loads(json.dumps(report))).unknown_fraction() > 0.3


def test_english_text_passes_quietly(tmp_path, tokenizer):
    rows = [(f"the room was clean and the staff were friendly, number {i}", i % 2) for i in range(40)]
    _, report = run(_prepared(tmp_path, rows), tokenizer, max_length=64, tokenizer_source="packaged:minilm-l6")
    assert {c["unk_fraction"] for c in report["coverage"].values()} == {0.0}
    assert {c["uncovered_char_fraction"] for c in report["coverage"].values()} == {0.0}
    assert report["warnings"] == []


def test_a_few_unknown_characters_warn(tmp_path, tokenizer):
    rows = [(f"the room was clean and quiet, stayed {i} nights 酒店", i % 2) for i in range(40)]
    _, report = run(_prepared(tmp_path, rows), tokenizer, max_length=64, tokenizer_source="packaged:minilm-l6")
    assert len(report["warnings"]) == 1
    assert "packaged:minilm-l6 cannot read this text" in report["warnings"][0]
    assert "model.source" in report["warnings"][0]


def test_stage_refuses_and_writes_nothing(tmp_path, capsys):
    prepared = _prepared(tmp_path, ZH_REVIEWS)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"variants": {"full": {}}}))
    out = tmp_path / "tokenized"
    with pytest.raises(DataError, match="cannot read this text"):
        tokenization_stage.main(["--params", str(params), "--prepared", str(prepared), "--out", str(out)])
    assert not out.exists()

    params.write_text(yaml.safe_dump({"variants": {"full": {}}, "tokenization": {"max_unk_fraction": 0.9}}))
    tokenization_stage.main(["--params", str(params), "--prepared", str(prepared), "--out", str(out)])
    captured = capsys.readouterr()
    assert "coverage train:" in captured.out and "of characters not in the vocabulary" in captured.out
    assert captured.err.count("cannot read this text") == 1
    assert TokenReport.read(out / "report.json").unknown_fraction() > 0.3


def test_old_token_report_still_reads():
    old = TokenReport.from_dict({"splits": {"train": {"p95": 40, "tokens": 10}}, "report_version": 1})
    assert old.unknown_fraction() is None and old.coverage == {}
