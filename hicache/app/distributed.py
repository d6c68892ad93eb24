"""Data-parallel prompt sharding under `torchrun` or `accelerate launch`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); each process
renders ``prompts[rank::world]`` on its own device, and rank 0 merges the per-rank progress files
once a barrier says everyone is done. Without those variables everything is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank :: self.size]

    def device(self, requested: torch.device) -> torch.device:
        if requested.type == "cuda" and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join(device: torch.device) -> World:
    """The process group of the launcher, if launched by one (gloo on CPU, nccl on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    return world


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
