"""The project's collectives, with ONE meaning of ``group``.

``group=None`` means one process: no collective is made, :func:`all_reduce` returns its input as it
is, :func:`group_size` is 1 and :func:`group_rank` 0. The whole world is never implied: pass it
explicitly (``torch.distributed.group.WORLD``). torch.distributed itself reads ``group=None`` as the
default (world) group, so code that calls it directly with a group that may be None silently
reduces over every rank; every reduction in ``ops``, ``rollout``, ``algorithms`` and ``models``
goes through here instead.

A group of one rank makes no collective call either, so single-process runs (tests, the demo,
``group=None``) need no initialised process group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: Optional[ProcessGroup]) -> int:
    """Ranks in ``group``; 1 for ``None`` (one process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank in ``group``; 0 for ``None`` (one process)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """``t`` reduced in place with ``op`` (SUM, MAX, MIN, ...) over ``group``, and returned.

    ``group=None`` or a group of one rank: ``t`` unchanged, no communication."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather(t: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """``t`` of every rank of ``group`` (same shape everywhere), concatenated along dim 0 in rank order.

    ``group=None`` or a group of one rank: ``t`` itself, no communication."""
    n = group_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)
