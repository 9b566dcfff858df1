"""Shared fixtures: offline settings, the shared datasets, a tiny random-init BERT."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from depthtune import runtime  # noqa: F401  (offline env before anything imports transformers)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY_ARCH = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    # evaluate writes lock files under HF_HOME; keep tests off the user's cache
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the shared datasets must sit beside the project checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from depthtune.config import ModelConfig
    from depthtune.sources import load_tokenizer

    return load_tokenizer(ModelConfig())


def read_sst2(path: Path, n: int, offset: int = 0) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        next(fh)
        for i, line in enumerate(fh):
            if i < offset:
                continue
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text)
            labels.append(int(label))
            if len(texts) >= n:
                break
    return texts, labels
