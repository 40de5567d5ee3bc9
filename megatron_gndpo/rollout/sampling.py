"""Token sampling from vocab-sharded logits, without gathering the vocabulary.

Sampling is Gumbel-max: ``argmax_v(x_v / T + G_v)`` with iid Gumbel noise G is a sample of
``softmax(x / T)``, and the argmax of a sharded vector needs two MAX all-reduces. The noise is
counter-based (a hash of seed, sample row, position and token id), not drawn from a stateful
generator: every rank draws exactly the noise of its own shard and the same sample comes out for
every TP / PP / DP layout, which is what makes whole training steps comparable across layouts.

Hash, Gumbel transform, perturbation and the shard's max / argmax run as one ``torch.compile``d
kernel (``_gumbel_max``, compiled at first use); eagerly they are ~15 ``[B, V_local]`` int64 /
float64 temporaries per token. ``MEGATRON_GNDPO_COMPILE=0`` runs the same function eagerly.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.collectives import all_reduce, group_rank, group_size
from megatron_gndpo.ops import mask_padded_vocab, vocab_parallel_softmax, vocab_parallel_topk

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


def _seed_key(seed: int) -> int:
    """The seed's term of the hash input, as the int64 torch adds."""
    return _i64(seed * 0x632BE59BD9B4E019)


def _hash_uniform(key: int, rows: torch.Tensor, position: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """``u[b, v] = ((splitmix64(rows[b] * R + position[b] * P + vocab_ids[v] * G + key) >>> 11) + 1/2) / 2^53``
    (``>>>`` logical), float64 ``[B, V]`` in (0, 1); int64 inputs.

    Everything before the float conversion is int64 arithmetic modulo 2^64 (wrapping products,
    ``_shr``'s masked shifts), so eager CPU / CUDA and the compiled C++ / Triton kernels get the same
    bits in any evaluation order; the conversion of a 53-bit integer and the two operations after it
    are exact in float64."""
    x = rows[:, None] * _ROW + position[:, None] * _POS + vocab_ids[None, :] * _GOLDEN + key
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) * (1.0 / (1 << 53))


