"""The vocab-parallel ops' public helpers, ``inplace``, the padding, and what the log-prob op allocates."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.tensor_memory import TensorBytes
from megatron_gndpo.ops import (
    mask_padded_vocab,
    real_vocab_columns,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_softmax,
)
from megatron_gndpo.ops import vocab_parallel as vp


def test_real_vocab_columns_and_the_padding_mask():
    assert real_vocab_columns(0, 256, None) == 256
    assert real_vocab_columns(512, 256, 1000) == 256  # all real
    assert real_vocab_columns(768, 256, 1000) == 232  # padding from id 1000
    assert real_vocab_columns(1024, 256, 1000) == 0  # a shard of padding only
    x = torch.randn(3, 8)
    assert mask_padded_vocab(x, 8, 16) is x  # no padding: no copy
    masked = mask_padded_vocab(x, 8, 13)
    assert torch.equal(masked[:, :5], x[:, :5]) and torch.isinf(masked[:, 5:]).all()
    assert torch.isfinite(x).all(), "the input is never modified"
    assert torch.equal(mask_padded_vocab(x, 8, 4, value=-7.0), torch.full_like(x, -7.0))


def test_vocab_parallel_softmax_matches_torch_and_ignores_masked_entries():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30 + 100
    x[:, 40:] = float("-inf")
    # atol: float32's smallest normal; below it the subnormals carry fewer digits
    torch.testing.assert_close(vocab_parallel_softmax(x), torch.softmax(x.double(), -1).float(), rtol=1e-6,
                               atol=torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inplace_gives_the_same_numbers_in_the_logits_storage(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 300, generator=g) * 5
    target = torch.randint(0, 290, (2, 5), generator=g)
    up = torch.randn(2, 5, generator=g)
    kw = dict(temperature=temperature, vocab_size=290, chunk_size=3)
    x = logits.clone().requires_grad_(True)
    (vocab_parallel_logprobs(x, target, **kw) * up).sum().backward()

    y = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(y, target, inplace=True, **kw)
    assert not torch.equal(y.detach(), logits), "inplace=True overwrites the logits"
    grad, = torch.autograd.grad((lp * up).sum(), y)
    assert grad.data_ptr() == y.data_ptr(), "the gradient lives in the logits' storage"
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)

    z = logits.bfloat16().requires_grad_(True)
    kept = z.detach().clone()
    vocab_parallel_logprobs(z, target, inplace=True, **kw).sum().backward()
    assert torch.equal(z.detach(), kept), "bf16 logits are never overwritten (their exp needs float32)"


def test_ids_in_the_padding_get_log_prob_neg_and_no_gradient():
    x = torch.randn(3, 16, requires_grad=True)
    target = torch.tensor([2, 14, 15])
    lp = vocab_parallel_logprobs(x, target, vocab_size=14)
    torch.testing.assert_close(lp[0].double(), F.log_softmax(x[0, :14].double(), -1)[2])
    assert (lp[1:] == vp._NEG).all()
    lp.sum().backward()
    assert torch.equal(x.grad[1:], torch.zeros(2, 16)) and (x.grad[:, 14:] == 0).all()


@pytest.mark.parametrize("dtype,grad,inplace,bound", [
    (torch.float32, True, False, 1.0),  # the gradient, nothing else: exp(y) is written where it will be
    (torch.float32, True, True, 0.0),  # the gradient over the logits: nothing
    (torch.float32, False, False, 0.25),  # no gradient: one chunk
    (torch.bfloat16, True, False, 0.5 + 0.25),  # the bf16 gradient and one float32 chunk
])
def test_logprobs_allocate_the_gradient_and_at_most_one_chunk(dtype, grad, inplace, bound):
    """Peak bytes of tensors made by forward + backward, in units of one float32 ``[N, V]``; per-token
    statistics and ``[N, K]`` tensors are the rest (under 1% here). The op used to add three float32
    chunks to the gradient, or two without one."""
    n, v = 64, 4096
    x = torch.randn(n, v).to(dtype).requires_grad_(grad)
    target = torch.randint(0, v, (n,))
    with TensorBytes() as mem:
        lp = vocab_parallel_logprobs(x, target, chunk_size=n // 4, inplace=inplace)
        if grad:
            torch.autograd.grad(lp.sum(), x)
    assert mem.peak / (n * v * 4) <= bound + 0.01


def test_a_second_backward_through_the_kept_buffer_is_refused():
    """The float32 buffer became the gradient in the first backward: autograd's version check stops a
    second one (retain_graph=True) instead of it reading the gradient as exp(y)."""
    x = torch.randn(4, 32, requires_grad=True)
    lp = vocab_parallel_logprobs(x, torch.tensor([0, 5, 9, 31]))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def test_ops_on_a_shard_of_padding_only(monkeypatch):
    """Rank 1 of 2 whose whole shard lies beyond ``vocab_size`` (a fake group: reductions are
    identities): no crash, and a gradient of exactly 0."""
    monkeypatch.setattr(vp.dist, "all_reduce", lambda t, op=None, group=None: None)
    monkeypatch.setattr(vp.dist, "all_gather", lambda out, t, group=None: [o.copy_(t) for o in out])
    monkeypatch.setattr(vp.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(vp.dist, "get_rank", lambda group=None: 1)
    s = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8)
    kw = dict(group=object(), vocab_size=6, chunk_size=2)
    outs = [vocab_parallel_logprobs(s, torch.tensor([0, 3, 9, 12, 5]), **kw), vocab_parallel_entropy(s, **kw),
            vocab_parallel_kl(s, t, **kw), vocab_parallel_kl(s, t, top_k=3, **kw)]
    for out in outs:
        grad, = torch.autograd.grad(out.nansum(), s)
        assert torch.equal(grad, torch.zeros_like(s))


def test_topk_kl_keeps_leading_dimensions():
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    got = vocab_parallel_kl(s, t, top_k=5)
    want = vocab_parallel_kl(s.reshape(6, 40), t.reshape(6, 40), top_k=5).reshape(2, 3)
    assert got.shape == (2, 3) and torch.equal(got, want)
