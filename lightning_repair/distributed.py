"""Sharding a repair round's passes across DDP ranks, and keeping every rank's decisions identical.

With one process every function here is the identity, so single-process code paths stay plain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn


def _distributed(strategy: Strategy) -> bool:
    return strategy.world_size > 1 and dist.is_available() and dist.is_initialized()


def gather_sharded(strategy: Strategy, indices: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
    """``compute(indices)`` with each rank computing one contiguous share, the results gathered on every rank.

    Args:
        strategy: the Trainer's strategy.
        indices: what to compute on, e.g. dataset indices.
        compute: maps a share of ``indices`` to one row of results per index (a tensor of any trailing shape).
    """
    if not _distributed(strategy):
        return compute(indices)
    share = math.ceil(len(indices) / strategy.world_size)
    mine = indices[strategy.global_rank * share:(strategy.global_rank + 1) * share]
    result = compute(mine)
    padded = result.new_zeros((share, *result.shape[1:]))  # all_gather needs equal shapes on every rank
    padded[: len(result)] = result
    gathered = strategy.all_gather(padded.to(strategy.root_device))
    return gathered.reshape(-1, *result.shape[1:])[: len(indices)].to(result.device)


def sum_across_ranks(strategy: Strategy, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Elementwise sums over the ranks of per-parameter tensors."""
    if not _distributed(strategy):
        return list(tensors)
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def broadcast_parameters(strategy: Strategy, model: nn.Module) -> None:
    """Copies rank 0's parameter values to every rank, so a treatment ends with identical weights everywhere."""
    if not _distributed(strategy):
        return
    with torch.no_grad():
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)
