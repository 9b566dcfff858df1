"""A causal LM's next-token loss, per text: what training, evaluation and the served model all compute.

Position t's logits predict token t+1, so a text of n tokens gives n - 1 predictions (its first token,
BOS or [CLS], is never predicted); pad positions and a prompt's tokens (before `loss_start`) predict
nothing that counts. Only torch: the served model (depthtune.serving) imports this and nothing of training.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              loss_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nll per row [B], predicted tokens per row [B]) of next-token prediction, in fp32.

    `loss_start` [B]: the first target position that counts per row (prompt tokens before it are
    context only); None = every real token after the first.
    """
    targets = input_ids[:, 1:]
    counted = attention_mask[:, 1:].bool()
    if loss_start is not None:
        pos = torch.arange(1, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        counted = counted & (pos >= loss_start.unsqueeze(1))
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    nll = nll * counted
    return nll.sum(dim=1), counted.sum(dim=1)


def mean_loss(nll: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The training loss of a batch: nats per predicted token (a batch without one scores 0, no NaN)."""
    return nll.sum() / tokens.sum().clamp(min=1)
