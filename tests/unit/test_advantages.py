"""Estimators and losses in one process against float64 formulas written out by hand."""

import math

import pytest
import torch

from megatron_gndpo.algorithms import advantages as adv
from megatron_gndpo.algorithms import losses
from megatron_gndpo.algorithms.reduce import aggregate, global_normalizer
from megatron_gndpo.algorithms.registry import Registry


def _batch(seed=0, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    teacher = -torch.rand(b, t, generator=g) * 8
    old = -torch.rand(b, t, generator=g) * 8
    lengths = torch.tensor([7, 3, 0, 5])[:b]
    mask = torch.arange(t)[None] < lengths[:, None]
    return teacher, old, mask


def test_gndpo_matches_float64_formula_and_accepts_float_masks():
    teacher, old, mask = _batch()
    s = (teacher.double() - old.double()).clamp(-5, 5)[mask]
    mu, var = s.mean(), s.var(unbiased=True)
    a, stats = adv.gndpo(teacher, old, mask)
    expected = torch.zeros_like(teacher, dtype=torch.float64)
    expected[mask] = (s - mu) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-6)
    a2, _ = adv.gndpo(teacher, old, mask.float())
    assert torch.equal(a, a2)
    assert (a[~mask] == 0).all()
    assert stats["estimator/valid_tokens"] == mask.sum().item()
    assert math.isclose(stats["score/mean"], mu.item(), rel_tol=1e-9)
    assert math.isclose(stats["score/std"], var.sqrt().item(), rel_tol=1e-9)
    raw = (teacher - old)[mask]
    assert math.isclose(stats["score/clip_frac"], (raw.abs() > 5).float().mean().item(), rel_tol=1e-6)
    assert math.isclose(stats["score/max"], raw.max().item(), rel_tol=1e-6)


def test_gndpo_refuses_fewer_than_two_tokens_and_non_finite_logprobs():
    teacher, old, mask = _batch()
    one = torch.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2 valid response tokens"):
        adv.gndpo(teacher, old, one)
    with pytest.raises(ValueError, match="at least 2"):
        adv.gndpo(teacher, old, torch.zeros_like(mask))
    bad = teacher.clone()
    bad[0, 1], bad[1, 0] = float("nan"), float("-inf")
    bad[2, 3] = float("nan")  # padded position: ignored
    with pytest.raises(ValueError, match="2 valid response token"):
        adv.gndpo(bad, old, mask)


def test_opd_clips_and_masks():
    teacher, old, mask = _batch()
    a, stats = adv.opd(teacher, old, mask, score_clip=2.0)
    expected = torch.where(mask, (teacher - old).clamp(-2, 2), torch.zeros(()))
    assert torch.equal(a, expected)
    assert 0 < stats["score/clip_frac"] < 1


def test_gopd_with_lambda_one_is_unclipped_opd_and_vopd_adds_kl():
    teacher, old, mask = _batch()
    ref = old - 0.3
    a, _ = adv.gopd(teacher, old, ref, mask, lam=1.0)
    torch.testing.assert_close(a, torch.where(mask, teacher - old, torch.zeros(())))
    a, _ = adv.gopd(teacher, old, ref, mask, lam=1.25)
    torch.testing.assert_close(a, torch.where(mask, 1.25 * (teacher - ref) - (old - ref), torch.zeros(())))
    kl = torch.rand_like(teacher)
    a, _ = adv.vopd(teacher, old, kl, mask)
    torch.testing.assert_close(a, torch.where(mask, teacher - old + kl, torch.zeros(())))


def test_grpo_z_scores_within_prompt_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 3.0, 1.0])
    index = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.ones(5, 2, dtype=torch.bool)
    a, stats = adv.grpo(rewards, index, mask)
    g0 = torch.tensor([1.0, 0.0, 0.5])
    g1 = torch.tensor([3.0, 1.0])
    expected = torch.cat([(g0 - g0.mean()) / (g0.std() + 1e-6), (g1 - g1.mean()) / (g1.std() + 1e-6)])
    torch.testing.assert_close(a[:, 0], expected)
    torch.testing.assert_close(a[:, 1], expected)
    assert math.isclose(stats["estimator/reward_mean"], rewards.mean().item(), rel_tol=1e-6)


