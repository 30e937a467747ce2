"""Several processes quantizing one model together: one per GPU (NCCL), or CPU processes (gloo).

``torchrun --nproc-per-node N -m lowbit.cli quantize ...`` starts them; each loads (or streams) the model and draws
the same calibration windows, then keeps every N-th one (:meth:`Ranks.shard`). Per decoder layer:

* each rank runs its windows through the layer; the Hessians are summed over the ranks, weighted by the rows each
  saw (:meth:`Ranks.all_reduce_hessians`), so every rank holds the Hessian of all windows;
* the layer's rounding problems (one per shared Hessian: q/k/v, o, gate/up, down) are dealt by their estimated cost
  (:meth:`Ranks.assign`), each rounded by one rank, and the quantized modules are exchanged
  (:meth:`Ranks.exchange_modules`), so every rank holds the same quantized layer;
* each rank runs its own windows through the quantized layer: the next layer's inputs stay sharded.

The result is one process's up to the summation order of the Hessians (float tolerance). Only rank 0 writes the
output and the quantized layers of a checkpoint; every rank writes its own shard of the activations.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def assign(self, costs: list[float]) -> list[int]:
        """The rank that does each job: largest first, each to the least loaded rank (the same answer on every
        rank, from the same costs)."""
        load, owner = [0.0] * self.world, [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            owner[job] = min(range(self.world), key=lambda r: (load[r], r))
            load[owner[job]] += costs[job]
        return owner

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows: every ``world``-th, from its rank on."""
        if samples.shape[0] < self.world:
            raise LowbitError(f"{samples.shape[0]} calibration windows cannot be shared by {self.world} processes: "
                              f"use --nsamples {self.world} or more")
        return samples[self.rank :: self.world]

    def all_reduce_hessians(self, groups: list[tuple[tuple[str, ...], torch.Tensor, int]]
                            ) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """[(names, H of this rank's rows, rows)] -> [(names, H of every rank's rows)]: H = 2/N X^T X, so the sum
        over ranks weighs each rank's H by its rows."""
        import torch.distributed as dist

        rows = torch.tensor([float(r) for _, _, r in groups], dtype=torch.float64, device=groups[0][1].device)
        dist.all_reduce(rows)
        out = []
        for (names, H, n), total in zip(groups, rows.tolist(), strict=True):
            H = H * (n / total) if total else H.clone()
            dist.all_reduce(H)
            out.append((names, H))
        return out

    def exchange_modules(self, mine: dict[str, tuple[nn.Module, object]], device: torch.device | str
                         ) -> dict[str, tuple[nn.Module, object]]:
        """Every rank's {name: (quantized module, stats)} -> all of them, modules on ``device``. The modules'
        structure travels pickled without its data (on the meta device, a few kB); their tensors are then
        broadcast by their owners, device to device (NCCL) or between processes (gloo), never pickled."""
        import torch.distributed as dist

        shells = {name: (copy.deepcopy(m).to("meta"), s) for name, (m, s) in mine.items()}
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, shells)
        out = {}
        for owner, part in enumerate(gathered):
            for name, (shell, s) in sorted(part.items()):
                module = mine[name][0] if owner == self.rank else shell.to_empty(device=device)
                for t in (*module.parameters(), *module.buffers()):
                    dist.broadcast(t.data, src=owner)
                out[name] = (module, s)
        return out

    def from_lead(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (a work folder's name, say)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def current() -> Ranks | None:
    """The process group this process belongs to, or None when it runs alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size())
    return None


def launched() -> bool:
    """Started by torchrun (or another launcher setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None) -> tuple[Ranks, str]:
    """Join the group torchrun describes in the environment: (ranks, this process's device). GPUs: NCCL, one GPU
    per process by LOCAL_RANK; CPUs (``--device cpu`` or no GPU): gloo."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise LowbitError(f"process {local} has no GPU of its own ({torch.cuda.device_count()} visible): start "
                              "at most one process per GPU")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    ranks = current()
    if ranks is None:
        raise LowbitError("torch.distributed started a group of one process")
    return ranks, f"cuda:{local}" if use_cuda else "cpu"
