"""Data-parallel training through torchrun: who am I, on which device, and how results meet across ranks.

Launched by `./train.sh ARCH FOLD --gpus N` (torchrun --standalone) or by torchrun directly for several nodes.
One process per GPU; NCCL on CUDA, gloo on the CPU (used by the tests). Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over ranks (every rank gets it)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather_rows(self, rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
        """Each rank predicted `values` for dataset rows `rows`; every rank gets all n rows back in order."""
        if not self.enabled:
            out = np.empty((n, *values.shape[1:]), values.dtype)
            out[rows] = values
            return out
        parts: list = [None] * self.world
        dist.all_gather_object(parts, (rows, values))
        out = np.empty((n, *values.shape[1:]), values.dtype)
        for r, v in parts:  # padded duplicates write the same value twice
            out[r] = v
        return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed() -> Dist:
    """Dist() for a plain run; under torchrun, join the process group (once) and pick this rank's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank, world, local_rank)
