"""GNDPO statistics and policy-loss gradients are the same for every DP and micro-batch split."""

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.algorithms import advantages as adv
from megatron_gndpo.algorithms import losses
from megatron_gndpo.algorithms.reduce import global_normalizer
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

B, T = 8, 9
# uneven rows per DP rank (and rank 2 of DP=4 holds a single, empty response)
SPLITS = {2: [0, 3, 8], 4: [0, 1, 5, 6, 8]}


def _data():
    g = torch.Generator().manual_seed(7)
    teacher = -torch.rand(B, T, generator=g) * 9
    old = -torch.rand(B, T, generator=g) * 9
    lengths = torch.tensor([9, 4, 1, 6, 5, 0, 8, 2])
    mask = torch.arange(T)[None] < lengths[:, None]
    adv_ = torch.randn(B, T, generator=g)
    return teacher, old, mask, adv_


def _per_dp(groups):
    teacher, old, mask, a = _data()
    out = {}
    for dp in (2, 4):
        groups = relayout(4 // dp)
        lo, hi = SPLITS[dp][groups.dp_rank], SPLITS[dp][groups.dp_rank + 1]
        gn, stats = adv.gndpo(teacher[lo:hi], old[lo:hi], mask[lo:hi], group=groups.dp)
        out[("gndpo", dp)] = (gn, stats, (lo, hi))
        for name in ("ppo", "gspo"):
            for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
                new = old[lo:hi].clone().add_(0.1).requires_grad_(True)
                n = global_normalizer(mask[lo:hi], agg, group=groups.dp)
                total = torch.zeros(())
                for i in range(0, hi - lo, 2):  # micro-batches of 2 rows
                    sl = slice(i, i + 2)
                    loss, _ = losses.POLICY_LOSSES.get(name)(new[sl], old[lo:hi][sl], a[lo:hi][sl], mask[lo:hi][sl],
                                                              normalizer=n, agg=agg)
                    loss.backward()
                    total += loss.detach()
                dist.all_reduce(total, group=groups.dp)
                out[(name, agg, dp)] = (total, new.grad, (lo, hi))
    return out


def test_gndpo_and_loss_gradients_are_split_invariant():
    teacher, old, mask, a = _data()
    ref_adv, ref_stats = adv.gndpo(teacher, old, mask)
    refs = {}
    for name in ("ppo", "gspo"):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            new = old.clone().add_(0.1).requires_grad_(True)
            loss, _ = losses.POLICY_LOSSES.get(name)(new, old, a, mask, normalizer=global_normalizer(mask, agg),
                                                     agg=agg)
            loss.backward()
            refs[(name, agg)] = (loss.detach(), new.grad)
    for rank, res in enumerate(run_distributed(_per_dp, 4)):
        for dp in (2, 4):
            gn, stats, (lo, hi) = res[("gndpo", dp)]
            torch.testing.assert_close(gn, ref_adv[lo:hi], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} DP={dp} gndpo: {m}")
            for k in ("score/mean", "score/std", "score/min", "score/max", "estimator/valid_tokens"):
                assert abs(stats[k] - ref_stats[k]) < 1e-9 * max(1.0, abs(ref_stats[k])), f"rank {rank} DP={dp} {k}"
            for (name, agg), (ref_loss, ref_grad) in refs.items():
                total, grad, (lo, hi) = res[(name, agg, dp)]
                where = f"rank {rank} DP={dp} {name}/{agg}"
                torch.testing.assert_close(total, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} loss: {m}")
                torch.testing.assert_close(grad, ref_grad[lo:hi], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{where} grad: {m}")


def _too_few(groups):
    teacher, old, mask, _ = _data()
    empty = torch.zeros_like(mask)
    if groups.dp_rank == 0:
        empty[0, 0] = True  # one valid token in the whole DP world
    try:
        adv.gndpo(teacher, old, empty, group=groups.dp)
    except ValueError as e:
        return str(e)
    return None


def test_gndpo_raises_on_every_rank_when_the_global_batch_is_too_small():
    msgs = run_distributed(_too_few, 2)
    assert all(m is not None and "got 1" in m for m in msgs), msgs
