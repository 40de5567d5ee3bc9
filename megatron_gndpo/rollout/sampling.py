"""Token sampling from vocab-sharded logits, without gathering the vocabulary."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@torch.no_grad()
def vocab_parallel_sample(
    logits_shard: torch.Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token id per row of ``logits_shard`` ``[B, V_local]`` -> ``[B]`` global ids, identical on
    every rank of ``group``.

    Gumbel-max: argmax_v(x_v / T + G_v) with iid Gumbel noise is a sample of softmax(x / T); each
    rank draws noise for its own shard, then one MAX all-reduce finds the winning value and a second
    one the winning id. ``temperature == 0`` is greedy.
    """
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    v_local = logits_shard.shape[-1]
    start = rank * v_local
    x = logits_shard.float()
    if temperature > 0:
        u = torch.rand(x.shape, generator=generator, device=x.device).clamp_(1e-20, 1.0)
        x = x / temperature - torch.log(-torch.log(u))
    if vocab_size is not None and start + v_local > vocab_size:
        x[..., max(vocab_size - start, 0):] = float("-inf")
    best, idx = x.max(dim=-1)
    if world == 1:
        return idx + start
    global_best = best.clone()
    dist.all_reduce(global_best, op=dist.ReduceOp.MAX, group=group)
    # ties across shards go to the highest id, the same on every rank
    candidate = torch.where(best == global_best, idx + start, torch.full_like(idx, -1))
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=group)
    return candidate
