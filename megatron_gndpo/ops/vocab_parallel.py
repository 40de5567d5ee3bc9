"""Per-token log-probs, entropy, KL and top-k on vocab-sharded logits.

Rank r of ``group`` holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)`` of
``logits`` ``[..., V_local]`` (megatron's ``VocabUtility`` convention). Nothing here gathers the
vocabulary: the only collectives are MAX and SUM all-reduces of ``[N]``-sized tensors over ``group``
(plus the ``k x TP`` candidate exchange of :func:`vocab_parallel_topk`), so communication per token
is O(1) in the vocabulary size. ``group=None`` means one process holding the full vocabulary.

Working set: every op runs in float32 over chunks of ``chunk_size`` tokens and saves only the
caller's logits (no copy) plus per-token statistics for backward, which recomputes the softmax a
chunk at a time. The float32 footprint is therefore ``[chunk_size, V_local]``, independent of the
token count. ``vocab_size`` (optional) is the true vocabulary: columns at or beyond it are megatron's
padding rows and get probability 0.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

DEFAULT_CHUNK = 1024
# finite, so that 0 * NEG = 0 (entropy, KL) where -inf would give NaN
_NEG = -1.0e30


def _world(group: Optional[ProcessGroup]) -> Tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op, group: Optional[ProcessGroup]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _Math:
    """Shard-local float32 math shared by the Functions below (they only orchestrate)."""

    @staticmethod
    def scaled(logits: torch.Tensor, temperature: float, vocab_start: int, vocab_size: Optional[int]) -> torch.Tensor:
        x = logits.float()
        if temperature != 1.0:
            x = x / temperature
        if vocab_size is not None and vocab_start + x.shape[-1] > vocab_size:
            x = x.clone() if x.data_ptr() == logits.data_ptr() else x
            x[..., max(vocab_size - vocab_start, 0):] = _NEG
        return x

    @staticmethod
    def log_normalizer(x: torch.Tensor, group) -> torch.Tensor:
        """log sum_v exp(x_v) over the whole (sharded) vocabulary, per row: 1 MAX + 1 SUM."""
        m = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
        s = _all_reduce(torch.exp(x - m[:, None]).sum(dim=-1), dist.ReduceOp.SUM, group)
        return m + s.log()

    @staticmethod
    def local_index(target: torch.Tensor, vocab_start: int, v_local: int):
        """Shard-local column of each global id and whether it lives on this shard."""
        on_shard = (target >= vocab_start) & (target < vocab_start + v_local)
        idx = torch.where(on_shard, target - vocab_start, torch.zeros_like(target))
        return idx, on_shard


    @staticmethod
    def target_logprobs(x: torch.Tensor, target: torch.Tensor, start: int, group):
        """log softmax(x)[target] for float32 chunk x ``[n, V_local]`` and targets ``[n, K]``:
        1 MAX all-reduce of the row max, then ONE SUM all-reduce of ``[sum exp, picked logits]``.
        Returns (log-probs ``[n, K]``, log-normaliser ``[n]``)."""
        idx, on = _Math.local_index(target, start, x.shape[-1])
        m = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
        picked = torch.where(on, torch.gather(x, 1, idx) - m[:, None], torch.zeros((), device=x.device))
        stats = _all_reduce(torch.cat([torch.exp(x - m[:, None]).sum(-1, keepdim=True), picked], 1),
                            dist.ReduceOp.SUM, group)
        log_z = stats[:, 0].log()
        return stats[:, 1:] - log_z[:, None], m + log_z

    @staticmethod
    def target_logprobs_grad(x, lse, target, g, start: int, temperature: float) -> torch.Tensor:
        """d(sum_k g_k lp_k)/d logits = (scatter(g) - p sum_k g_k) / T, shard-local (no communication)."""
        gx = -torch.exp(x - lse[:, None]) * g.sum(-1, keepdim=True)
        idx, on = _Math.local_index(target, start, x.shape[-1])
        gx.scatter_add_(1, idx, torch.where(on, g, torch.zeros((), device=g.device)))
        return gx / temperature if temperature != 1.0 else gx


def _rows(t: torch.Tensor, last: int) -> torch.Tensor:
    return t.reshape(-1, last)


class _VocabParallelGatherLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[target] for targets ``[N, K]`` (K ids per token).

    Forward: per chunk, MAX all-reduce of the row max, then ONE SUM all-reduce of the stacked
    ``[sum exp, picked target logits]``. Backward (no communication): d lp_k / d x_v =
    [v = y_k] - p_v, so grad_x = scatter(g) - p * sum_k g_k, divided by T.
    """

    @staticmethod
    def forward(ctx, logits, target, group, temperature, vocab_size, chunk):
        _, rank = _world(group)
        v_local = logits.shape[-1]
        start = rank * v_local
        x2 = _rows(logits, v_local)
        t2 = target.reshape(x2.shape[0], -1)
        out = torch.empty(t2.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(x2.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(0, x2.shape[0], chunk):
            x = _Math.scaled(x2[i:i + chunk], temperature, start, vocab_size)
            out[i:i + chunk], lse[i:i + chunk] = _Math.target_logprobs(x, t2[i:i + chunk], start, group)
        ctx.save_for_backward(logits, target, lse)
        ctx.cfg = (group, temperature, vocab_size, chunk, start)
        return out.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, lse = ctx.saved_tensors
        group, temperature, vocab_size, chunk, start = ctx.cfg
        v_local = logits.shape[-1]
        x2 = _rows(logits, v_local)
        t2 = target.reshape(x2.shape[0], -1)
        g2 = grad_out.reshape(t2.shape).float()
        grad = torch.empty_like(x2)
        for i in range(0, x2.shape[0], chunk):
            x = _Math.scaled(x2[i:i + chunk], temperature, start, vocab_size)
            gx = _Math.target_logprobs_grad(x, lse[i:i + chunk], t2[i:i + chunk], g2[i:i + chunk], start, temperature)
            grad[i:i + chunk] = gx.to(grad.dtype)
        return grad.reshape(logits.shape), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[target]`` in float32.

    logits ``[..., V_local]`` (this rank's shard), target ``[...]`` global ids -> ``[...]``.
    Also accepts target ``[..., K]`` (K ids per position) -> ``[..., K]``.
    Differentiable w.r.t. ``logits`` with an analytic backward.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    single = target.dim() == logits.dim() - 1
    if not single and target.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    t = target.unsqueeze(-1) if single else target
    out = _VocabParallelGatherLogProbs.apply(logits, t.long(), group, float(temperature), vocab_size, chunk_size)
    return out.squeeze(-1) if single else out


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log Z - E_p[x] with x = logits / T. 1 MAX + 1 SUM (stacked [sum exp, sum exp * x]).
    Backward (no communication): dH/dx_v = -p_v (x_v - E_p[x]), divided by T."""

    @staticmethod
    def forward(ctx, logits, group, temperature, vocab_size, chunk):
        _, rank = _world(group)
        v_local = logits.shape[-1]
        start = rank * v_local
        x2 = _rows(logits, v_local)
        ent = torch.empty(x2.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(ent)
        mean_x = torch.empty_like(ent)
        for i in range(0, x2.shape[0], chunk):
            x = _Math.scaled(x2[i:i + chunk], temperature, start, vocab_size)
            m = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
            e = torch.exp(x - m[:, None])
            stats = _all_reduce(torch.stack([e.sum(-1), (e * (x - m[:, None])).sum(-1)], dim=1),
                                dist.ReduceOp.SUM, group)
            log_z = stats[:, 0].log()
            ex = stats[:, 1] / stats[:, 0]  # E_p[x - m]
            ent[i:i + chunk] = log_z - ex
            lse[i:i + chunk] = m + log_z
            mean_x[i:i + chunk] = ex + m
        ctx.save_for_backward(logits, lse, mean_x)
        ctx.cfg = (temperature, vocab_size, chunk, start)
        return ent.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, mean_x = ctx.saved_tensors
        temperature, vocab_size, chunk, start = ctx.cfg
        x2 = _rows(logits, logits.shape[-1])
        g2 = grad_out.reshape(-1).float()
        grad = torch.empty_like(x2)
        for i in range(0, x2.shape[0], chunk):
            x = _Math.scaled(x2[i:i + chunk], temperature, start, vocab_size)
            p = torch.exp(x - lse[i:i + chunk, None])
            gx = -p * (x - mean_x[i:i + chunk, None]) * g2[i:i + chunk, None]
            if temperature != 1.0:
                gx = gx / temperature
            grad[i:i + chunk] = gx.to(grad.dtype)
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


class _VocabParallelKL(torch.autograd.Function):
    """Full-vocabulary divergence D(p_s, p_t) per token, differentiable w.r.t. the student only.

    Forward: 1 MAX + 1 SUM for both log-normalisers (stacked), then 1 SUM of the stacked
    [D, E_{p_s}[g]] partial sums. Backward (no communication): dD/dx_s = p_s (g - E_{p_s}[g]) / T,
    where g = dD/dp_s is (log p_s - log p_t + const) for reverse KL, -p_t / p_s for forward KL and
    (1 - beta)(log p_s - log m) for JSD; the constant parts cancel against E_{p_s}[g].
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, kind, beta, group, temperature, vocab_size, chunk):
        _, rank = _world(group)
        v_local = s_logits.shape[-1]
        start = rank * v_local
        s2, t2 = _rows(s_logits, v_local), _rows(t_logits, v_local)
        n = s2.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=s_logits.device)
        lse = torch.empty(n, 2, dtype=torch.float32, device=s_logits.device)
        mean_g = torch.empty(n, dtype=torch.float32, device=s_logits.device)
        for i in range(0, n, chunk):
            xs = _Math.scaled(s2[i:i + chunk], temperature, start, vocab_size)
            xt = _Math.scaled(t2[i:i + chunk], temperature, start, vocab_size)
            m = _all_reduce(torch.stack([xs.max(-1).values, xt.max(-1).values], 1), dist.ReduceOp.MAX, group)
            z = _all_reduce(torch.stack([torch.exp(xs - m[:, :1]).sum(-1), torch.exp(xt - m[:, 1:]).sum(-1)], 1),
                            dist.ReduceOp.SUM, group)
            log_z = m + z.log()
            ls, lt = xs - log_z[:, :1], xt - log_z[:, 1:]
            # padded columns carry p = 0 in both distributions, so their summands and grads are 0
            summand, g = _kl_terms(ls, lt, kind, beta)
            sums = _all_reduce(torch.stack([summand.sum(-1), (ls.exp() * g).sum(-1)], 1), dist.ReduceOp.SUM, group)
            out[i:i + chunk] = sums[:, 0]
            lse[i:i + chunk] = log_z
            mean_g[i:i + chunk] = sums[:, 1]
        ctx.save_for_backward(s_logits, t_logits, lse, mean_g)
        ctx.cfg = (kind, beta, temperature, vocab_size, chunk, start)
        return out.reshape(s_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        s_logits, t_logits, lse, mean_g = ctx.saved_tensors
        kind, beta, temperature, vocab_size, chunk, start = ctx.cfg
        v_local = s_logits.shape[-1]
        s2, t2 = _rows(s_logits, v_local), _rows(t_logits, v_local)
        g_out = grad_out.reshape(-1).float()
        grad = torch.empty_like(s2)
        for i in range(0, s2.shape[0], chunk):
            ls = _Math.scaled(s2[i:i + chunk], temperature, start, vocab_size) - lse[i:i + chunk, :1]
            lt = _Math.scaled(t2[i:i + chunk], temperature, start, vocab_size) - lse[i:i + chunk, 1:]
            if kind == "forward":  # p_s (g - E[g]) with g = -p_t / p_s, E[g] = -1, without dividing by p_s
                gx = ls.exp() - lt.exp()
            else:
                _, g = _kl_terms(ls, lt, kind, beta)
                gx = ls.exp() * (g - mean_g[i:i + chunk, None])
            gx = gx * g_out[i:i + chunk, None]
            if temperature != 1.0:
                gx = gx / temperature
            grad[i:i + chunk] = gx.to(grad.dtype)
        return grad.reshape(s_logits.shape), None, None, None, None, None, None, None


def _topk_tail_kl(student_logits, teacher_logits, kind, beta, group, temperature, vocab_size, top_k, chunk):
    """Divergence on the teacher's global top-k ids plus one tail bucket holding the remaining mass
    of each distribution: K + 1 categories per token, computed redundantly on every TP rank from
    [N, K] log-probs (autograd reaches the student shard through the gather Function). The tail
    mass is floored at 1e-6, so a teacher whose top-k holds all its mass gives a large finite
    reverse KL rather than an infinite one."""
    with torch.no_grad():
        _, ids = vocab_parallel_topk(teacher_logits, top_k, group=group, vocab_size=vocab_size)
        lt = vocab_parallel_logprobs(teacher_logits, ids, group=group, temperature=temperature,
                                     vocab_size=vocab_size, chunk_size=chunk)
    ls = vocab_parallel_logprobs(student_logits, ids, group=group, temperature=temperature,
                                 vocab_size=vocab_size, chunk_size=chunk)

    def with_tail(lp):
        # log(1 - sum p_k), clamped: the tail can round to 0 when top-k holds all the mass
        tail = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1.0 - 1e-6))
        return torch.cat([lp, tail], dim=-1)

    ls, lt = with_tail(ls), with_tail(lt)
    summand, _ = _kl_terms(ls, lt, kind, beta)
    return summand.sum(-1)


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
    if kind not in ("reverse", "forward", "jsd"):
        raise ValueError(f"kind must be 'reverse', 'forward' or 'jsd', got {kind!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary shard)")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            kind = "forward"
        elif beta == 1.0:
            kind = "reverse"
    teacher_logits = teacher_logits.detach()
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return _topk_tail_kl(student_logits, teacher_logits, kind, beta, group, float(temperature),
                             vocab_size, top_k, chunk_size)
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
    world, rank = _world(group)
    v_local = logits.shape[-1]
    start = rank * v_local
    x = logits
    if vocab_size is not None and start + v_local > vocab_size:
        x = logits.clone()
        x[..., max(vocab_size - start, 0):] = float("-inf")
    k_local = min(k, v_local)
    vals, idx = x.topk(k_local, dim=-1)
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

    Forward per token chunk: logits = h_c W_local^T in float32, 1 MAX + 1 SUM all-reduce, keep the
    log-normaliser only. Backward recomputes each chunk's logits: grad_x = (onehot - p) g / T,
    grad_h = grad_x W_local (SUM all-reduced over TP: every shard holds part of the vocabulary, as in
    megatron's copy_to_tensor_model_parallel_region), grad_W_local = grad_x^T h.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, group, temperature, vocab_size, chunk):
        _, rank = _world(group)
        start = rank * weight.shape[0]
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = target.reshape(-1, 1)
        out = torch.empty(h2.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        w = weight.float()
        for i in range(0, h2.shape[0], chunk):
            x = _Math.scaled(h2[i:i + chunk].float() @ w.t(), temperature, start, vocab_size)
            lp, lse[i:i + chunk] = _Math.target_logprobs(x, t2[i:i + chunk], start, group)
            out[i:i + chunk] = lp[:, 0]
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.cfg = (group, temperature, vocab_size, chunk, start)
        return out.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target, lse = ctx.saved_tensors
        group, temperature, vocab_size, chunk, start = ctx.cfg
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = target.reshape(-1, 1)
        g2 = grad_out.reshape(-1, 1).float()
        w = weight.float()
        grad_h = torch.empty(h2.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros_like(w)
        for i in range(0, h2.shape[0], chunk):
            hc = h2[i:i + chunk].float()
            x = _Math.scaled(hc @ w.t(), temperature, start, vocab_size)
            gx = _Math.target_logprobs_grad(x, lse[i:i + chunk], t2[i:i + chunk], g2[i:i + chunk], start, temperature)
            grad_h[i:i + chunk] = gx @ w
            grad_w.addmm_(gx.t(), hc)
        _all_reduce(grad_h, dist.ReduceOp.SUM, group)
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
