"""Process-group set-up for DistributedDataParallel under torchrun, and rank-0 helpers.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``from_environment`` reads them once, at the entry point, and the resulting
``DistContext`` is passed down. A single process is the special case world_size == 1, so the
loop has no separate non-distributed path.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fraudflow.errors import ConfigError

__all__ = ["DistContext", "cleanup", "from_environment", "single_process"]

# A rank that dies leaves the others blocked in a collective; this bounds the wait so the job
# ends with an error instead of hanging (torchrun then tears the group down).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def single_process(device: torch.device) -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=device)


def from_environment(env: Mapping[str, str], device_name: str) -> DistContext:
    """Join the process group torchrun describes in ``env`` (NCCL on CUDA, gloo on CPU)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") if k not in env]
    if missing:
        raise ConfigError(
            f"--ddp needs to run under torchrun, however {', '.join(missing)} "
            "is not set (e.g. torchrun --nproc-per-node 2 -m fraudflow train ... --ddp)"
        )
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = _device_for(device_name, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def _device_for(device_name: str, local_rank: int) -> torch.device:
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, however no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # A DDP wrapper left in a reference cycle (by a training error's traceback, say) must go
        # before its process group: freed after it, it aborts the process at exit (seen with
        # gloo: "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
