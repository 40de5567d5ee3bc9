"""The sampler's fused noise kernel (``torch.compile`` of ``sampling._gumbel_max``) gives the eager
numbers: the hash bits, every perturbed logit, the shard's (max, argmax) and the sampled ids, pinned
against values of the eager code from before the fusion; its shards combine to the unsharded sample;
new shapes and seeds reuse one kernel; ``MEGATRON_GNDPO_COMPILE=0`` and a failing compiler fall back."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_gndpo.rollout import sampling

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (B, V_local): a single row (specialised by the compiler), widths that are not multiples of a SIMD
# width, the 0.5B model's vocabulary split 16 ways and 64 rows of 8192
SHAPES = [(1, 1000), (5, 4097), (64, 8192), (33, 1000), (2, 8191), (16, 9496), (3, 1536)]
KEYS = [sampling._seed_key(s) for s in (0, 1, 2026, 2**62 + 12345)] + [-(2**63), 2**63 - 1]


@pytest.fixture
def fused(monkeypatch):
    """Every vocabulary size takes the compiled path, and falling back to eager fails the test."""
    monkeypatch.setattr(sampling, "_FUSE_MIN_VOCAB", 0)
    monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the sampler failed")
        yield
    assert sampling._fused not in (None, False)


def _case(b, v, device, gen):
    """Random logits ``[b, v]``, row / position keys and the ids of a shard at a random offset."""
    x = (torch.randn(b, v, generator=gen) * 3).to(device)
    rows = torch.randint(0, 1 << 40, (b,), generator=gen).to(device)
    position = torch.randint(0, 1 << 16, (b,), generator=gen).to(device)
    start = int(torch.randint(0, 1 << 18, (1,), generator=gen))
    return x, rows, position, torch.arange(start, start + v, device=device)


def _hash_and_perturbed(x, key, rows, position, ids):
    return sampling._hash_uniform(key, rows, position, ids), sampling._perturbed(x, key, rows, position, ids)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_hash_and_perturbed_logits_equal_eager_everywhere(device):
    """Every entry, not only the max. The hash bits: int64 products wrap and ``_shr`` shifts logically
    in the C++ / Triton kernels as in eager, also with rows, positions and ids near 2**63 (every
    product overflows). Every float32 ``x + G``: float64 log differs in the last bit between eager CPU
    (MKL) and compiled CPU (Sleef) in a few % of the entries, which must not reach float32."""
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(_hash_and_perturbed, dynamic=True)  # one compile for both: ~15 s cold on 2 cores
    for (b, v), key in zip(SHAPES[1:], KEYS):  # B == 1 costs a second compile; the fused kernel's test has it
        x, rows, position, ids = _case(b, v, device, gen)
        for r, p, i in ((rows, position, ids), (rows + 2**62, position - 2**62, ids + (2**63 - 2**20))):
            (u_c, y_c), (u_e, y_e) = compiled(x, key, r, p, i), _hash_and_perturbed(x, key, r, p, i)
            assert torch.equal(u_c, u_e), (b, v, key)
            assert torch.equal(y_c, y_e), (b, v, key, int((y_c != y_e).sum()))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_max_and_argmax_equal_eager(device, fused):
    """Bit-identical (max, argmax), with the masks the sampler makes: a vocabulary padding tail, a row
    with every entry masked (a shard past the vocabulary: -inf at index 0), top-k-like sparse rows,
    and exact ties (huge logits swamp the noise: the first index wins, as in eager)."""
    gen = torch.Generator().manual_seed(2)
    for (b, v), key in zip(SHAPES, KEYS):
        x, rows, position, ids = _case(b, v, device, gen)
        masked = x.clone()
        masked[:, v - 37:] = float("-inf")
        masked[0] = float("-inf")
        sparse = x.masked_fill(torch.rand(b, v, generator=gen).to(device) > 0.01, float("-inf"))
        tied = torch.full_like(x, 1e9)
        for logits in (x, x / 0.3, masked, sparse, tied):
            got = sampling.gumbel_max(logits, key, rows, position, ids)
            want = sampling._gumbel_max(logits, key, rows, position, ids)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (b, v, key)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sample_equals_eager_sample(device, fused, monkeypatch):
    """``vocab_parallel_sample`` end to end: temperatures, top-k, top-p, a padded vocabulary."""
    gen = torch.Generator().manual_seed(3)
    settings = [{"temperature": 1.0}, {"temperature": 0.6, "top_k": 20}, {"temperature": 1.7, "top_p": 0.9},
                {"temperature": 1.0, "top_k": 50, "top_p": 0.8}, {"temperature": 0.8, "pad": 37}]
    for (b, v), kw in zip(SHAPES, settings + settings):
        x, rows, position, _ = _case(b, v, device, gen)
        kw = dict(kw)
        pad = kw.pop("pad", 0)
        sample = dict(rows=rows, position=position, seed=7, vocab_size=v - pad if pad else None, **kw)
        monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", "1")
        got = sampling.vocab_parallel_sample(x, **sample)
        monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", "0")
        want = sampling.vocab_parallel_sample(x, **sample)
        assert torch.equal(got, want), (b, v, kw)
        assert int(got.max()) < v - pad


@pytest.mark.parametrize("device", DEVICES)
def test_fused_shards_combine_to_the_unsharded_sample(device, fused):
    """TP layouts without processes: per shard the fused (max, argmax), then the two MAX reductions of
    ``vocab_parallel_sample``; the value of an entry must not depend on the shard's width or offset."""
    gen = torch.Generator().manual_seed(4)
    b, v = 12, 8192
    x, rows, position, _ = _case(b, v, device, gen)
    key = sampling._seed_key(11)
    full_best, full_idx = sampling.gumbel_max(x, key, rows, position, torch.arange(v, device=device))
    for tp in (2, 4, 8):
        w = v // tp
        shards = [sampling.gumbel_max(x[:, s * w:(s + 1) * w].contiguous(), key, rows, position,
                                      torch.arange(s * w, (s + 1) * w, device=device)) for s in range(tp)]
        best = torch.stack([s[0] for s in shards])
        global_best = best.max(dim=0).values
        idx = torch.stack([torch.where(s[0] == global_best, s[1] + i * w, -1) for i, s in enumerate(shards)])
        assert torch.equal(global_best, full_best) and torch.equal(idx.max(dim=0).values, full_idx), tp


