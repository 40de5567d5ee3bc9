"""Per-token advantage estimators for on-policy distillation (docs/algorithms.md).

Every estimator is a pure function: tensors, scalars and an explicit ``group`` (the data-parallel x
context-parallel group; ``None`` means one process) in, ``(advantages [B, T], stats)`` out. Stats are
python floats that are already global over ``group``, keyed as they are logged: ``score/*`` for the
per-token score, ``estimator/*`` for the rest. Every rank makes the same collectives in the
same order, also with zero local tokens, and errors found after a reduction are raised on every rank
together (so no rank is left waiting in a collective).

Symbols: lp_T teacher log-prob of the sampled token, lp_old the student's at sampling time, M the
response mask (1 on response tokens including EOS, 0 on prompt and padding).
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.algorithms.registry import Registry
from megatron_gndpo.distributed.collectives import all_reduce

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
Stats = Dict[str, float]


def get_advantage_estimator(name: str):
    return ADVANTAGE_ESTIMATORS.get(name)


def call_estimator(name: str, inputs: Dict[str, torch.Tensor], *, group, **kwargs):
    """Call estimator ``name`` with the tensors of ``inputs`` its signature asks for."""
    fn = get_advantage_estimator(name)
    params = inspect.signature(fn).parameters
    missing = [p for p, v in params.items() if v.kind == v.POSITIONAL_OR_KEYWORD and v.default is v.empty
               and p not in inputs]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)}, which this step does not provide")
    args = {k: v for k, v in inputs.items() if k in params}
    return fn(**args, group=group, **kwargs)


def estimator_options(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword arguments estimator ``name`` takes from ``algorithm.estimator_kwargs``: its keyword-only
    parameters (the tensors it reads come from the step, ``group`` from the layout)."""
    params = inspect.signature(get_advantage_estimator(name)).parameters
    return {k: p for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "group"}


def check_estimator_kwargs(name: str, kwargs: Dict[str, object]) -> Dict[str, object]:
    """``kwargs`` typed after estimator ``name``'s defaults (an int or a YAML string such as ``1e9``
    where a float is expected becomes a float); a key it does not take, or a value of another type,
    is refused by name."""
    options = estimator_options(name)
    valid = ", ".join(f"{k}={p.default!r}" for k, p in options.items()) or "none"
    out = {}
    for key, value in kwargs.items():
        if key not in options:
            raise ValueError(f"algorithm.estimator_kwargs.{key}: estimator {name!r} takes no {key!r}; "
                             f"its options (with defaults): {valid}")
        out[key] = _typed(value, options[key].default, f"algorithm.estimator_kwargs.{key} (estimator {name!r})")
    return out


