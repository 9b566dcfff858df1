"""Scoring a causal language model: perplexity, bits per byte, continuations (the loss: depthtune.evaluation.next_token).

Position t's logits predict token t+1, so a text of n tokens gives n - 1 predictions (its first
token, BOS or [CLS], is never predicted). Pad positions predict nothing. Per text we keep the summed
negative log-likelihood (nats) and the number of predicted tokens; every corpus figure is a ratio
of sums, so texts weigh by their tokens, and a bootstrap over texts resamples (nll, tokens, bytes):
    loss          = sum nll / sum tokens                         (nats per token)
    perplexity    = exp(loss)
    bits_per_byte = sum nll / ln 2 / sum bytes                   (UTF-8 bytes of the texts: comparable
                                                                  across tokenizers, unlike perplexity)
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from depthtune.data.batching import Examples, autocast, collate
from depthtune.evaluation.next_token import token_nll
from depthtune.evaluation.scoring_batch import scoring_batch_size


@torch.no_grad()
def score_texts(model: nn.Module, ex: Examples, *, batch_size: int, device: str, pad_id: int,
                autocast_dtype: Optional[torch.dtype] = None,
                top: Optional[Callable[[list], torch.Tensor]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed nll, predicted tokens) per text, in the split's order.

    `top(index) -> logits`: the cached path (only the trainable top runs on the frozen prefix's
    outputs); None runs the whole model.
    """
    was_training = model.training
    model.eval()
    nll, tokens = np.zeros(len(ex), dtype=np.float64), np.zeros(len(ex), dtype=np.int64)
    order = sorted(range(len(ex)), key=ex.lengths.__getitem__)
    size = scoring_batch_size(model.config.vocab_size, max(ex.lengths, default=1), batch_size)
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        batch = {k: v.to(device) for k, v in collate(ex, idx, pad_id).items() if k != "labels"}
        with autocast(device, autocast_dtype):
            logits = top(idx) if top is not None else model(**batch).logits
        row_nll, row_tokens = token_nll(logits, batch["input_ids"], batch["attention_mask"],
                                        loss_starts(ex, idx, device))
        nll[idx], tokens[idx] = row_nll.double().cpu().numpy(), row_tokens.cpu().numpy()
    model.train(was_training)
    return nll, tokens


def loss_starts(ex: Examples, index: list[int], device: str) -> Optional[torch.Tensor]:
    """Per row, the first position whose token counts (prompt/completion data), or None."""
    if ex.loss_start is None:
        return None
    return torch.tensor([ex.loss_start[i] for i in index], device=device)


@torch.no_grad()
def continuations(model: nn.Module, tokenizer, texts_ids: list[list[int]], *, max_new_tokens: int, device: str,
                  prompt_tokens: int = 16, prompt_lengths: Optional[list] = None) -> list[dict]:
    """Greedy continuations of the first `prompt_tokens` tokens of each tokenized text (fewer for a short
    one: all but its last token), or of its prompt (`prompt_lengths`, > 0 for prompt/completion pairs):
    [{prompt, continuation, reference}] as text, the reference being the rest of the text (the completion).
    Greedy (no sampling): the same model gives the same text, so results reproduce.
    """
    was_training = model.training
    model.eval()
    out = []
    for i, ids in enumerate(texts_ids):
        keep = max(1, min(prompt_tokens, len(ids) - 1))
        if prompt_lengths is not None and 0 < prompt_lengths[i] < len(ids):
            keep = prompt_lengths[i]
        else:  # end the prompt between words: a WordPiece continuation token ("##rama") starts no reference
            while keep > 1 and tokenizer.convert_ids_to_tokens(ids[keep]).startswith("##"):
                keep -= 1
        prompt = torch.tensor([ids[:keep]], device=device)
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=model.config.pad_token_id)
        out.append({"prompt": tokenizer.decode(ids[:keep], skip_special_tokens=True),
                    "continuation": tokenizer.decode(generated[0, keep:].tolist(), skip_special_tokens=True),
                    "reference": tokenizer.decode(ids[keep:], skip_special_tokens=True)})
    model.train(was_training)
    return out
