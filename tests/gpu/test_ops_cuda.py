"""The vocab-parallel ops on CUDA against the same ops on CPU (the CPU tests pin the math)."""

import pytest
import torch

from megatron_gndpo.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprobs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_cuda_match_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 4096, generator=g).to(dtype), torch.randn(64, 4096, generator=g).to(dtype)
    y = torch.randint(0, 4000, (64,), generator=g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for fn in (lambda a: vocab_parallel_logprobs(a, y.to(a.device), vocab_size=4000, temperature=0.8),
               lambda a: vocab_parallel_entropy(a, vocab_size=4000),
               lambda a: vocab_parallel_kl(a, t.to(a.device), kind="reverse", vocab_size=4000)):
        cpu = s.clone().requires_grad_(True)
        gpu = s.cuda().requires_grad_(True)
        fn(cpu).sum().backward()
        fn(gpu).sum().backward()
        torch.testing.assert_close(fn(gpu.detach()).cpu(), fn(cpu.detach()), **tol)
        torch.testing.assert_close(gpu.grad.cpu().float(), cpu.grad.float(), **tol)
