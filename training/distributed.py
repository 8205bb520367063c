"""This process's place in a run: torchrun's process group, and sums across it.

Under torchrun (WORLD_SIZE > 1) every rank joins one process group (NCCL on CUDA, gloo on
the CPU); alone, nothing is initialised and the sums below are the value itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Joins the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


def all_reduce_sum(value: float, d: Dist) -> float:
    """`value` summed over all ranks (in float64)."""
    if not d.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def average_gradients(module: nn.Module, d: Dist) -> None:
    """Averages `module`'s gradients over the ranks: for parameters that DDP does not wrap."""
    if not d.enabled:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= d.world_size