def _typed(value: object, default: object, where: str) -> object:
    """``value`` where ``default`` stands: same type, a float from an int or a number's string, anything
    for a None default."""
    if default is None or (type(value) is type(default)):
        return value
    if isinstance(default, float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{where} must be {type(default).__name__}, got {value!r}")


def _score_stats(raw: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, clip: Optional[float],
                 group: Optional[ProcessGroup]) -> Stats:
    """Global [count, sum, sum of squares, clipped, non-finite] of the clipped score (float64, ONE SUM
    all-reduce) and [max, -min] of the raw score (ONE MAX all-reduce). Raises on every rank alike if
    any valid raw score is non-finite."""
    m = mask.bool()
    finite = torch.isfinite(raw)
    s = torch.where(m & finite, score, torch.zeros((), dtype=score.dtype, device=score.device)).double()
    clipped = (m & finite & (raw.abs() > clip)).sum() if clip is not None else torch.zeros((), device=raw.device)
    sums = torch.stack([m.sum().double(), s.sum(), (s * s).sum(), clipped.double(), (m & ~finite).sum().double()])
    sums = all_reduce(sums, dist.ReduceOp.SUM, group)
    big = torch.finfo(torch.float64).max
    r = raw.double()
    lowest = torch.tensor(-big, dtype=torch.float64, device=r.device)
    ext = torch.stack([torch.where(m & finite, r, -big).max() if r.numel() else lowest,
                       torch.where(m & finite, -r, -big).max() if r.numel() else lowest])
    ext = all_reduce(ext, dist.ReduceOp.MAX, group)
    count, total, total_sq, n_clipped, n_bad = sums.tolist()
    if n_bad > 0:
        raise ValueError(
            f"{int(n_bad)} valid response token(s) have non-finite teacher or student log-probs "
            "(check the teacher's numerics and that teacher and student share the vocabulary)"
        )
    mean = total / count if count else 0.0
    var = (total_sq - count * mean * mean) / (count - 1) if count > 1 else 0.0
    stats = {
        "score/mean": mean,
        "score/std": max(var, 0.0) ** 0.5,
        "score/max": ext[0].item() if count else 0.0,
        "score/min": -ext[1].item() if count else 0.0,
        "score/clip_frac": n_clipped / count if count else 0.0,
        "estimator/valid_tokens": count,
    }
    return stats


def _log_ratio(teacher_logprobs, old_logprobs, score_clip):
    raw = teacher_logprobs.float() - old_logprobs.float()  # [B, T]
    return raw, raw.clamp(-score_clip, score_clip)


@register_advantage_estimator("opd")
def opd(teacher_logprobs, old_logprobs, response_mask, *, group=None, score_clip: float = 5.0):
    """Plain on-policy distillation: s_t = clip(lp_T - lp_old, -c, c), A_t = s_t M_t.

    [B, T] x3 -> A [B, T] (float32, 0 where masked), stats.
    """
    raw, s = _log_ratio(teacher_logprobs, old_logprobs, score_clip)
    stats = _score_stats(raw, s, response_mask, score_clip, group)
    m = response_mask.bool()
    adv = torch.where(m & torch.isfinite(raw), s, torch.zeros((), device=s.device))
    return adv, {**stats, "estimator/adv_mean": stats["score/mean"], "estimator/adv_std": stats["score/std"]}


@register_advantage_estimator("gndpo")
def gndpo(teacher_logprobs, old_logprobs, response_mask, *, group=None, score_clip: float = 5.0, eps: float = 1e-8):
    """Globally normalised distillation advantage (GNDPO).

    s_t = clip(lp_T - lp_old, -c, c);  mu = sum(M s) / N;  var = sum(M (s - mu)^2) / (N - 1);
    A_t = (s_t - mu) / sqrt(var + eps) * M_t,
    where N is the number of valid response tokens of the WHOLE global batch: count, sum and sum of
    squares are accumulated in float64 and SUM-all-reduced over ``group`` (DP x CP). N < 2 raises.
    [B, T] x3 (mask bool or 0/1) -> A [B, T] float32, stats (pre-normalisation score stats, global).
    Reference: GNDPO ``compute_reverse_kl_and_adv_norm``.
    """
    raw, s = _log_ratio(teacher_logprobs, old_logprobs, score_clip)
    stats = _score_stats(raw, s, response_mask, score_clip, group)
    n = stats["estimator/valid_tokens"]
    if n < 2:
        raise ValueError(
            f"gndpo needs at least 2 valid response tokens in the global batch to estimate a variance, got {int(n)} "
            "(are all responses empty, or is the response mask all zeros?)"
        )
    mu, std = stats["score/mean"], stats["score/std"]
    m = response_mask.bool() & torch.isfinite(raw)
    adv = torch.where(m, (s - mu) / (std * std + eps) ** 0.5, torch.zeros((), device=s.device))
    return adv, {**stats, "estimator/adv_mean": 0.0, "estimator/adv_std": std / (std * std + eps) ** 0.5}


@register_advantage_estimator("grpo")
def grpo(rewards, prompt_index, response_mask, *, group=None, eps: float = 1e-6):
    """Outcome advantage: a_i = (r_i - mean_g(r)) / (std_g(r) + eps) over the samples of prompt group g
    (unbiased std; a group of one sample gets std 1), broadcast to its response tokens: A_t = a_i M_t.

    rewards [B], prompt_index [B] (samples of one prompt share an index and live on one rank), mask
    [B, T] -> A [B, T]. Stats: reward mean/std over ``group``.
    """
    r = rewards.double()
    a = torch.zeros_like(r)
    for idx in prompt_index.unique():
        sel = prompt_index == idx
        mean = r[sel].mean()
        std = r[sel].std() if sel.sum() > 1 else torch.ones((), dtype=r.dtype, device=r.device)
        a[sel] = (r[sel] - mean) / (std + eps)
    sums = all_reduce(torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
                                   r.sum(), (r * r).sum()]), dist.ReduceOp.SUM, group)
    n, total, total_sq = sums.tolist()
    mean = total / n if n else 0.0
    stats = {"estimator/reward_mean": mean,
             "estimator/reward_std": max(total_sq / n - mean * mean, 0.0) ** 0.5 if n else 0.0}
    return (a.float()[:, None] * response_mask.float()), stats


