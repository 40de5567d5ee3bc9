"""Policy losses and divergence loss terms (docs/algorithms.md).

Each loss returns this micro-batch's share of the step loss, already divided by the GLOBAL
normaliser of the step (``reduce.global_normalizer``), so that summing over micro-batches and DP
ranks is the exact global mean and the gradient does not depend on the split. Metrics are returned
on the same footing (sums divided by the global normaliser): summing them over micro-batches and DP
ranks gives their global means.

Symbols: lp_new the student's current log-prob of the sampled token, lp_old at sampling time, A the
advantage, M the response mask, eps_lo / eps_hi the clip range.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_gndpo.algorithms.reduce import aggregate
from megatron_gndpo.algorithms.registry import Registry

POLICY_LOSSES = Registry("policy loss")
SAMPLED_DIVERGENCES = Registry("sampled-token divergence")
Metrics = Dict[str, torch.Tensor]


def _clipped_objective(log_ratio, advantages, mask, agg, normalizer, clip_low, clip_high, dual_clip):
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    if dual_clip is not None:
        # Dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c, bounding huge ratios.
        capped = torch.minimum(per_token, -advantages * dual_clip)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = aggregate(per_token, mask, agg, normalizer)
    metrics = {
        "clip_frac": aggregate(clipped, mask, agg, normalizer).detach(),
        "ratio_mean": aggregate(ratio.detach(), mask, agg, normalizer),
    }
    return loss, metrics


def _approx_kl(logprobs, old_logprobs, mask, agg, normalizer):
    """k3 estimate of KL(new || old) per sampled token: exp(d) - 1 - d, d = lp_old - lp_new (metric only)."""
    d = (old_logprobs - logprobs).detach()
    return aggregate(torch.exp(d) - 1 - d, mask, agg, normalizer)


@POLICY_LOSSES.register("ppo")
def ppo(logprobs, old_logprobs, advantages, mask, *, normalizer: float, agg: str = "token-mean",
        clip_low: float = 0.2, clip_high: float = 0.2,
        dual_clip: Optional[float] = None) -> Tuple[torch.Tensor, Metrics]:
    """Token-level clipped surrogate:
    rho_t = exp(lp_new_t - lp_old_t);  l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_lo, 1 + eps_hi)),
    optionally dual-clipped (A_t < 0: min(l_t, -A_t c)); aggregated by ``agg`` over the global step.
    [B, T] x4 -> scalar, metrics."""
    log_ratio = logprobs - old_logprobs.detach()
    loss, metrics = _clipped_objective(log_ratio, advantages.detach(), mask, agg, normalizer,
                                       clip_low, clip_high, dual_clip)
    metrics["approx_kl"] = _approx_kl(logprobs, old_logprobs, mask, agg, normalizer)
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo(logprobs, old_logprobs, advantages, mask, *, normalizer: float, agg: str = "seq-mean-token-mean",
         clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: Optional[float] = None) -> Tuple[torch.Tensor, Metrics]:
    """Sequence-ratio surrogate (GSPO, as the GNDPO reference trains):
    log s_it = lp_new_t - sg(lp_new_t) + sg(mean_t(M (lp_new - lp_old))) (clamped at 10), so every token
    of sequence i carries the sequence's geometric-mean ratio in value and its own gradient;
    l_t = max(-A_t s_it, -A_t clip(s_it, 1 - eps_lo, 1 + eps_hi)); aggregated by ``agg``.
    [B, T] x4 -> scalar, metrics."""
    m = mask.float()
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # [B]
    log_s = logprobs - logprobs.detach() + seq_log_ratio.detach()[:, None]
    log_s = torch.clamp(log_s, max=10.0)
    loss, metrics = _clipped_objective(log_s, advantages.detach(), mask, agg, normalizer,
                                       clip_low, clip_high, dual_clip)
    metrics["approx_kl"] = _approx_kl(logprobs, old_logprobs, mask, agg, normalizer)
    return loss, metrics


# --- divergences used as direct loss terms -------------------------------------------------------
# ``algorithm.divergence.kind``: k1-k3 take the log-probs of the sampled token (``SAMPLED_DIVERGENCES``);
# rkl / fkl / jsd compare the two distributions over the vocabulary or the teacher's top-k
# (``ops.vocab_parallel``: ``vocab_parallel_kl`` / ``topk_tail_divergence`` with the kind below).
DISTRIBUTION_DIVERGENCES = {"rkl": "reverse", "fkl": "forward", "jsd": "jsd"}


@SAMPLED_DIVERGENCES.register("k1")
def k1(student_logprobs, teacher_logprobs):
    """k1 = lp_s - lp_T (unbiased for KL(S||T) under y ~ p_s, high variance)."""
    return student_logprobs - teacher_logprobs.detach()


@SAMPLED_DIVERGENCES.register("k2")
def k2(student_logprobs, teacher_logprobs):
    """k2 = 0.5 (lp_s - lp_T)^2."""
    return 0.5 * (student_logprobs - teacher_logprobs.detach()) ** 2


@SAMPLED_DIVERGENCES.register("k3")
def k3(student_logprobs, teacher_logprobs):
    """k3 = rho - 1 - log rho, rho = p_T / p_s (non-negative, unbiased for KL(S||T) under y ~ p_s)."""
    log_rho = teacher_logprobs.detach() - student_logprobs
    return torch.exp(log_rho) - 1 - log_rho


def divergence_loss(per_token_div: torch.Tensor, mask, *, weight: float, normalizer: float,
                    agg: str = "token-mean") -> torch.Tensor:
    """weight * aggregate(D_t): a per-token divergence (k1-k3, or rkl / fkl / jsd per token) as a direct loss
    term next to the policy loss, on the policy loss's footing (``agg`` and the step's global normaliser)."""
    return weight * aggregate(per_token_div, mask, agg, normalizer)
