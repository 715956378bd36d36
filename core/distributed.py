"""Several processes under ``torchrun`` (DDP): this process's device and rank, and rank 0's values.

Without ``torchrun`` (``WORLD_SIZE`` unset) a run is one process, rank 0, and :func:`broadcast`
returns its argument.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["broadcast", "init_distributed"]


def init_distributed(device_pref: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); initialises DDP when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_pref.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device_pref.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if device_pref == "cuda" else torch.device(device_pref)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_pref)
    return device, rank, world


def broadcast(obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (itself without DDP)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
