"""Processes of one training job: torchrun / SageMaker's torch_distributed, or just one.

Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def log(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, flush=True)


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def setup_distributed() -> tuple[Dist, torch.device]:
    """torchrun / SageMaker torch_distributed set WORLD_SIZE, RANK, LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=global_rank(), local_rank=local_rank, world=world), device


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
