"""Device choice and DistributedDataParallel set-up, detected from the environment torchrun sets.

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) the process group is initialised here: NCCL when CUDA is available, gloo on CPU.
A plain run is a world of one. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (identity in a world of one)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _device(choice: str, local_rank: int) -> torch.device:
    if choice not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {choice!r}")
    use_cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested, but CUDA is not available")
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


@contextmanager
def distributed(device: str = "auto") -> Iterator[Distributed]:
    """The process's rank, world size and device; joins (and afterwards leaves) the torchrun process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    created = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    try:
        yield Distributed(rank, world, dev)
    finally:
        if created:
            dist.destroy_process_group()
