"""Reading data/tokenized (written by the tokenization stage) back for training and evaluation."""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=8)  # per tokenizer object: encode_pair calls it for every pair
def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a text: ([CLS], [SEP]), ([<s>], []), ([], [])."""
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    core = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(framed)) if framed[i:i + len(core)] == core), 0)
    return framed[:at], framed[at + len(core):]


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """One prompt/completion pair as the model sees it: {input_ids, loss_start, n_bytes, untruncated_length}.

    The two parts are tokenized apart (the completion's tokens are the same whatever the prompt) and
    joined inside the tokenizer's own special tokens ([CLS] p c [SEP] for BERT's, <s> p c for Llama's);
    `loss_start` is the first position holding a completion token: the loss counts only tokens from there.
    Truncation cuts the end (max_length); `n_bytes` counts the completion's UTF-8 bytes the model still sees.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    lead, trail = special_frame(tokenizer)
    ids = lead + p + c + trail
    start = len(lead) + len(p)
    kept = ids[:max_length]
    seen = max(0, min(len(c), len(kept) - start))
    n_bytes = len(completion.encode("utf-8")) if seen == len(c) else \
        len(tokenizer.decode(c[:seen], skip_special_tokens=True).encode("utf-8"))
    return {"input_ids": kept, "loss_start": start, "n_bytes": n_bytes, "untruncated_length": len(ids)}
