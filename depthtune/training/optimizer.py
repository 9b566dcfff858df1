"""The optimizer side of training, shared by fine-tuning (depthtune.training.loop) and pretraining: AdamW's parameter
groups (decay or not; the new head at its own lr), the linear warmup/decay schedule with the cycles of a run's
extensions, and the one optimizer step."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from depthtune.model.param_names import classify_param


def param_groups(model: nn.Module, weight_decay: float, head_lr: Optional[float] = None) -> list[dict]:
    """AdamW groups: decay matrices, never biases or norm gains. `head_lr`: the new head's parameters (the `head`
    bucket of depthtune.model.param_names: a classifier) in groups of their own at that lr."""
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}  # (head?, decay?)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"))
        groups[(head_lr is not None and classify_param(name) == "head", decay)].append(p)
    out = [{"params": groups[(False, True)], "weight_decay": weight_decay},
           {"params": groups[(False, False)], "weight_decay": 0.0}]
    if head_lr is not None:
        out += [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": head_lr}
                for (head, decay), ps in groups.items() if head and ps]
    return out


class LinearSchedule:
    """The lr factor at a step: linear warmup over `warmup` steps, linear decay to 0 at `total`. Past `total`, for
    each of `extensions` cycles of `extension` steps (a run its budget ended while still rising, given more), the
    same shape again: warmup over the same share, decay to 0 at the cycle's end. Beyond them: 0.

    An object, not a closure: LambdaLR saves its attributes with the scheduler, so a resumed run has its
    extensions back."""

    def __init__(self, warmup: int, total: int, extension: int = 0, extensions: int = 0):
        self.warmup, self.total, self.extension, self.extensions = warmup, total, extension, extensions

    @staticmethod
    def shape(step: int, warmup: int, total: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    def __call__(self, step: int) -> float:
        if step < self.total or not self.extension:
            return self.shape(step, self.warmup, self.total)
        cycle, within = divmod(step - self.total, self.extension)
        if cycle >= self.extensions:
            return 0.0
        return self.shape(within, self.warmup * self.extension // max(1, self.total), self.extension)


def build_optimizer(model: nn.Module, cfg, total_steps: int, *, extension_steps: int = 0,
                    head_lr: Optional[float] = None):
    """AdamW + LinearSchedule (warmup_fraction of the steps, then linear decay to 0; `extension_steps`: the length
    of each extension cycle past total_steps). `head_lr`: the new head's own lr (param_groups)."""
    # fused AdamW on the CPU too: measured here on MiniLM's 22.7M parameters, one step took
    # 0.25 s fused vs 4.5 s foreach (the multi-tensor path makes several passes over memory)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, head_lr), lr=cfg.lr, betas=(0.9, 0.999),
                                  eps=1e-8, fused=True)
    warmup = int(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearSchedule(warmup, total_steps, extension_steps))
    return optimizer, scheduler


def apply_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float) -> None:
    """The one optimizer step (fine-tuning and pretraining): clip the trainable gradients, step the optimizer and
    the schedule, clear the gradients."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
