"""BERT's masking for masked-LM pretraining (Devlin et al. 2019), deterministic per step.

Of the real (non-pad, non-special) tokens, each is chosen with probability p (0.15); a chosen token is
    80%  replaced by [MASK]        the model must predict it from context
    10%  replaced by a random one  so the model cannot trust any visible token blindly
    10%  kept                      so the representation of the visible token stays useful
and its label is the original id; every other position's label is -100 (ignored by the loss). A batch in
which nothing was chosen gets one chosen token (its loss would otherwise be 0/0).

The draws come from a generator seeded by (seed, step), not from torch's global stream: a run resumed at
step s masks exactly as the uninterrupted one did.
"""
from __future__ import annotations

import torch

IGNORE = -100  # cross_entropy's ignore_index


def step_generator(seed: int, step: int) -> torch.Generator:
    """The masking draws of optimizer step `step` (CPU generator; the masks move to the device after)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_id: int, special_ids: list,
                vocab_size: int, probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels) for a [B, T] batch on the CPU; the inputs are not modified."""
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    if not chosen.any() and maskable.any():  # at least one prediction per batch
        first = maskable.flatten().nonzero()[0]
        chosen.view(-1)[first] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    # random replacements are drawn from the ordinary tokens only (never [CLS], [PAD], [MASK], ...)
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special[special < vocab_size]] = False
    pool = ordinary.nonzero().flatten()
    random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator)].to(input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels
