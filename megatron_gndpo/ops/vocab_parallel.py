"""Per-token log-probs, entropy, KL and top-k on vocab-sharded logits.

Rank r of ``group`` holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)`` of
``logits`` ``[..., V_local]`` (megatron's ``VocabUtility`` convention). Nothing here gathers the
vocabulary: the only collectives are MAX and SUM all-reduces of ``[N]``-sized tensors over ``group``
(plus the ``k x TP`` candidate exchange of :func:`vocab_parallel_topk`), so communication per token
is O(1) in the vocabulary size. ``group=None`` means one process holding the full vocabulary (see
:mod:`megatron_gndpo.distributed.collectives`).

Numerics: every op works in float32 on ``y = (x - m) / T`` with ``m`` the row's global max (``x - m``
is exact near the max, whatever the logits' magnitude) and keeps ``m`` and ``s = sum_v exp(y_v)`` per
token separately, never a rounded log-sum-exp ``m + log s``: at logits ~100 the float32 rounding of
that alone (~4e-6) would be a relative error of every probability recomputed from it. Backward
passes use ``p = exp(y) / s``, as megatron's cross-entropy does.

Memory: ops run over chunks of ``chunk_size`` tokens. :func:`vocab_parallel_logprobs` on float32
logits that need a gradient writes ``exp(y)`` into one float32 ``[N, V_local]`` buffer, which its
backward turns into the gradient in place: the allocation backward makes anyway, made earlier, and
no second exp. With ``inplace=True`` that buffer is the logits' own storage, as in megatron's
cross-entropy. Otherwise (no gradient; bf16 / fp16 logits, whose float32 buffer would be twice their
size) it and the other ops keep per-token statistics only and recompute a chunk at a time in
backward: the float32 working set is then ``[chunk_size, V_local]``, independent of the token count.

``vocab_size`` (optional) is the true vocabulary: columns at or beyond it are megatron's padding
rows, with probability 0 and gradient 0; an id there gets log-prob ``_NEG`` and no gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.collectives import all_reduce, group_rank, group_size

DEFAULT_CHUNK = 1024
# log-prob of an id in the padding; finite, so that 0 * _NEG = 0 downstream where -inf gives NaN
_NEG = -1.0e30
_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM
# floor of the top-k tail bucket's mass: a teacher whose top-k holds all its mass gives a large
# finite reverse KL rather than an infinite one
_TAIL_FLOOR = 1e-6


def real_vocab_columns(vocab_start: int, v_local: int, vocab_size: Optional[int]) -> int:
    """How many leading columns of the shard ``[vocab_start, vocab_start + v_local)`` are real ids
    (``< vocab_size``); the rest is megatron's vocabulary padding. All of them for ``vocab_size=None``."""
    if vocab_size is None:
        return v_local
    return min(max(vocab_size - vocab_start, 0), v_local)


def mask_padded_vocab(x: torch.Tensor, vocab_start: int, vocab_size: Optional[int],
                      value: float = float("-inf")) -> torch.Tensor:
    """``x`` ``[..., V_local]`` (the shard starting at id ``vocab_start``) with the columns of ids
    ``>= vocab_size`` set to ``value``. Never modifies ``x``: a copy when the shard holds padding,
    ``x`` itself otherwise."""
    real = real_vocab_columns(vocab_start, x.shape[-1], vocab_size)
    if real == x.shape[-1]:
        return x
    x = x.clone()
    x[..., real:] = value
    return x


@torch.no_grad()
def vocab_parallel_softmax(logits: torch.Tensor, *, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """``softmax`` over the sharded vocabulary of each row of ``logits`` ``[B, V_local]``, float32:
    ``p_v = exp(x_v - m) / sum_u exp(x_u - m)`` with ``m`` the global row max (1 MAX + 1 SUM
    all-reduce). Entries at -inf (masked) get 0."""
    m = all_reduce(_row_max(logits), _MAX, group)
    e = _shifted(logits, m, 1.0, out=torch.empty(logits.shape, dtype=torch.float32, device=logits.device)).exp_()
    return e.div_(all_reduce(e.sum(-1), _SUM, group)[:, None])


def _rows(t: torch.Tensor, last: int) -> torch.Tensor:
    return t.reshape(-1, last)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row max of ``x`` ``[n, V]`` in float32; ``_NEG`` for a shard without real columns (V = 0)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:1], _NEG, dtype=torch.float32, device=x.device)
    return x.amax(dim=-1).float()


