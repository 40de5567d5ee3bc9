"""Token sampling from vocab-sharded logits, without gathering the vocabulary.

Sampling is Gumbel-max: ``argmax_v(x_v / T + G_v)`` with iid Gumbel noise G is a sample of
``softmax(x / T)``, and the argmax of a sharded vector needs two MAX all-reduces. The noise is
counter-based (a hash of seed, sample row, position and token id), not drawn from a stateful
generator: every rank draws exactly the noise of its own shard and the same sample comes out for
every TP / PP / DP layout, which is what makes whole training steps comparable across layouts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.ops.vocab_parallel import _all_reduce, _Math, vocab_parallel_topk

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)
_ROW, _POS = _i64(0xD1B54A32D192ED03), _i64(0xABC98388FB8FAC03)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seed: int, rows: torch.Tensor, position: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 ``[B, V]`` from a splitmix64 hash of (seed, rows[b], position[b], vocab_ids[v]).

    int64 products wrap modulo 2^64 on CPU and CUDA alike, which is what the mixer relies on."""
    x = (rows.long()[:, None] * _ROW + position.long()[:, None] * _POS + vocab_ids.long()[None, :] * _GOLDEN
         + _i64(seed * 0x632BE59BD9B4E019))
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) * (1.0 / (1 << 53))


def _top_k_mask(x: torch.Tensor, k: int, group) -> torch.Tensor:
    """Keep the k largest entries of the sharded rows (ties at the k-th value are all kept)."""
    kth = vocab_parallel_topk(x, k, group=group)[0][..., -1:]
    return x.masked_fill(x < kth, float("-inf"))


def _top_p_mask(x: torch.Tensor, p: float, group, iters: int = 40) -> torch.Tensor:
    """Keep the nucleus: the tokens whose probability is at least tau, with tau the largest
    threshold whose kept mass is still >= p. Found by bisection (one [B] SUM all-reduce per
    iteration) instead of a global sort, which would need the whole vocabulary on one rank; tau is
    exact to ``2**-iters``."""
    lse = _Math.log_normalizer(x, group)
    probs = torch.exp(x - lse[:, None])
    lo = torch.zeros_like(lse)
    hi = torch.ones_like(lse)
    for _ in range(iters):
        mid = (lo + hi) / 2
        mass = _all_reduce(torch.where(probs >= mid[:, None], probs, 0.0).sum(dim=-1), dist.ReduceOp.SUM, group)
        keep = mass >= p
        lo = torch.where(keep, mid, lo)
        hi = torch.where(keep, hi, mid)
    return x.masked_fill(probs < lo[:, None], float("-inf"))


@torch.no_grad()
def vocab_parallel_sample(
    logits_shard: torch.Tensor,
    *,
    rows: torch.Tensor,
    position: torch.Tensor,
    seed: int,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """One token id per row of ``logits_shard`` ``[B, V_local]`` -> ``[B]`` global ids, identical on
    every rank of ``group``.

    ``rows`` (global sample index) and ``position`` (index in the sequence) ``[B]`` key the noise.
    ``temperature == 0`` is greedy; ``top_k`` (0: off) and ``top_p`` (1: off) restrict the
    distribution before sampling, top-k first, as vLLM does.
    """
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    v_local = logits_shard.shape[-1]
    start = rank * v_local
    x = logits_shard.float()
    if vocab_size is not None and start + v_local > vocab_size:
        x = x.clone() if x.data_ptr() == logits_shard.data_ptr() else x
        x[..., max(vocab_size - start, 0):] = float("-inf")
    if temperature > 0:
        x = x / temperature
        if top_k > 0:
            x = _top_k_mask(x, top_k, group)
        if top_p < 1.0:
            x = _top_p_mask(x, top_p, group)
        ids = torch.arange(start, start + v_local, device=x.device)
        u = counter_uniform(seed, rows.to(x.device), position.to(x.device), ids)
        x = (x.double() - torch.log(-torch.log(u))).float()
    best, idx = x.max(dim=-1)
    if world == 1:
        return idx + start
    global_best = best.clone()
    dist.all_reduce(global_best, op=dist.ReduceOp.MAX, group=group)
    # ties across shards go to the highest id, the same on every rank
    candidate = torch.where(best == global_best, idx + start, torch.full_like(idx, -1))
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=group)
    return candidate
