"""Vocabulary coverage: how much of the text a tokenizer can actually represent.

A WordPiece vocabulary built for English (the packaged MiniLM: 30,522 pieces, 244 single CJK
characters) turns most of a Chinese review into [UNK]; the model then trains and scores on noise
and nothing else says so. Two figures per split:
  unk_fraction           unknown tokens / tokens (special tokens not counted), of the untruncated text
  uncovered_char_fraction  characters whose only token is [UNK] / non-space characters
The second one is measured per distinct character (each tokenized once, cached across splits), so
it costs one batched tokenizer call on a few thousand characters, not another pass over the data.
A byte-level tokenizer (GPT-2, Llama) represents every character: both figures are 0 there.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

WARN_FRACTION = 0.01  # above 1% unknown a person should know; the refusal threshold is a param
TOP_UNCOVERED = 10
WAY_OUT = ("use a model whose vocabulary fits the language (model.source), or develop a tokenizer "
           "from the data (pretrain.enabled: true, as examples/from-zero-zh does)")


def unk_token_id(tokenizer) -> Optional[int]:
    """The id that means 'unknown', or None when the tokenizer has none that it ever emits for text.

    GPT-2's unk is its <|endoftext|> (also eos): a byte-level BPE never produces it for text."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    others = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "cls", "sep")}
    return None if unk in others else int(unk)


def uncovered_chars(texts, tokenizer, cache: dict) -> tuple[int, Counter]:
    """(non-space characters, Counter of the characters that map only to [UNK]) over `texts`.

    `cache` (char -> True when uncovered) is shared across splits: each distinct character is
    tokenized once, in one batched call per split."""
    counts = Counter("\n".join(texts))  # counted in C: ~0.1 s for 1M characters
    unk = unk_token_id(tokenizer)
    new = [c for c in counts if c not in cache and not c.isspace()]
    if new:
        if unk is None:
            cache.update(dict.fromkeys(new, False))
        else:
            ids = tokenizer(new, add_special_tokens=False, verbose=False)["input_ids"]
            # uncovered: the character's tokens are all [UNK]; an empty encoding (control characters,
            # combining accents the normalizer strips) is a deliberate drop, not a gap in the vocabulary
            cache.update({c: bool(toks) and all(t == unk for t in toks) for c, toks in zip(new, ids)})
    total = sum(n for c, n in counts.items() if not c.isspace())
    missing = Counter({c: n for c, n in counts.items() if cache.get(c)})
    return total, missing


def split_coverage(texts, *, unk_tokens: int, tokens: int, tokenizer, cache: dict) -> dict:
    """One split's coverage record (goes to report.json's `coverage`)."""
    chars, missing = uncovered_chars(texts, tokenizer, cache)
    n_missing = sum(missing.values())
    return {
        "unk_tokens": int(unk_tokens),
        "tokens": int(tokens),
        "unk_fraction": round(unk_tokens / tokens, 4) if tokens else 0.0,
        "chars": chars,
        "uncovered_chars": n_missing,
        "uncovered_char_fraction": round(n_missing / chars, 4) if chars else 0.0,
        "top_uncovered": [[c, n] for c, n in missing.most_common(TOP_UNCOVERED)],
        "unk_token": None if unk_token_id(tokenizer) is None else str(tokenizer.unk_token),
    }


def worst(coverage: dict) -> tuple[str, str, float]:
    """(split, figure name, share) of the largest unknown share over splits and both figures."""
    best = ("", "unk_fraction", 0.0)
    for split, c in coverage.items():
        for key in ("unk_fraction", "uncovered_char_fraction"):
            if c.get(key, 0.0) > best[2]:
                best = (split, key, float(c[key]))
    return best


def describe(split: str, c: dict) -> str:
    """'train: 41.2% of tokens [UNK], 68.0% of characters not in the vocabulary (top: 店 120, 的 98)'."""
    top = ", ".join(f"{ch} {n}" for ch, n in c.get("top_uncovered", [])[:5])
    return (f"{split}: {c['unk_fraction']:.1%} of tokens unknown, {c['uncovered_char_fraction']:.1%} of characters "
            f"not in the vocabulary" + (f" (most frequent: {top})" if top else ""))


def check(coverage: dict, *, source: str, max_fraction: float) -> tuple[list, Optional[str]]:
    """(warning lines, refusal line or None): warn above 1%, refuse above `max_fraction`."""
    split, key, share = worst(coverage)
    what = "of tokens unknown" if key == "unk_fraction" else "of characters not in the vocabulary"
    line = f"{source} cannot read this text: {split} has {share:.1%} {what}"
    if share > max_fraction:
        return [], (f"{line}, above tokenization.max_unk_fraction {max_fraction:g}; {WAY_OUT}")
    if share > WARN_FRACTION:
        return [f"{line}; accuracy on unknown tokens means little: {WAY_OUT}"], None
    return [], None