def test_uniopd_masks_outliers_and_shifts_by_correctness():
    teacher = torch.tensor([[-1.0, -2.0, -30.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-2.0, -2.0, -1.0], [-1.5, -1.0, -0.5]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    a, _ = adv.uniopd(teacher, old, mask)
    assert a[0, 2] == 0  # |a| = 29 >= 10 masked out
    correct = torch.tensor([False, True])
    a, stats = adv.uniopd(teacher, old, mask, correct)
    m0 = (1.0 + 0.0) / 2  # incorrect sequence mean
    m1 = (0.5 + 0.0 - 0.5) / 3  # correct sequence mean
    d = 0.4 - (m1 - m0)
    assert math.isclose(stats["estimator/uniopd_shift"], d, rel_tol=1e-6)
    torch.testing.assert_close(a[1], torch.tensor([0.5, 0.0, -0.5]) + 0.5 * d)
    torch.testing.assert_close(a[0, :2], torch.tensor([1.0, 0.0]) - 0.5 * d)


def test_registry_errors_name_the_known_entries():
    with pytest.raises(ValueError, match="known: .*gndpo"):
        adv.get_advantage_estimator("gndpoo")
    reg = Registry("thing")
    reg.register("a")(lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="needs token_kl"):
        adv.call_estimator("vopd", {"teacher_logprobs": torch.zeros(1, 2), "old_logprobs": torch.zeros(1, 2),
                                    "response_mask": torch.ones(1, 2)}, group=None)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregations_match_their_formulas(agg):
    x = torch.arange(12.0).reshape(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    n = global_normalizer(mask, agg)
    got = aggregate(x, mask, agg, n)
    if agg == "token-mean":
        expected = x[mask].mean()
    elif agg == "seq-mean-token-mean":
        expected = (torch.tensor([0 + 1.0]) / 2 + (4 + 5 + 6 + 7.0) / 4).sum() / 2
    else:
        expected = torch.tensor((0 + 1.0) + (4 + 5 + 6 + 7.0)) / 2
    torch.testing.assert_close(got, expected.reshape(()))


def test_ppo_and_gspo_follow_their_formulas():
    g = torch.Generator().manual_seed(2)
    new = (-torch.rand(3, 5, generator=g) * 3).requires_grad_(True)
    old = new.detach() + torch.randn(3, 5, generator=g) * 0.3
    a = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    n = global_normalizer(mask, "token-mean")
    loss, m = losses.ppo(new, old, a, mask, normalizer=n)
    rho = torch.exp(new.detach() - old)
    ref = torch.maximum(-a * rho, -a * rho.clamp(0.8, 1.2))[mask].mean()
    torch.testing.assert_close(loss.detach(), ref)
    assert 0 <= m["clip_frac"] <= 1
    n = global_normalizer(mask, "seq-mean-token-mean")
    loss, _ = losses.gspo(new, old, a, mask, normalizer=n)
    seq = torch.stack([((new.detach() - old)[i][mask[i]]).mean() for i in range(3)])
    s = torch.exp(seq)[:, None].expand(3, 5)
    per = torch.maximum(-a * s, -a * s.clamp(0.8, 1.2))
    ref = torch.stack([per[i][mask[i]].mean() for i in range(3)]).mean()
    torch.testing.assert_close(loss.detach(), ref)
    loss.backward()
    assert torch.isfinite(new.grad).all() and (new.grad[~mask] == 0).all()


def test_sampled_divergences():
    s, t = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(losses.k1(s, t), s - t)
    torch.testing.assert_close(losses.k2(s, t), 0.5 * (s - t) ** 2)
    torch.testing.assert_close(losses.k3(s, t), torch.exp(t - s) - 1 - (t - s))
    assert (losses.k3(s, t) >= 0).all()


def test_outcome_combination_and_divergence_loss_term():
    d, o = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(adv.with_outcome_advantage(d, o, 0.1), d + 0.1 * o)
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(losses.divergence_loss(torch.tensor([[3.0, 9.0]]), mask, weight=0.5, normalizer=1.0),
                               torch.tensor(1.5))
