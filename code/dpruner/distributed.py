"""Process-group set-up for stage 2: plain PyTorch (1 process or torchrun) or DeepSpeed.

The backend comes from the accelerator (gloo on CPU, nccl on CUDA); nothing is hard-coded to CUDA.
A single process without a launcher gets the rendezvous variables DeepSpeed expects.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpruner.errors import DPrunerError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    use_deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _skip_shm_build(deepspeed_module) -> None:
    """DeepSpeed compiles a shared-memory op (~70 s, needs g++) on CPU init; it only serves inference
    all-reduce, so we switch it off. This touches an internal table: if it moves, the build just runs."""
    table = getattr(getattr(deepspeed_module, "ops", None), "__compatible_ops__", None)
    if isinstance(table, dict) and "deepspeed_shm_comm" in table:
        table["deepspeed_shm_comm"] = False
    else:
        print("warning: DeepSpeed's op table changed; the shm_comm op may be built (about a minute)", file=sys.stderr)


def init_runtime(use_deepspeed: bool) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed:
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
        except ImportError as err:
            raise DPrunerError(f"the config names a DeepSpeed config but deepspeed cannot be imported ({err})") from None
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", _free_port())
        _skip_shm_build(deepspeed)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank, world_size, local_rank, device, use_deepspeed)


def shutdown() -> None:
    """gloo may abort at interpreter exit if the group is left open."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