@register_advantage_estimator("vopd")
def vopd(teacher_logprobs, old_logprobs, token_kl, response_mask, *, group=None):
    """Variance-reduced OPD: A_t = stopgrad(r_t + KL_t), r_t = lp_T - lp_old,
    KL_t = sum_v p_s(v) (log p_s(v) - log p_T(v)) over the full vocabulary, or over the teacher's top-k ids
    plus one tail bucket (``algorithm.divergence.top_k``; ``trainer/distill.py`` computes it in the
    student's old-log-prob phase). E_{y~p_s}[r_t] = -KL_t, so KL_t is the baseline.
    [B, T] x4 -> A [B, T]."""
    raw = teacher_logprobs.float() - old_logprobs.float()
    score = raw + token_kl.detach().float()
    stats = _score_stats(raw, score, response_mask, None, group)
    adv = torch.where(response_mask.bool(), score, torch.zeros((), device=score.device))
    return adv, stats


@register_advantage_estimator("gopd")
def gopd(teacher_logprobs, old_logprobs, ref_logprobs, response_mask, *, group=None, lam: float = 1.0):
    """Generalised OPD: A_t = lam (lp_T - lp_ref) - (lp_old - lp_ref). lam = 1 is ``opd`` (unclipped),
    lam > 1 is ExOPD (1.25 suggested). lp_ref: the student's initial weights, or the teacher's pre-RL
    base. [B, T] x4 -> A [B, T]."""
    t, o, r = teacher_logprobs.float(), old_logprobs.float(), ref_logprobs.float()
    score = lam * (t - r) - (o - r)
    stats = _score_stats(t - o, score, response_mask, None, group)
    adv = torch.where(response_mask.bool(), score, torch.zeros((), device=score.device))
    return adv, stats


@register_advantage_estimator("uniopd")
def uniopd(teacher_logprobs, old_logprobs, response_mask, correct=None, prompt_index=None, *, group=None,
           outlier: float = 10.0, delta: float = 0.4, split: float = 0.5, scope: str = "global"):
    """UniOPD: a_t = lp_T - lp_old with tokens where |a_t| >= ``outlier`` masked out; m_i the
    per-sequence mean of a over its kept tokens. With correctness labels: gap = mean_{i correct}(m_i)
    - mean_{i incorrect}(m_i); if gap < delta, correct sequences are shifted up by split (delta - gap)
    and incorrect ones down by (1 - split)(delta - gap). ``scope`` 'global' takes the gap over the
    whole batch (sums all-reduced over ``group``), 'group' per prompt group (local: a prompt's samples
    live on one rank). A_t = (a_t + shift_i) on kept tokens, 0 elsewhere.
    """
    if scope not in ("global", "group"):
        raise ValueError(f"uniopd scope must be 'global' or 'group', got {scope!r}")
    raw = teacher_logprobs.float() - old_logprobs.float()
    keep = response_mask.bool() & (raw.abs() < outlier)
    stats = _score_stats(raw, raw, keep, None, group)
    adv = torch.where(keep, raw, torch.zeros((), device=raw.device))
    if correct is None:
        return adv, stats
    seq_mean = adv.sum(-1) / keep.sum(-1).clamp_min(1)  # [B]
    c = correct.bool()
    shift = torch.zeros_like(seq_mean)

    def shifts(sel_c, sel_i, sums):
        n_c, s_c, n_i, s_i = sums
        if n_c == 0 or n_i == 0:
            return 0.0
        gap = s_c / n_c - s_i / n_i
        return max(delta - gap, 0.0)

    if scope == "global":
        sums = all_reduce(torch.stack([c.sum().double(), seq_mean[c].double().sum(),
                                       (~c).sum().double(), seq_mean[~c].double().sum()]), dist.ReduceOp.SUM, group)
        d = shifts(c, ~c, sums.tolist())
        shift = torch.where(c, split * d, -(1.0 - split) * d)
        stats["estimator/uniopd_shift"] = d
    else:
        if prompt_index is None:
            raise ValueError("uniopd scope='group' needs prompt_index")
        for idx in prompt_index.unique():
            sel = prompt_index == idx
            cs, cis = sel & c, sel & ~c
            d = shifts(cs, cis, [cs.sum().item(), seq_mean[cs].sum().item(),
                                 cis.sum().item(), seq_mean[cis].sum().item()])
            shift = torch.where(cs, split * d, torch.where(cis, -(1.0 - split) * d, shift))
    adv = torch.where(keep, raw + shift[:, None], torch.zeros((), device=raw.device))
    return adv, stats


def with_outcome_advantage(distill_adv: torch.Tensor, outcome_adv: torch.Tensor, outcome_weight: float) -> torch.Tensor:
    """KDRL's mix: A = A_distill + w * A_outcome (both [B, T], 0 where masked)."""
    return distill_adv + outcome_weight * outcome_adv
