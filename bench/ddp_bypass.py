"""Does torch's DistributedDataParallel average the gradients of a step that does not run through its forward?

    torchrun --nproc_per_node 2 -m bench.ddp_bypass

The frozen-prefix cache trains a train_top variant by calling the model's top blocks on cached hidden states
(depthtune.training.prefix_cache.top_forward), never the model's forward. DDP arms its gradient reducer in
DDP.forward: a backward that bypasses it is not averaged, silently. Two processes, different data, the same tiny
model: prints whether the gradients agree across ranks through DDP.forward and around it (bench/library_choices.py
records the answer; depthtune.training.data_parallel all-reduces explicitly after backward, whatever ran forward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def grads_agree(g: torch.Tensor) -> bool:
    both = [torch.zeros_like(g) for _ in range(dist.get_world_size())]
    dist.all_gather(both, g)
    return all(torch.allclose(both[0], x) for x in both[1:])


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(3, 4) + rank  # each rank its own data
    ddp(x).sum().backward()
    through = grads_agree(model[1].weight.grad.clone())
    model.zero_grad()
    model[1](model[0](x).detach()).sum().backward()  # the top only, as a cached-prefix step runs it
    around = grads_agree(model[1].weight.grad.clone())
    if rank == 0:
        print(f"ddp_bypass: through DDP.forward grads agree across ranks: {through}; around it: {around}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