def _golden_logits(b, v, device):
    """Exact float32 logits in [0, 10) that need no random generator."""
    r, c = torch.arange(b)[:, None], torch.arange(v)[None, :]
    return (((c * 7919 + r * 104729) % 1000).float() / 100).to(device)


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("device", DEVICES)
def test_samples_pinned_to_the_eager_code_before_fusion(device, compiled, monkeypatch):
    """Ids and max values that the eager sampler gave before the fusion, on CPU and CUDA alike."""
    monkeypatch.setattr(sampling, "_FUSE_MIN_VOCAB", 0)
    monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", compiled)
    x = _golden_logits(4, 12000, device)
    rows = torch.tensor([0, 1, 17, 123456789], device=device)
    position = torch.tensor([5, 6, 7, 4095], device=device)
    pinned = [({"temperature": 0.8}, [1347, 10516, 5019, 8880]),
              ({"temperature": 2.5, "vocab_size": 11000}, [4871, 6851, 3913, 4957]),
              ({"temperature": 1.3, "top_k": 50}, [2284, 11651, 2302, 348])]
    for kw, ids in pinned:
        assert sampling.vocab_parallel_sample(x, rows=rows, position=position, seed=2026, **kw).tolist() == ids, kw
    best_hex = {0.8: ["0x1.35bb04p+4", "0x1.2f12d6p+4", "0x1.2702c2p+4", "0x1.369b10p+4"],
                2.5: ["0x1.7ec7ccp+3", "0x1.65603cp+3", "0x1.7cc5e0p+3", "0x1.8449b0p+3"]}
    for t, want in best_hex.items():
        # x / t on the CPU: CUDA divides by a scalar as a product with its reciprocal, an ulp off at times
        scaled = (_golden_logits(4, 12000, "cpu") / t).to(device)
        best, _ = sampling.gumbel_max(scaled, sampling._seed_key(2026), rows, position,
                                      torch.arange(12000, device=device))
        assert [float(v).hex() for v in best.cpu()] == [float.fromhex(h).hex() for h in want], t


def test_new_batch_sizes_widths_and_seeds_reuse_the_kernel():
    gen = torch.Generator().manual_seed(5)
    fn = sampling._fused_gumbel_max()
    x, rows, position, ids = _case(3, 1000, "cpu", gen)
    fn(x, KEYS[0], rows, position, ids)
    with torch.compiler.set_stance("fail_on_recompile"):
        for (b, v), key in [((7, 3001), KEYS[1]), ((64, 8192), KEYS[4]), ((2, 1000), KEYS[5]), ((40, 5000), 0)]:
            x, rows, position, ids = _case(b, v, "cpu", gen)
            fn(x, key, rows, position, ids)


def test_env_switch_and_a_failed_compile_run_eager(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x, rows, position, ids = _case(4, 1000, "cpu", gen)
    want = sampling._gumbel_max(x, KEYS[2], rows, position, ids)

    def must_not_compile():
        raise AssertionError("MEGATRON_GNDPO_COMPILE=0 must not compile")

    monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", "0")
    monkeypatch.setattr(sampling, "_fused_gumbel_max", must_not_compile)
    got = sampling.gumbel_max(x, KEYS[2], rows, position, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    calls = []

    def broken_kernel(*args):
        calls.append(1)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setenv("MEGATRON_GNDPO_COMPILE", "1")
    monkeypatch.setattr(sampling, "_fused_gumbel_max", lambda: broken_kernel)
    monkeypatch.setattr(sampling, "_fused", None)
    with pytest.warns(UserWarning, match="sampling eagerly from now on"):
        got = sampling.gumbel_max(x, KEYS[2], rows, position, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert sampling._fused is False
    sampling.gumbel_max(x, KEYS[2], rows, position, ids)
    assert len(calls) == 1  # not tried again


def test_nothing_compiles_at_import_and_a_missing_compiler_falls_back(tmp_path):
    """A fresh process: importing compiles nothing; the first use tries, and with no C++ compiler
    (and an empty inductor cache, so nothing compiled before is reused) it warns and samples eagerly."""
    script = """
import warnings, torch
from megatron_gndpo.rollout import sampling
assert sampling._fused is None
x, rows, pos, ids = torch.randn(3, 2000), torch.arange(3), torch.full((3,), 9), torch.arange(2000)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = sampling.gumbel_max(x, 5, rows, pos, ids)
assert any("sampling eagerly" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert sampling._fused is False
want = sampling._gumbel_max(x, 5, rows, pos, ids)
assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               MEGATRON_GNDPO_COMPILE="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
