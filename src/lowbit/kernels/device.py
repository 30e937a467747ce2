"""What the kernels' launch sizes read from the GPU they run on, looked up once per device."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def per_device(lookup: Callable[[torch.device], T]) -> Callable[[torch.device], T]:
    """``lookup`` run once per device, its results kept in a plain dict rather than by ``functools.cache``: kernel
    launches that torch.compile traces call these, and Dynamo warns at every lru_cache-wrapped call it traces."""
    seen: dict[torch.device, T] = {}

    @functools.wraps(lookup)
    def once(device: torch.device) -> T:
        if device not in seen:
            seen[device] = lookup(device)
        return seen[device]
    return once


@per_device
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 off CUDA (grids sized from it stay valid)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@per_device
def hopper(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9.0 or more (clusters, programmatic dependent
    launch)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@per_device
def shared_memory(device: torch.device) -> tuple[int, int]:
    """(bytes of shared memory one block may opt in to, bytes per SM) on ``device``. Off CUDA an H100's (227 KB,
    228 KB): the CPU-run kernels (``cuda_host``) are sized as on the GPUs they are written for."""
    if device.type != "cuda":
        return 227 * 1024, 228 * 1024
    props = torch.cuda.get_device_properties(device)
    per_sm = props.shared_memory_per_multiprocessor
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block), per_sm
