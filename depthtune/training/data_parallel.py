"""Data parallelism under `torchrun --nproc_per_node N`: one process per device, gradients averaged.

Each process takes every N-th example of the global batch; after backward one flat all-reduce
averages the gradients, so every rank applies the same update and the weights stay identical.
Not torch's DistributedDataParallel: DDP averages only a backward that ran through DDP.forward, and a
cached-prefix step calls the model's top blocks directly (prefix_cache.top_forward): measured, its gradients then
differ across ranks, silently (bench/ddp_bypass.py, recorded by bench/library_choices.py). This all-reduce runs
after backward, whatever ran forward.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Under `torchrun --nproc_per_node N`: gloo on the CPU, NCCL on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def all_reduce_grads(model: nn.Module, world: int) -> None:
    """Average gradients over ranks: one flat all-reduce (the same sum DDP's buckets compute)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def params_in_sync(model: nn.Module) -> bool:
    """Every rank holds bit-identical trainable weights (checked once, after training)."""
    rank, world = dist_info()
    if world == 1:
        return True
    total = torch.tensor([float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad],
                         dtype=torch.float64)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)
