"""The embedded rollout engine: KV-cached decoding equals full recomputation at every TP x PP layout,
and the sampler's top-k / top-p / noise behave as specified."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.rollout.sampling import counter_uniform, vocab_parallel_sample
from tests import common
from tests.harness import relayout, run_distributed

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]]
EOS = 7  # also inside prompt 1: a prompt token must not end the response


def _greedy_both_ways(groups):
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.rollout.generator import SamplingParams, generate
    from megatron_gndpo.trainer.megatron_glue import run_schedule

    cfg = common.model_config(vocab_size=100, num_hidden_layers=2, max_position_embeddings=32)
    out = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        groups = relayout(tp, pp)
        model = build_gpt_model(cfg, common.parallel(tp, pp), common.FP32, pre_process=groups.is_first_stage,
                                post_process=groups.is_last_stage)
        cached = generate(model, PROMPTS, torch.arange(3), SamplingParams(temperature=0.0, max_new_tokens=6,
                                                                          eos_token_ids=[EOS]),
                          groups=groups, vocab_size=100, seed=0, max_sequence_length=32)
        recomputed = []
        for p in PROMPTS:
            t = torch.tensor([p])
            for _ in range(6):
                got = run_schedule(model, [common.microbatch(t)], forward_only=True, collect_fn=lambda lg, mb: {
                    "nxt": vocab_parallel_sample(lg[:, -1], rows=torch.zeros(1), position=torch.zeros(1), seed=0,
                                                 group=groups.tp, temperature=0.0, vocab_size=100)})
                nxt = got[0]["nxt"] if got else torch.zeros(1, dtype=torch.long)
                if groups.pp_size > 1:
                    dist.broadcast(nxt, src=dist.get_global_rank(groups.pp, groups.pp_size - 1), group=groups.pp)
                t = torch.cat([t, nxt[:, None]], 1)
                if nxt.item() == EOS:
                    break
            recomputed.append(t[0].tolist())
        out[(tp, pp)] = (cached.responses(), [r[len(p):] for r, p in zip(recomputed, PROMPTS)],
                         cached.truncated.tolist())
    return out


@pytest.mark.distributed
def test_kv_cached_greedy_equals_recomputation_at_every_layout():
    for rank_out in run_distributed(_greedy_both_ways, 4, timeout_s=240):
        for layout, (cached, recomputed, truncated) in rank_out.items():
            assert cached == recomputed, layout
            for resp, trunc in zip(cached, truncated):
                assert (resp[-1] != EOS) == trunc and len(resp) <= 6, layout


def test_counter_noise_is_uniform_and_keyed():
    u = counter_uniform(3, torch.arange(64), torch.full((64,), 5), torch.arange(1000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert torch.equal(u, counter_uniform(3, torch.arange(64), torch.full((64,), 5), torch.arange(1000)))
    assert not torch.equal(u, counter_uniform(4, torch.arange(64), torch.full((64,), 5), torch.arange(1000)))
    # a shard's noise is the slice of the full vocabulary's noise: the same sample at every TP
    assert torch.equal(u[:, 500:], counter_uniform(3, torch.arange(64), torch.full((64,), 5), torch.arange(500, 1000)))


def _draws(logits, n=4000, **kw):
    rows = torch.arange(n)
    return vocab_parallel_sample(logits.expand(n, -1), rows=rows, position=torch.zeros(n), seed=1, **kw)


def test_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    full = torch.bincount(_draws(logits), minlength=5).float() / 4000
    torch.testing.assert_close(full, torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]), atol=0.03, rtol=0)
    assert set(_draws(logits, top_k=2).tolist()) == {0, 1}
    assert set(_draws(logits, top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.25 is the smallest set >= 0.7
    assert set(_draws(logits, top_p=0.74).tolist()) == {0, 1}
    assert set(_draws(logits, top_p=0.76).tolist()) == {0, 1, 2}
    assert set(_draws(logits, temperature=0.0).tolist()) == {0}
    assert set(_draws(logits, vocab_size=3).tolist()) <= {0, 1, 2}