def _shifted(x: torch.Tensor, m: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``out = y = (x - m) / T`` in float32 for ``x`` ``[n, V]`` (any float dtype; ``out`` may be ``x``
    itself) and the row max ``m`` ``[n]``. Subtracting before scaling keeps ``x - m`` exact near the
    max; no temporaries, no division at T = 1."""
    if x.dtype == out.dtype or x.is_cuda:
        torch.sub(x, m[:, None], out=out)  # the cast inside the one pass
    else:  # torch's CPU kernels have no vectorised mixed-dtype sub: cast, then subtract (~5x faster)
        out.copy_(x).sub_(m[:, None])
    return out.div_(temperature) if temperature != 1.0 else out


def _local_index(target: torch.Tensor, start: int, real: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shard-local column of each global id ``[n, K]`` and whether it is a real id of this shard."""
    on = (target >= start) & (target < start + real)
    return torch.where(on, target - start, torch.zeros_like(target)), on


def _take(e: torch.Tensor, idx: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """``e[row, idx]`` where ``on``, 0 elsewhere (also for a shard without real columns)."""
    if e.shape[-1] == 0:
        return torch.zeros(idx.shape, dtype=e.dtype, device=e.device)
    return torch.where(on, torch.gather(e, 1, idx), 0.0)


def _put(e: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``e[row, idx] += values`` (repeated ids accumulate); values must be 0 where not on the shard."""
    if e.shape[-1]:
        e.scatter_add_(1, idx, values)


def _target_forward(x, e, target, start: int, temperature: float, vocab_size: Optional[int], group, tail: bool):
    """``lp_k = log softmax(x / T)[t_k] = y_{t_k} - log s`` for the chunk's logits ``x`` ``[n, V_local]``
    and ids ``t`` ``[n, K]``, writing ``exp(y)`` into ``e`` (float32 ``[n, V_real]``, may be x's own
    real columns). With ``tail``, one more column: the mass outside the (distinct) ids,
    ``lp_tail = log(sum_{v not in t} exp(y_v)) - log s``, summed directly rather than as
    ``1 - sum_k p_k``, which cancels to nothing when the tail is small.

    1 MAX all-reduce of the row max, then ONE SUM of the stacked ``[s, (tail sum,) y_t]``.
    Returns (log-probs ``[n, K (+1)]``, ``[n, 3]`` = m, s, tail sum) for the backward."""
    real = e.shape[-1]
    idx, on = _local_index(target, start, real)
    m = all_reduce(_row_max(x[:, :real]), _MAX, group)
    # (x_t - m) / T with the very operations that make e below (gathered first: e may overwrite x)
    picked = torch.gather(x, 1, idx).float() - m[:, None]
    picked = torch.where(on, picked / temperature if temperature != 1.0 else picked, 0.0)
    _shifted(x[:, :real], m, temperature, out=e).exp_()
    if tail:
        e_k = _take(e, idx, on)
        _put(e, idx, -e_k)  # the ids' columns to exactly 0 ...
        rest = e.sum(-1)
        _put(e, idx, e_k)  # ... and back (0 + e_k == e_k)
        sums = torch.stack([rest + e_k.sum(-1), rest], 1)
    else:
        sums = e.sum(-1, keepdim=True)
    stats = all_reduce(torch.cat([sums, picked], 1), _SUM, group)
    s = stats[:, 0]
    log_s = s.log()
    lp = stats[:, sums.shape[1]:] - log_s[:, None]
    if vocab_size is not None:
        lp = torch.where(target >= vocab_size, _NEG, lp)
    if tail:
        lp = torch.cat([lp, (stats[:, 1].log() - log_s)[:, None]], 1)
    return lp, torch.stack([m, s, stats[:, 1] if tail else s], 1)


def _target_grad_(e, stats, target, start: int, g, temperature: float, vocab_size: Optional[int], tail: bool):
    """The gradient of ``sum_k g_k lp_k (+ g_tail lp_tail)`` w.r.t. the logits, written over
    ``e = exp(y)`` in place and returned. Shard-local: no communication.

    With ``p_v = e_v / s`` and ``G`` the sum of every g: ``dlp_k/dx_v = ([v = t_k] - p_v) / T`` and
    ``dlp_tail/dx_v = ([v not in t] e_v / tail - p_v) / T``, so
    ``grad_v = (g_k - e_v G / s) / T`` on id ``t_k`` and ``e_v (g_tail / tail - G / s) / T`` elsewhere
    (without a tail: ``-e_v G / (s T)``). Ids in the padding have a constant log-prob: g = 0 there."""
    idx, on = _local_index(target, start, e.shape[-1])
    s, rest = stats[:, 1], stats[:, 2]
    if vocab_size is not None:
        g = torch.cat([torch.where(target >= vocab_size, 0.0, g[:, :target.shape[1]]), g[:, target.shape[1]:]], 1)
    total = g.sum(-1)
    if not tail:
        e.mul_((-total / (s * temperature))[:, None])
        _put(e, idx, torch.where(on, g / temperature, 0.0))
        return e
    e_k = _take(e, idx, on)
    _put(e, idx, -e_k)  # the ids' columns to 0, so that the row scale below leaves them at 0
    rest_coef = torch.where(rest > 0, g[:, -1] / rest, 0.0)  # a floored-away tail has g_tail = 0
    e.mul_(((rest_coef - total / s) / temperature)[:, None])
    _put(e, idx, torch.where(on, (g[:, :-1] - e_k * (total / s)[:, None]) / temperature, 0.0))
    return e


class _VocabParallelGatherLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[target] for targets ``[N, K]`` (K ids per token), with ``tail`` plus
    the log of the mass outside them (see :func:`_target_forward` / :func:`_target_grad_`).

    ``keep``: save ``exp(y)`` in a float32 ``[N, V_local]`` buffer (the logits themselves with
    ``inplace`` and contiguous float32 logits) that backward turns into the gradient in place: one
    exp in all; a second backward (``retain_graph=True``) is then refused by autograd's version
    check on that buffer. Otherwise save only the logits and ``(m, s, tail)`` per token and
    recompute a chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits, target, group, temperature, vocab_size, chunk, tail, keep, inplace):
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        real = real_vocab_columns(start, v_local, vocab_size)
        x2 = _rows(logits, v_local)
        t2 = target.reshape(x2.shape[0], -1)
        n = x2.shape[0]
        out = torch.empty(n, t2.shape[1] + tail, dtype=torch.float32, device=logits.device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
        if inplace and logits.dtype == torch.float32 and logits.is_contiguous():
            buf = x2  # a view: exp(y), then the gradient, over the logits
        elif keep:
            buf = torch.empty(n, v_local, dtype=torch.float32, device=logits.device)
        else:  # one chunk's exp(y), reused
            work = torch.empty(min(chunk, n), real, dtype=torch.float32, device=logits.device)
            buf = None
        for i in range(0, n, chunk):
            e = buf[i:i + chunk, :real] if buf is not None else work[:min(chunk, n - i)]
            out[i:i + chunk], stats[i:i + chunk] = _target_forward(x2[i:i + chunk], e, t2[i:i + chunk], start,
                                                                   temperature, vocab_size, group, tail)
        if keep:
            buf[:, real:] = 0.0  # the padding's gradient
        # the logits themselves rather than their view x2: autograd refuses views made here and
        # modified in place later
        ctx.save_for_backward(buf if keep and buf is not x2 else logits, target, stats)
        ctx.cfg = (keep, logits.shape, temperature, vocab_size, chunk, start, tail)
        return out.reshape(*target.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        saved, target, stats = ctx.saved_tensors
        keep, shape, temperature, vocab_size, chunk, start, tail = ctx.cfg
        v_local = shape[-1]
        real = real_vocab_columns(start, v_local, vocab_size)
        x2 = _rows(saved, v_local)
        n = x2.shape[0]
        t2 = target.reshape(n, -1)
        g2 = grad_out.reshape(n, -1).float()
        if keep:  # x2 holds exp(y): the gradient, in place
            for i in range(0, n, chunk):
                _target_grad_(x2[i:i + chunk, :real], stats[i:i + chunk], t2[i:i + chunk], start, g2[i:i + chunk],
                              temperature, vocab_size, tail)
            return x2.reshape(shape), None, None, None, None, None, None, None, None
        grad = torch.empty_like(x2)
        grad[:, real:] = 0
        work = torch.empty(min(chunk, n), real, dtype=torch.float32, device=saved.device)
        for i in range(0, n, chunk):
            s = stats[i:i + chunk]
            e = _shifted(x2[i:i + chunk, :real], s[:, 0], temperature, out=work[:s.shape[0]]).exp_()
            grad[i:i + chunk, :real] = _target_grad_(e, s, t2[i:i + chunk], start, g2[i:i + chunk], temperature,
                                                     vocab_size, tail)
        return grad.reshape(shape), None, None, None, None, None, None, None, None


def _gather_logprobs(logits, target, group, temperature, vocab_size, chunk, tail=False, inplace=False):
    """The Function above, keeping the float32 buffer only when it stands in for the float32
    gradient that backward would allocate anyway."""
    keep = torch.is_grad_enabled() and logits.requires_grad and logits.dtype == torch.float32
    return _VocabParallelGatherLogProbs.apply(logits, target, group, temperature, vocab_size, chunk, tail, keep,
                                              inplace)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
    inplace: bool = False,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[target]`` in float32.

    logits ``[..., V_local]`` (this rank's shard), target ``[...]`` global ids -> ``[...]``.
    Also accepts target ``[..., K]`` (K ids per position) -> ``[..., K]``.
    Differentiable w.r.t. ``logits`` with an analytic backward.

    ``inplace=True`` lets the op overwrite ``logits`` (float32 and contiguous; ignored otherwise)
    with ``exp(y)`` and then with their gradient, as megatron's ``vocab_parallel_cross_entropy``
    does: no ``[N, V_local]`` allocation at all, but the caller must not read the logits afterwards.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    single = target.dim() == logits.dim() - 1
    if not single and target.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    t = target.unsqueeze(-1) if single else target
    out = _gather_logprobs(logits, t.long(), group, float(temperature), vocab_size, chunk_size, inplace=inplace)
    return out.squeeze(-1) if single else out


class _VocabParallelEntropy(torch.autograd.Function):
    """``H = log s - E_p[y]``, ``y = (x - m) / T``, ``s = sum exp(y)``: 1 MAX + 1 SUM (stacked
    ``[s, sum e y]``). Backward (no communication): ``dH/dx_v = -p_v (y_v - E_p[y]) / T``."""

    @staticmethod
    def forward(ctx, logits, group, temperature, vocab_size, chunk):
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        real = real_vocab_columns(start, v_local, vocab_size)
        x2 = _rows(logits, v_local)
        n = x2.shape[0]
        ent = torch.empty(n, dtype=torch.float32, device=logits.device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)  # m, s, E_p[y]
        work = torch.empty(2, min(chunk, n), real, dtype=torch.float32, device=logits.device)
        for i in range(0, n, chunk):
            x = x2[i:i + chunk, :real]
            m = all_reduce(_row_max(x), _MAX, group)
            y = _shifted(x, m, temperature, out=work[0, :x.shape[0]])
            e = torch.exp(y, out=work[1, :x.shape[0]])
            sums = all_reduce(torch.stack([e.sum(-1), (e * y).sum(-1)], 1), _SUM, group)
            mean_y = sums[:, 1] / sums[:, 0]
            ent[i:i + chunk] = sums[:, 0].log() - mean_y
            stats[i:i + chunk] = torch.stack([m, sums[:, 0], mean_y], 1)
        ctx.save_for_backward(logits, stats)
        ctx.cfg = (temperature, real, chunk)
        return ent.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, stats = ctx.saved_tensors
        temperature, real, chunk = ctx.cfg
        x2 = _rows(logits, logits.shape[-1])
        n = x2.shape[0]
        g2 = grad_out.reshape(-1).float()
        grad = torch.empty_like(x2)
        grad[:, real:] = 0
        work = torch.empty(2, min(chunk, n), real, dtype=torch.float32, device=logits.device)
        for i in range(0, n, chunk):
            s = stats[i:i + chunk]
            y = _shifted(x2[i:i + chunk, :real], s[:, 0], temperature, out=work[0, :s.shape[0]])
            e = torch.exp(y, out=work[1, :s.shape[0]])
            coef = -g2[i:i + chunk] / (s[:, 1] * temperature)
            grad[i:i + chunk, :real] = y.sub_(s[:, 2:]).mul_(e).mul_(coef[:, None])
        return grad.reshape(logits.shape), None, None, None, None


def vocab_parallel_entropy(
    logits: torch.Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position: ``[..., V_local]`` -> ``[...]``,
    float32, differentiable."""
    return _VocabParallelEntropy.apply(logits, group, float(temperature), vocab_size, chunk_size)


def _kl_terms(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float):
    """Per-entry divergence summand and the g of dD/dlog-softmax-free p_s (see _VocabParallelKL).

    ls, lt: log p_s, log p_t. Returns (summand, g) with D = sum(summand) and
    dD/dx_j = p_s_j (g_j - E_{p_s}[g]).
    """
    ps, pt = ls.exp(), lt.exp()
    if kind == "reverse":  # KL(S || T) = sum p_s (log p_s - log p_t)
        d = ls - lt
        return ps * d, d
    if kind == "forward":  # KL(T || S) = sum p_t (log p_t - log p_s); g = -p_t / p_s, E_{p_s}[g] = -sum p_t
        return pt * (lt - ls), -pt / ps.clamp_min(torch.finfo(ps.dtype).tiny)
    # jsd(beta) = beta KL(T || M) + (1 - beta) KL(S || M),  M = beta p_t + (1 - beta) p_s
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
    summand = beta * pt * (lt - lm) + (1.0 - beta) * ps * (ls - lm)
    return summand, (1.0 - beta) * (ls - lm)


def _new_shifted(x: torch.Tensor, m: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`_shifted` into a new float32 tensor."""
    return _shifted(x, m, temperature, out=torch.empty(x.shape, dtype=torch.float32, device=x.device))


class _VocabParallelKL(torch.autograd.Function):
    """Full-vocabulary divergence D(p_s, p_t) per token, differentiable w.r.t. the student only.

    Forward: 1 MAX + 1 SUM for both normalisers (stacked), then 1 SUM of the stacked
    [D, E_{p_s}[g]] partial sums. Backward (no communication): dD/dx_s = p_s (g - E_{p_s}[g]) / T,
    where g = dD/dp_s is (log p_s - log p_t + const) for reverse KL, -p_t / p_s for forward KL and
    (1 - beta)(log p_s - log m) for JSD; the constant parts cancel against E_{p_s}[g].
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, kind, beta, group, temperature, vocab_size, chunk):
        v_local = s_logits.shape[-1]
        start = group_rank(group) * v_local
        real = real_vocab_columns(start, v_local, vocab_size)
        s2, t2 = _rows(s_logits, v_local), _rows(t_logits, v_local)
        n = s2.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=s_logits.device)
        stats = torch.empty(n, 5, dtype=torch.float32, device=s_logits.device)  # m_s, m_t, log s_s, log s_t, E[g]
        for i in range(0, n, chunk):
            xs, xt = s2[i:i + chunk, :real], t2[i:i + chunk, :real]
            m = all_reduce(torch.stack([_row_max(xs), _row_max(xt)], 1), _MAX, group)
            ls, lt = _new_shifted(xs, m[:, 0], temperature), _new_shifted(xt, m[:, 1], temperature)
            log_z = all_reduce(torch.stack([ls.exp().sum(-1), lt.exp().sum(-1)], 1), _SUM, group).log()
            stats[i:i + chunk, :2], stats[i:i + chunk, 2:4] = m, log_z
            ls, lt = ls.sub_(log_z[:, :1]), lt.sub_(log_z[:, 1:])  # log p = y - log z
            summand, g = _kl_terms(ls, lt, kind, beta)
            sums = all_reduce(torch.stack([summand.sum(-1), (ls.exp() * g).sum(-1)], 1), _SUM, group)
            out[i:i + chunk], stats[i:i + chunk, 4] = sums[:, 0], sums[:, 1]
        ctx.save_for_backward(s_logits, t_logits, stats)
        ctx.cfg = (kind, beta, temperature, real, chunk)
        return out.reshape(s_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        s_logits, t_logits, stats = ctx.saved_tensors
        kind, beta, temperature, real, chunk = ctx.cfg
        v_local = s_logits.shape[-1]
        s2, t2 = _rows(s_logits, v_local), _rows(t_logits, v_local)
        g_out = grad_out.reshape(-1).float()
        grad = torch.empty_like(s2)
        grad[:, real:] = 0
        for i in range(0, s2.shape[0], chunk):
            st = stats[i:i + chunk]
            ls = _new_shifted(s2[i:i + chunk, :real], st[:, 0], temperature).sub_(st[:, 2:3])
            lt = _new_shifted(t2[i:i + chunk, :real], st[:, 1], temperature).sub_(st[:, 3:4])
            if kind == "forward":  # p_s (g - E[g]) with g = -p_t / p_s, E[g] = -1, without dividing by p_s
                gx = ls.exp_().sub_(lt.exp_())
            else:
                _, g = _kl_terms(ls, lt, kind, beta)
                gx = ls.exp_().mul_(g.sub_(st[:, 4:5]))
            grad[i:i + chunk, :real] = gx.mul_((g_out[i:i + chunk] / temperature)[:, None])
        return grad.reshape(s_logits.shape), None, None, None, None, None, None, None


@torch.no_grad()
def vocab_parallel_topk_logprobs(
    logits: torch.Tensor,
    k: int,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits' ids of each position (global over the shards) and their log-probs under
    ``softmax(logits / temperature)``, plus one tail bucket: ``log(1 - sum_k p_k)``, the mass of every
    other id, summed over those ids directly (no cancellation when the tail is tiny).

    ``[..., V_local]`` -> (ids ``[..., k]`` int64, log-probs ``[..., k + 1]`` float32), the same on
    every rank of ``group``: what a teacher keeps per token instead of its logits."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    _, ids = vocab_parallel_topk(logits, k, group=group, vocab_size=vocab_size)
    return ids, _gather_logprobs(logits, ids, group, float(temperature), vocab_size, chunk_size, tail=True)


def topk_tail_divergence(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str = "reverse",
    beta: float = 0.5,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Divergence (``kind`` as in :func:`vocab_parallel_kl`) between student and teacher over K + 1
    categories per position: the teacher's top-k ``ids`` ``[..., K]`` and one tail bucket holding the
    rest of each distribution's mass, the teacher's side given as its log-probs ``[..., K + 1]``
    (:func:`vocab_parallel_topk_logprobs`).

    The student's log-probs of the same ids and of its own tail come from its logits shard
    ``[..., V_local]`` (1 MAX + 1 SUM all-reduce of ``[N, K + 2]``). Both tails are floored at
    ``_TAIL_FLOOR``, so a teacher whose top-k holds all its mass gives a large finite reverse KL rather
    than an infinite one. ``[...]`` float32, differentiable w.r.t. the student logits only (autograd
    reaches the shard through the gather Function; the K + 1 terms are computed alike on every rank)."""
    kind = _check_kind(kind, beta)
    ls = _gather_logprobs(student_logits, ids.long(), group, float(temperature), vocab_size, chunk_size, tail=True)

    def floored(lp):
        return torch.cat([lp[..., :-1], lp[..., -1:].clamp_min(math.log(_TAIL_FLOOR))], -1)

    summand, _ = _kl_terms(floored(ls), floored(teacher_logprobs.detach().float()), kind, beta)
    return summand.sum(-1)


def _check_kind(kind: str, beta: float) -> str:
    """``kind`` checked; a JSD at beta 0 or 1 is the forward or the reverse KL itself."""
    if kind not in ("reverse", "forward", "jsd"):
        raise ValueError(f"kind must be 'reverse', 'forward' or 'jsd', got {kind!r}")
    if kind != "jsd":
        return kind
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    return {0.0: "forward", 1.0: "reverse"}.get(beta, "jsd")


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "reverse",
    beta: float = 0.5,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-token divergence between the student S and teacher T softmax(logits / temperature).

    kind: ``reverse`` = KL(S||T) = sum_v p_s (log p_s - log p_t); ``forward`` = KL(T||S);
    ``jsd`` = beta KL(T||M) + (1 - beta) KL(S||M), M = beta p_t + (1 - beta) p_s (TRL's convention:
    beta = 0 is KL(T||S), beta = 1 is KL(S||T)). With ``top_k``, on the teacher's global top-k ids
    plus one tail bucket. ``[..., V_local]`` x2 -> ``[...]`` float32, differentiable w.r.t. the
    student logits only.
    """
    kind = _check_kind(kind, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary shard)")
    teacher_logits = teacher_logits.detach()
    if top_k is not None:
        ids, teacher_lp = vocab_parallel_topk_logprobs(teacher_logits, top_k, group=group, temperature=temperature,
                                                       vocab_size=vocab_size, chunk_size=chunk_size)
        return topk_tail_divergence(student_logits, ids, teacher_lp, kind=kind, beta=beta, group=group,
                                    temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size)
    return _VocabParallelKL.apply(student_logits, teacher_logits, kind, float(beta), group,
                                  float(temperature), vocab_size, chunk_size)


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    *,
    group: Optional[ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-k ``(values, global ids)`` ``[..., k]`` of sharded logits: local top-k, then an
    all-gather of the k x TP candidates per token (never the vocabulary)."""
    world = group_size(group)
    v_local = logits.shape[-1]
    start = group_rank(group) * v_local
    x = mask_padded_vocab(logits, start, vocab_size)
    vals, idx = x.topk(min(k, v_local), dim=-1)
    idx = idx + start
    if world > 1:
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_vals, vals.contiguous(), group=group)
        dist.all_gather(all_idx, idx.contiguous(), group=group)
        vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
    if k > vals.shape[-1]:
        raise ValueError(f"top_k={k} exceeds the vocabulary ({vals.shape[-1]})")
    top_vals, pos = vals.topk(k, dim=-1)
    return top_vals, torch.gather(idx, -1, pos)


class _FusedLinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[y] without materialising more than ``[chunk, V_local]`` logits.

    Forward per token chunk: logits = h_c W_local^T in float32, 1 MAX + 1 SUM all-reduce, keep
    ``(m, s)`` only. Backward recomputes each chunk's logits, turns them into exp(y) and then into
    grad_x = (onehot - p) g / T in place, then grad_h = grad_x W_local (SUM all-reduced over TP: every
    shard holds part of the vocabulary, as in megatron's copy_to_tensor_model_parallel_region),
    grad_W_local = grad_x^T h.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, group, temperature, vocab_size, chunk):
        start = group_rank(group) * weight.shape[0]
        real = real_vocab_columns(start, weight.shape[0], vocab_size)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = target.reshape(-1, 1)
        out = torch.empty(h2.shape[0], dtype=torch.float32, device=hidden.device)
        stats = torch.empty(h2.shape[0], 3, dtype=torch.float32, device=hidden.device)
        w = weight.float()
        for i in range(0, h2.shape[0], chunk):
            x = h2[i:i + chunk].float() @ w.t()  # a fresh float32 chunk: exp(y) goes over it
            lp, stats[i:i + chunk] = _target_forward(x, x[:, :real], t2[i:i + chunk], start, temperature,
                                                     vocab_size, group, tail=False)
            out[i:i + chunk] = lp[:, 0]
        ctx.save_for_backward(hidden, weight, target, stats)
        ctx.cfg = (group, temperature, vocab_size, chunk, start, real)
        return out.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target, stats = ctx.saved_tensors
        group, temperature, vocab_size, chunk, start, real = ctx.cfg
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = target.reshape(-1, 1)
        g2 = grad_out.reshape(-1, 1).float()
        w = weight.float()
        grad_h = torch.empty(h2.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros_like(w)
        for i in range(0, h2.shape[0], chunk):
            hc = h2[i:i + chunk].float()
            s = stats[i:i + chunk]
            gx = hc @ w.t()
            gx[:, real:] = 0
            e = _shifted(gx[:, :real], s[:, 0], temperature, out=gx[:, :real]).exp_()
            _target_grad_(e, s, t2[i:i + chunk], start, g2[i:i + chunk], temperature, vocab_size, tail=False)
            grad_h[i:i + chunk] = gx @ w
            grad_w.addmm_(gx.t(), hc)
        all_reduce(grad_h, _SUM, group)
        return (grad_h.to(hidden.dtype).reshape(hidden.shape), grad_w.to(weight.dtype),
                None, None, None, None, None)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """LM head + sampled-token log-prob in one pass: hidden ``[..., h]`` (replicated over TP),
    this rank's output-weight shard ``[V_local, h]``, target ``[...]`` -> float32 ``[...]``.

    Peak extra memory is one ``[chunk_size, V_local]`` float32 block, whatever the token count.
    Differentiable w.r.t. ``hidden`` and ``weight_shard``.
    """
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    return _FusedLinearLogProbs.apply(hidden, weight_shard, target.long(), group, float(temperature),
                                      vocab_size, chunk_size)
