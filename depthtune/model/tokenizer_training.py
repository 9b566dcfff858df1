"""A tokenizer trained on the corpus itself (developing a model from zero: `pretrain.tokenizer`).

When the packaged vocabulary does not fit the data (MiniLM's 30,522 English word pieces hold 244 single
Chinese characters), a model that is to be pretrained from zero gets a tokenizer of its own, trained with
the `tokenizers` library on the training split's texts (never on validation or test texts):
    wordpiece       encoders (BERT-style): [CLS] text [SEP], [PAD] [UNK] [MASK]; BERT's normalizer puts
                    spaces around CJK characters, so each Chinese character is a token (plus word pieces
                    of the alphabetic scripts)
    bytelevel_bpe   decoders (GPT-2/Llama-style): byte-level BPE, so no text is ever unknown;
                    <|endoftext|> ends a text and pads
The result is a standard Hugging Face tokenizer folder (tokenizer.json + config) that `model.tokenizer`
can name, and `coverage` measures what any tokenizer leaves unknown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from depthtune.errors import ConfigError
from depthtune.files import atomic_dir

KINDS = ("wordpiece", "bytelevel_bpe")
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOT = "<|endoftext|>"


def build_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """A BERT-style WordPiece tokenizer (lower-cased, CJK characters split) trained on `texts`.

    The pieces come from BPE training (the `tokenizers` BpeTrainer, which is deterministic), each kept twice:
    as a word start `p` and as a continuation `##p`. The library's own WordPieceTrainer is not deterministic
    (its continuation pieces get ids in hash-map order, which breaks ties differently in every process:
    measured, 5 runs gave 5 vocabularies), and the same data and seed must give the same model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=True)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer, bpe.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    budget = max(2, (vocab_size - len(WORDPIECE_SPECIALS)) // 2)  # each piece twice: p and ##p
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency,
                                                               special_tokens=[], show_progress=False))
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    vocab: dict = {}
    for token in WORDPIECE_SPECIALS + pieces + ["##" + p for p in pieces]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


def build_bytelevel_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE tokenizer (every byte is a token: nothing is unknown) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok, {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": EOT}


def train_tokenizer(texts: list[str], out_dir: str | Path, *, kind: str = "wordpiece", vocab_size: int = 8000,
                    min_frequency: int = 2, max_length: int = 512) -> Path:
    """Train a tokenizer of `kind` on `texts` and save it as a Hugging Face folder (written all at once)."""
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not texts:
        raise ConfigError("tokenizer training: no texts to train on")
    build = build_wordpiece if kind == "wordpiece" else build_bytelevel_bpe
    tok, specials = build(texts, vocab_size, min_frequency)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials)
    with atomic_dir(Path(out_dir)) as tmp:
        fast.save_pretrained(str(tmp))
    return Path(out_dir)


def coverage(tokenizer, texts: list[str]) -> dict:
    """{unk_fraction, tokens, unk_tokens}: the share of a tokenizer's tokens on `texts` that are unknown
    (0 for a byte-level tokenizer, whose unk is never produced)."""
    unk = tokenizer.unk_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    unknown = sum(t == unk for x in ids for t in x) if unk is not None else 0
    return {"tokens": total, "unk_tokens": unknown, "unk_fraction": unknown / total if total else 0.0}
