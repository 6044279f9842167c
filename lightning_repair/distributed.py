"""Sharding a repair round's passes across DDP ranks, and keeping every rank's decisions identical.

With one process every function here is the identity, so single-process code paths stay plain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn


@dataclass(frozen=True)
class Ranks:
    """The processes a computation is split across, and how their shares combine.

    The default, :data:`SINGLE_PROCESS`, is one process: :meth:`gather` is ``compute(indices)`` and :meth:`sum`
    returns its argument, so code written against ``Ranks`` needs no single-process branch. Under DDP,
    :func:`ranks_of` builds it from the Trainer's strategy; every rank must then call each method in the same order.

    Attributes:
        rank: this process's global rank, in ``[0, world_size)``.
        world_size: the number of processes.
        device: where the collectives need their tensors: the process's CUDA device for NCCL, the CPU for gloo.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``range(n)``: ⌈n / world_size⌉ items, fewer or none on the last ranks."""
        size = math.ceil(n / self.world_size)
        return slice(min(self.rank * size, n), min((self.rank + 1) * size, n))

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of every rank's ``tensor``, on every rank (a new tensor; ``tensor`` is unchanged)."""
        if self.world_size == 1:
            return tensor
        total = tensor.to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def sum_each(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`sum` of each of ``tensors`` (e.g. one per parameter), in one collective."""
        if self.world_size == 1:
            return list(tensors)
        flat = self.sum(torch.cat([t.flatten() for t in tensors]))
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def broadcast(self, model: nn.Module) -> None:
        """Copies rank 0's parameter values into ``model`` on every rank, so all ranks end with the same weights."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for parameter in model.parameters():
                value = parameter.data.to(self.device)
                dist.broadcast(value, src=0)
                parameter.data.copy_(value)

    def gather(self, indices: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(indices)``, each rank computing its :meth:`share`, the results gathered in order on every rank.

        Args:
            indices: what to compute on, e.g. dataset indices.
            compute: maps a share of ``indices`` to one row of results per index (a tensor of any trailing shape).
        """
        if self.world_size == 1 or len(indices) == 0:
            return compute(indices)
        mine = indices[self.share(len(indices))]
        # A rank with an empty share still computes one row, only to learn the result's shape and dtype.
        result = compute(mine) if len(mine) else compute(indices[:1])[:0]
        size = math.ceil(len(indices) / self.world_size)
        padded = result.new_zeros((size, *result.shape[1:]), device=self.device)  # all_gather needs equal shapes
        padded[: len(result)] = result
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[: len(indices)].to(result.device)


SINGLE_PROCESS = Ranks()


def ranks_of(strategy: Strategy | None) -> Ranks:
    """The Trainer's processes as :class:`Ranks`; :data:`SINGLE_PROCESS` for one process or no strategy."""
    if strategy is None or strategy.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    return Ranks(rank=strategy.global_rank, world_size=strategy.world_size, device=strategy.root_device)
