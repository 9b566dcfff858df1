"""Reading data/tokenized (written by the tokenization stage) back for training and evaluation."""
from __future__ import annotations

from pathlib import Path

from depthtune.errors import DataError, first_line


def load_tokenized(path: str | Path):
    """The saved datasets.DatasetDict (train / validation / test), or a one-line DataError."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: tokenized data not found (run `dvc repro tokenization` first)")
    try:
        return load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001  (any unreadable dataset: one line naming the folder)
        raise DataError(f"{path}: unreadable tokenized dataset ({first_line(exc, 120)})") from None


def check_vocab(split, vocab_size: int, path: str | Path) -> None:
    """Every token id fits the model's embedding table (else the data was tokenized for another model)."""
    top = max((max(ids) for ids in split["input_ids"] if ids), default=0)
    if top >= vocab_size:
        raise DataError(f"{path}: token id {top} is outside the model's vocabulary of {vocab_size}; "
                        "the data was tokenized for another model (re-run the tokenization stage)")
