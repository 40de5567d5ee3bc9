"""Masked reductions and the global normalisers of a step.

Local denominators are clamped to 1, so a fully masked sequence contributes 0, not NaN. Global
normalisers are computed ONCE per optimizer step (all-reduced over the DP group) and passed to every
micro-batch loss, so that summing micro-batch losses over micro-batches and DP ranks gives the exact
global mean however the batch is split.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.collectives import all_reduce

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, denom: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(mask * x) / denom, with denom = clamp(sum(mask), 1) unless given."""
    if denom is None:
        denom = mask.float().sum() if dim is None else mask.float().sum(dim)
        denom = denom.clamp_min(1.0)
    return masked_sum(x, mask, dim) / denom


def global_normalizer(mask: torch.Tensor, agg: str, group: Optional[ProcessGroup] = None) -> float:
    """The step-wide denominator of ``agg``: valid tokens (token-mean) or sequences with at least one
    valid token (seq-*), summed over ``group``. ``mask`` ``[B, T]`` is this rank's whole step."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGREGATIONS)}")
    m = mask.bool()
    local = m.sum() if agg == "token-mean" else m.any(-1).sum()
    return float(all_reduce(local.to(torch.float64), group=group).item())


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, normalizer: float) -> torch.Tensor:
    """This micro-batch's share of the step loss.

    token-mean:           sum_{i,t} M l / N_tokens
    seq-mean-token-mean:  sum_i (sum_t M l / n_i) / N_seqs
    seq-mean-token-sum:   sum_i  sum_t M l        / N_seqs
    with N_* the global normaliser of the whole step (see :func:`global_normalizer`).
    """
    if not normalizer > 0:
        raise ValueError(f"loss normaliser must be > 0 (the step has no valid response tokens), got {normalizer}")
    if agg == "token-mean":
        return masked_sum(per_token, mask) / normalizer
    if agg == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).sum() / normalizer
    if agg == "seq-mean-token-sum":
        return masked_sum(per_token, mask, dim=-1).sum() / normalizer
    raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGREGATIONS)}")