def counter_uniform(seed: int, rows: torch.Tensor, position: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 ``[B, V]`` from a splitmix64 hash of (seed, rows[b], position[b], vocab_ids[v])."""
    return _hash_uniform(_seed_key(seed), rows.long(), position.long(), vocab_ids.long())


def _perturbed(x: torch.Tensor, key: int, rows: torch.Tensor, position: torch.Tensor,
               vocab_ids: torch.Tensor) -> torch.Tensor:
    """``float32(x + G)`` ``[B, V]`` with Gumbel noise ``G = -log(-log(u))``, u = ``_hash_uniform``, in float64."""
    u = _hash_uniform(key, rows, position, vocab_ids)
    return (x.double() - torch.log(-torch.log(u))).float()


def _gumbel_max(x: torch.Tensor, key: int, rows: torch.Tensor, position: torch.Tensor,
                vocab_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, argmax) over the shard of ``_perturbed`` -> ``[B]`` float32, ``[B]`` local index (first of ties).

    The eager reference and, unchanged, the function that is compiled."""
    best, idx = _perturbed(x, key, rows, position, vocab_ids).max(dim=-1)
    return best, idx


# Below this many vocabulary entries the eager path takes well under a millisecond per token, less
# than the seconds a compile costs a short run (the tests' tiny models); decided on the global
# vocabulary, so every layout of one model takes the same path.
_FUSE_MIN_VOCAB = 8192

_fused = None  # torch.compile(_gumbel_max), made at first use; False once compiling it failed


def _fused_gumbel_max():
    """``_gumbel_max`` compiled with dynamic shapes: B and V_local are symbols and the int ``key`` a
    kernel argument, so new batch sizes, shard widths and seeds reuse one kernel (sizes 0 and 1 are
    specialised, so B == 1 adds one more)."""
    global _fused
    if _fused is None:
        _fused = torch.compile(_gumbel_max, dynamic=True)
    return _fused


def gumbel_max(x: torch.Tensor, key: int, rows: torch.Tensor, position: torch.Tensor, vocab_ids: torch.Tensor,
               *, fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``_gumbel_max``, compiled unless ``fuse`` is False, ``MEGATRON_GNDPO_COMPILE=0`` or compiling
    failed once in this process (warned; eager from then on).

    The eager numbers: the int64 hash and u are bit-exact in every kernel (integer ops modulo 2^64),
    and so is float64 log on CUDA (libdevice in both). On CPU eager log is MKL's and the kernel's
    Sleef's: they differ in the last bit of log(-log(u)) for ~5% of the entries, which changes the
    float32 rounding of x + G for ~3e-10 of the entries (``benchmarks/sampler.py --verify``: none
    of 16M), i.e. the max's last bit for ~3e-10 of the tokens and the token itself far more rarely.

    Ranks need not compute the same numbers to agree on the token: the MAX all-reduce gives every
    rank the same global max, each compares it with its own ``best`` (the owner's matches bit for
    bit) and the second MAX takes the highest matching id. Layout invariance (TP 1 == TP 8) needs an
    entry's value to depend on (x, key, row, position, vocab id) only, not on its column or the
    shard's width: the kernel is elementwise up to the max, one code for every column (SIMD tails
    too: tests/unit/test_sampler_fused.py combines shards)."""
    global _fused
    if fuse and _fused is not False and os.environ.get("MEGATRON_GNDPO_COMPILE", "1") != "0":
        try:
            return _fused_gumbel_max()(x, key, rows, position, vocab_ids)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ImportError) as err:  # no C++ compiler or Triton, an unsupported Python, ...
            warnings.warn(f"torch.compile of the sampler failed, sampling eagerly from now on: {err}", stacklevel=2)
            _fused = False
    return _gumbel_max(x, key, rows, position, vocab_ids)


def _top_k_mask(x: torch.Tensor, k: int, group) -> torch.Tensor:
    """Keep the k largest entries of the sharded rows (ties at the k-th value are all kept)."""
    kth = vocab_parallel_topk(x, k, group=group)[0][..., -1:]
    return x.masked_fill(x < kth, float("-inf"))


def _top_p_mask(x: torch.Tensor, p: float, group, iters: int = 40) -> torch.Tensor:
    """Keep the nucleus: the tokens whose probability is at least tau, with tau the largest
    threshold whose kept mass is still >= p. Found by bisection (one [B] SUM all-reduce per
    iteration) instead of a global sort, which would need the whole vocabulary on one rank; tau is
    exact to ``2**-iters``."""
    probs = vocab_parallel_softmax(x, group=group)
    lo = torch.zeros(x.shape[0], dtype=probs.dtype, device=x.device)
    hi = torch.ones_like(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        mass = all_reduce(torch.where(probs >= mid[:, None], probs, 0.0).sum(dim=-1), dist.ReduceOp.SUM, group)
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
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits_shard`` ``[B, V_local]`` -> ``[B]`` global ids, identical on
    every rank of ``group``.

    ``rows`` (global sample index) and ``position`` (index in the sequence) ``[B]`` key the noise.
    ``temperature == 0`` is greedy; ``top_k`` (0: off) and ``top_p`` (1: off) restrict the
    distribution before sampling, top-k first, as vLLM does.
    """
    world = group_size(group)
    v_local = logits_shard.shape[-1]
    start = group_rank(group) * v_local
    x = mask_padded_vocab(logits_shard.float(), start, vocab_size)
    if temperature > 0:
        x = x / temperature
        if top_k > 0:
            x = _top_k_mask(x, top_k, group)
        if top_p < 1.0:
            x = _top_p_mask(x, top_p, group)
        ids = torch.arange(start, start + v_local, device=x.device)
        # int64 here, not inside: a dtype change would recompile the fused kernel
        best, idx = gumbel_max(x, _seed_key(seed), rows.to(x.device, torch.long), position.to(x.device, torch.long),
                               ids, fuse=(vocab_size or v_local * world) >= _FUSE_MIN_VOCAB)
    else:
        best, idx = x.max(dim=-1)
    if world == 1:
        return idx + start
    global_best = all_reduce(best.clone(), dist.ReduceOp.MAX, group)
    # ties across shards go to the highest id, the same on every rank
    candidate = torch.where(best == global_best, idx + start, torch.full_like(idx, -1))
    return all_reduce(candidate, dist.ReduceOp.MAX, group)
