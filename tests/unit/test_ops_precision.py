"""The vocab-parallel ops against float64 where float32 is tested hardest: logits of magnitude ~100
and a top-k tail of ~1e-5 of the mass.

The sampled-token log-prob and its gradient must be no further from float64 than megatron-core's
own ``vocab_parallel_cross_entropy`` on the same inputs (up to half a float32 ulp of the gradient's
largest entry: both end in a float32 rounding, which falls either way). Entropy and the divergences
have no megatron counterpart; their gradients must stay within a few float32 ulps of the largest
gradient entry and their values within a few ulps of the sum of the magnitudes of their terms (the
float32 resolution of such a sum). Before the log-normaliser was kept as a separate max and sum and
the tail summed directly, these errors were 20-5000 ulps.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_gndpo.config.schema import ParallelConfig
from megatron_gndpo.ops import vocab_parallel as vp

EPS = torch.finfo(torch.float32).eps
N, V, K = 32, 16384, 20


@pytest.fixture(scope="module")
def megatron_cross_entropy():
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    yield vocab_parallel_cross_entropy
    destroy_parallel()


def _logits(regime: str, seed: int = 1):
    """(student, teacher) float32 ``[N, V]`` and an upstream gradient ``[N]``."""
    g = torch.Generator().manual_seed(seed)
    if regime == "tail":  # a confident teacher (top-K mass 1 - ~1e-5) and a student that is not
        t = torch.randn(N, V, generator=g) * 0.5 - 3.0
        top = torch.randperm(V, generator=g)[:K]
        t[:, top] += 17.0 + torch.randn(N, K, generator=g)
        s = t.clone()
        s[:, top] -= 10.0
        s += 0.5 * torch.randn(N, V, generator=g)
        return s + 100.0, t + 100.0, torch.randn(N, generator=g)
    offset, scale = {"peaked": (100.0, 30.0), "flat": (100.0, 3.0), "wide": (0.0, 100.0)}[regime]
    s = offset + scale * torch.randn(N, V, generator=g)
    return s, s + 0.3 * scale * torch.randn(N, V, generator=g), torch.randn(N, generator=g)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _half_ulp(ref: torch.Tensor) -> float:
    return 0.5 * EPS * 2.0 ** math.floor(math.log2(ref.abs().max().item()))


@pytest.mark.parametrize("regime", ["peaked", "flat", "wide"])
@pytest.mark.parametrize("path", ["saved", "recomputed", "inplace"])
def test_logprob_and_gradient_as_close_to_float64_as_megatron(megatron_cross_entropy, regime, path):
    s, _, up = _logits(regime)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    target[::2] = s[::2].argmax(-1)  # half the rows score their most likely token: p ~ 1, 1 - p cancels
    xd = s.double().requires_grad_(True)
    ref = F.log_softmax(xd, -1).gather(1, target[:, None]).squeeze(1)
    (ref * up.double()).sum().backward()

    mx = s.clone().requires_grad_(True)
    mlp = -megatron_cross_entropy(mx.clone(), target)  # it overwrites its input; the clone carries the grad
    (mlp * up).sum().backward()

    # "recomputed": float64 logits holding the same values take the chunk-recomputing backward
    x = (s.double() if path == "recomputed" else s.clone()).requires_grad_(True)
    lp = vp.vocab_parallel_logprobs(x, target, chunk_size=7, **({"inplace": True} if path == "inplace" else {}))
    (lp * up).sum().backward()

    assert _max_err(lp, ref) <= _max_err(mlp, ref) + _half_ulp(ref)
    assert _max_err(x.grad, xd.grad) <= _max_err(mx.grad, xd.grad) + _half_ulp(xd.grad)


def _reference(s, t, kind, top_k=None, beta=0.5):
    """float64 (value, terms) with autograd to the student logits."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if top_k is not None:
        ids = t.topk(top_k, -1).indices
        ls, lt = ls.gather(1, ids), lt.gather(1, ids)

        def tail(lp):  # log(1 - sum p_k), floored at the documented 1e-6
            return torch.log(torch.clamp(-torch.expm1(torch.logsumexp(lp, -1, keepdim=True)), min=1e-6))

        ls, lt = torch.cat([ls, tail(ls)], -1), torch.cat([lt, tail(lt)], -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "entropy":
        terms = -ps * ls
    elif kind == "reverse":
        terms = ps * (ls - lt)
    elif kind == "forward":
        terms = pt * (lt - ls)
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        terms = beta * pt * (lt - lm) + (1 - beta) * ps * (ls - lm)
    return terms.sum(-1), terms.detach()


@pytest.mark.parametrize("regime", ["peaked", "flat", "tail"])
@pytest.mark.parametrize("kind,top_k", [("entropy", None), ("reverse", None), ("forward", None), ("jsd", None),
                                        ("reverse", K), ("forward", K), ("jsd", K)])
def test_entropy_and_divergences_within_a_few_float32_ulps(regime, kind, top_k):
    s, t, up = _logits(regime)
    sd = s.double().requires_grad_(True)
    ref, terms = _reference(sd, t.double(), kind, top_k)
    (ref * up.double()).sum().backward()

    x = s.clone().requires_grad_(True)
    if kind == "entropy":
        out = vp.vocab_parallel_entropy(x, chunk_size=7)
    else:
        out = vp.vocab_parallel_kl(x, t, kind=kind, top_k=top_k, chunk_size=7)
    (out * up).sum().backward()

    value_ulps = _max_err(out, ref.detach()) / (EPS * terms.abs().sum(-1).max().item())
    grad_ulps = _max_err(x.grad, sd.grad) / (EPS * sd.grad.abs().max().item())
    assert value_ulps <= 16 and grad_ulps <= 8, (value_ulps, grad_ulps)


def test_topk_tail_log_prob_is_summed_not_cancelled():
    """The mass outside the top-k ids, ~1e-5 here: ``1 - sum p_k`` in float32 keeps only ~1% of it."""
    s, t, _ = _logits("tail")
    ids = t.topk(K, -1).indices
    ref = torch.logsumexp(F.log_softmax(t.double(), -1).scatter(1, ids, -math.inf), -1)
    assert ((ref.exp() > 1e-5) & (ref.exp() < 1e-4)).all()  # small, and above the 1e-6 floor of the KL
    got = vp._gather_logprobs(t, ids, None, 1.0, None, 7, tail=True)
    torch.testing.assert_close(got[:, :-1].double(), F.log_softmax(t.double(), -1).gather(1, ids), rtol=0, atol=2e-6)
    assert _max_err(got[:, -1], ref) <= 4 * EPS * ref.abs().max().item()
