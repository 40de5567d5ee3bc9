"""The communication contract of the vocab-parallel ops: which collectives, on which group, how many.

A fake 2-rank group and a recording all_reduce stand in for torch.distributed (as megatron's own
cross-entropy tests do); the op math then runs as rank 0 of 2 with the reductions being identities.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.ops import vocab_parallel as vp

GROUP = object()


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def all_reduce(t, op=None, group=None):
        seen.append((op, group, tuple(t.shape)))

    monkeypatch.setattr(vp.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(vp.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(vp.dist, "get_rank", lambda group=None: 0)
    return seen


def _ops(calls):
    return [(op, g) for op, g, _ in calls]


def test_logprobs_uses_one_max_and_one_sum_per_chunk_of_tokens(calls):
    logits = torch.randn(10, 8, requires_grad=True)
    lp = vp.vocab_parallel_logprobs(logits, torch.randint(0, 16, (10,)), group=GROUP, chunk_size=4)
    assert _ops(calls) == [(dist.ReduceOp.MAX, GROUP), (dist.ReduceOp.SUM, GROUP)] * 3
    assert all(shape[0] <= 4 and (len(shape) == 1 or shape[1] == 2) for _, _, shape in calls)  # O(1) per token
    calls.clear()
    lp.sum().backward()
    assert calls == [], "backward must not communicate"


def test_entropy_and_kl_communicate_only_max_and_sum(calls):
    s = torch.randn(6, 8, requires_grad=True)
    vp.vocab_parallel_entropy(s, group=GROUP).sum().backward()
    assert _ops(calls) == [(dist.ReduceOp.MAX, GROUP), (dist.ReduceOp.SUM, GROUP)]
    calls.clear()
    vp.vocab_parallel_kl(s, torch.randn(6, 8), kind="jsd", beta=0.3, group=GROUP).sum().backward()
    assert _ops(calls) == [(dist.ReduceOp.MAX, GROUP), (dist.ReduceOp.SUM, GROUP), (dist.ReduceOp.SUM, GROUP)]


def test_fused_path_all_reduces_the_hidden_gradient_once(calls):
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)
    lp = vp.fused_linear_logprobs(h, w, torch.randint(0, 16, (5,)), group=GROUP, chunk_size=2)
    assert _ops(calls) == [(dist.ReduceOp.MAX, GROUP), (dist.ReduceOp.SUM, GROUP)] * 3
    calls.clear()
    lp.sum().backward()
    assert calls == [(dist.ReduceOp.SUM, GROUP, (5, 4))]


def test_group_none_means_no_collective(monkeypatch):
    monkeypatch.setattr(vp.dist, "all_reduce", lambda *a, **k: pytest.fail("no collective expected"))
    logits = torch.randn(3, 7)
    got = vp.vocab_parallel_logprobs(logits, torch.tensor([0, 6, 3]), temperature=2.0)
    torch.testing.assert_close(got, torch.log_softmax(logits / 2.0, -1)[torch.arange(3), torch.tensor([0, 6, 3])])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vp.vocab_parallel_logprobs(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="kind must be"):
        vp.vocab_parallel_kl(torch.randn(2, 4), torch.randn(2, 4), kind="tv")
    with pytest.raises(ValueError, match="same shape"):
        vp.vocab_parallel_kl(torch.randn(2, 4), torch.randn(2, 5))
