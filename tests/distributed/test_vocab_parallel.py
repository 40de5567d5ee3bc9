"""Vocab-parallel ops against a float64 single-process reference on the gathered logits."""

import pytest
import torch
import torch.nn.functional as F

from megatron_gndpo.ops.vocab_parallel import (
    fused_linear_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_topk,
)
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

N, V_TRUE, V_PAD, H = 24, 1000, 1024, 16
TEMP = 0.7


def _inputs(dtype, extreme):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(N, V_PAD, generator=g) * 3
    t = torch.randn(N, V_PAD, generator=g) * 3
    if extreme:
        s[0, 5], s[1, 7], t[2, 9], s[3, :V_TRUE] = 1e4, -1e4, 1e4, -1e4
        s[3, 17] = 1e4
    target = torch.randint(0, V_TRUE, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return s.to(dtype), t.to(dtype), target, upstream


def _ref(s, t, target, upstream, kind, beta=0.5, top_k=None, inplace=False, vocab=V_TRUE):
    """float64, full vocabulary (padding columns dropped), autograd for the gradients."""
    s = s[:, :vocab].double().requires_grad_(True)
    t = t[:, :vocab].double()
    ls, lt = F.log_softmax(s / TEMP, -1), F.log_softmax(t / TEMP, -1)
    if kind == "logp":
        out = ls.gather(1, target[:, None]).squeeze(1)
    elif kind == "entropy":
        out = -(ls.exp() * ls).sum(-1)
    else:
        if top_k is not None:
            ids = t.topk(top_k, -1).indices
            ls, lt = ls.gather(1, ids), lt.gather(1, ids)
            # the tail bucket's mass is floored at 1e-6 (documented): a teacher whose top-k holds all
            # its mass would otherwise give an infinite reverse KL
            tail = lambda lp: torch.log(torch.clamp(1 - lp.exp().sum(-1, keepdim=True), min=1e-6))  # noqa: E731
            ls, lt = torch.cat([ls, tail(ls)], -1), torch.cat([lt, tail(lt)], -1)
        ps, pt = ls.exp(), lt.exp()
        if kind == "reverse":
            out = (ps * (ls - lt)).sum(-1)
        elif kind == "forward":
            out = (pt * (lt - ls)).sum(-1)
        else:
            lm = torch.log(beta * pt + (1 - beta) * ps)
            out = (beta * pt * (lt - lm) + (1 - beta) * ps * (ls - lm)).sum(-1)
    (out * upstream.double()).sum().backward()
    grad = torch.zeros(s.shape[0], V_PAD, dtype=torch.float64)
    grad[:, :vocab] = s.grad
    return out.detach(), grad


CASES = [("logp", {}), ("logp", {"inplace": True}), ("entropy", {}), ("reverse", {}), ("forward", {}),
         ("jsd", {"beta": 0.3}), ("reverse", {"top_k": 20}), ("forward", {"top_k": 20})]


def _run_cases(groups, s_full, t_full, target, upstream, vocab, results, tp):
    v_local = V_PAD // tp
    sl = slice(groups.tp_rank * v_local, (groups.tp_rank + 1) * v_local)
    for kind, kw in CASES:
        s = s_full[:, sl].clone().requires_grad_(True)
        t = t_full[:, sl].clone()
        common = dict(group=groups.tp, temperature=TEMP, vocab_size=vocab, chunk_size=7)
        if kind == "logp":
            out = vocab_parallel_logprobs(s, target, **kw, **common)
        elif kind == "entropy":
            out = vocab_parallel_entropy(s, **common)
        else:
            out = vocab_parallel_kl(s, t, kind=kind, **kw, **common)
        (out * upstream).sum().backward()
        results[(tp, kind, tuple(kw.items()))] = (out.detach(), s.grad.float(), sl)
    return sl


def _ops_per_tp(groups, dtype, extreme):
    s_full, t_full, target, upstream = _inputs(dtype, extreme)
    results = {}
    for tp in (1, 2, 4):
        groups = relayout(tp)
        sl = _run_cases(groups, s_full, t_full, target, upstream, V_TRUE, results, tp)
        vals, ids = vocab_parallel_topk(t_full[:, sl], 20, group=groups.tp, vocab_size=V_TRUE)
        results[(tp, "topk")] = (vals.float(), ids)
    return results


@pytest.mark.parametrize("dtype,extreme", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_ops_match_float64_reference_at_tp_1_2_4(dtype, extreme):
    # fp32: 1e-4. Extreme logits: log-ratios of ~1.4e4 carry fp32 rounding of ~1e-3 into the KL grads.
    # bf16 inputs: the reference sees the same bf16 values; the error is the bf16 cast of the grad.
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    if extreme:
        rtol, atol = 1e-3, 1e-3
    s, t, target, upstream = _inputs(dtype, extreme)
    refs = {(kind, tuple(kw.items())): _ref(s.float(), t.float(), target, upstream, kind, **kw) for kind, kw in CASES}
    ref_top = t[:, :V_TRUE].float().topk(20, -1)
    for rank, res in enumerate(run_distributed(_ops_per_tp, 4, args=(dtype, extreme), timeout_s=240)):
        for tp in (1, 2, 4):
            for (kind, kw), (ref_out, ref_grad) in refs.items():
                out, grad, sl = res[(tp, kind, kw)]
                where = f"rank {rank} TP={tp} {kind}{dict(kw)} {dtype} extreme={extreme}"
                assert torch.isfinite(out).all() and torch.isfinite(grad).all(), f"{where}: non-finite"
                torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol,
                                           msg=lambda m: f"{where} value: {m}")
                torch.testing.assert_close(grad.double(), ref_grad[:, sl], rtol=rtol, atol=atol,
                                           msg=lambda m: f"{where} grad: {m}")
            vals, ids = res[(tp, "topk")]
            torch.testing.assert_close(vals, ref_top.values, msg=lambda m: f"rank {rank} TP={tp} topk: {m}")
            # ids may order ties differently (bf16); the values they point at must be the top-k values
            assert torch.equal(t[:, :V_TRUE].float().gather(1, ids), ref_top.values), f"rank {rank} TP={tp}: top-k ids"
            assert all(len(set(row.tolist())) == 20 for row in ids), f"rank {rank} TP={tp}: repeated top-k ids"


# at TP=4 (shards of 256 ids) a vocabulary of 700 ids leaves rank 3 a shard of padding only
SMALL_VOCAB = 700


def _padding_only_shard(groups):
    s_full, t_full, target, upstream = _inputs(torch.float32, False)
    results = {}
    _run_cases(relayout(4), s_full, t_full, target % SMALL_VOCAB, upstream, SMALL_VOCAB, results, 4)
    return results


def test_a_shard_of_padding_only():
    s, t, target, upstream = _inputs(torch.float32, False)
    refs = {(kind, tuple(kw.items())): _ref(s, t, target % SMALL_VOCAB, upstream, kind, **kw, vocab=SMALL_VOCAB)
            for kind, kw in CASES}
    for rank, res in enumerate(run_distributed(_padding_only_shard, 4, timeout_s=240)):
        for (kind, kw), (ref_out, ref_grad) in refs.items():
            out, grad, sl = res[(4, kind, kw)]
            where = f"rank {rank} {kind}{dict(kw)}"
            torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(grad.double(), ref_grad[:, sl], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{where} grad: {m}")


def _fused_per_tp(groups):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 10, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g)
    target = torch.randint(0, V_TRUE, (3, 10), generator=g)
    upstream = torch.randn(3, 10, generator=g)
    out = {}
    for tp in (1, 2, 4):
        groups = relayout(tp)
        v_local = V_PAD // tp
        sl = slice(groups.tp_rank * v_local, (groups.tp_rank + 1) * v_local)
        h = hidden.clone().requires_grad_(True)
        w = weight[sl].clone().requires_grad_(True)
        lp = fused_linear_logprobs(h, w, target, group=groups.tp, temperature=TEMP, vocab_size=V_TRUE, chunk_size=4)
        (lp * upstream).sum().backward()
        out[tp] = (lp.detach(), h.grad, w.grad, sl)
    return out, (hidden, weight, target, upstream)


def test_fused_linear_logprobs_matches_reference():
    for rank, (res, (hidden, weight, target, upstream)) in enumerate(run_distributed(_fused_per_tp, 4)):
        h = hidden.double().requires_grad_(True)
        w = weight.double().requires_grad_(True)
        logits = (h @ w.t())[..., :V_TRUE] / TEMP
        ref = F.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
        (ref * upstream.double()).sum().backward()
        for tp, (lp, gh, gw, sl) in res.items():
            where = f"rank {rank} TP={tp}"
            torch.testing.assert_close(lp.double(), ref.detach(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(gh.double(), h.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{where} dh: {m}")
            torch.testing.assert_close(gw.double(), w.grad[sl], rtol=1e-4, atol=1e-4, msg=lambda m: f"{where} dW: {m}")
