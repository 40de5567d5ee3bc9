"""Continuous batching (rollout/continuous.py): the same rollout as the static sampler for the same seed
at TP x PP x CP = (1,1,1), (2,1,1), (1,2,1), (1,1,2), and a deterministic slot scheduler.

The models run in float64: a row's logits in another batch composition (other batch sizes, a prompt
prefilled at once instead of forced token by token) differ from the static sampler's in the last bits,
which at float32 could flip a sampled token where two perturbed logits nearly tie; at float64 such a
difference stays far below the float32 rounding the sampler applies. Tokens and lengths must then be
equal, log-probs (float32) equal to 1e-6.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_gndpo.rollout.continuous import SlotScheduler
from tests import common
from tests.harness import relayout, run_distributed
from tests.trainer_setup import run_config, write_prompts

# 7 prompts of 1..6 tokens over 3 slots: every slot is refilled, some twice
PROMPTS = [[5, 9, 2], [11], [4, 8, 15, 16, 23, 42], [7, 7], [30, 31, 32, 33], [60, 61, 62, 63, 64], [99, 1]]
EOS = [3, 17, 42, 77, 91, 120]  # ~5% of a 128-token vocabulary per draw: responses of 1 to 24 tokens; 42 in a prompt


def _both_samplers(groups):
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.rollout.continuous import generate_continuous
    from megatron_gndpo.rollout.generator import SamplingParams, generate

    cfg = common.model_config(vocab_size=128, num_hidden_layers=2, max_position_embeddings=32)
    params = SamplingParams(temperature=0.9, max_new_tokens=24, eos_token_ids=EOS)
    rows = torch.arange(len(PROMPTS)) + 10
    out = {}
    for tp, pp, cp in ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)):
        groups = relayout(tp, pp, cp=cp)
        model = build_gpt_model(cfg, common.parallel(tp, pp, cp), common.FP32, pre_process=groups.is_first_stage,
                                post_process=groups.is_last_stage).to(torch.float64)
        model.config.params_dtype = torch.float64  # the pipeline's hidden-state messages
        kw = dict(groups=groups, vocab_size=128, seed=7, max_sequence_length=32)
        static = generate(model, PROMPTS, rows, params, **kw)
        out[(tp, pp, cp)] = [static] + [generate_continuous(model, PROMPTS, rows, params, decode_slots=slots, **kw)
                                    for slots in (3, None)]
    # transformer_impl='auto' passes the config check; the engine refuses other core attention before compute
    megatron_attention = dataclasses.replace(common.FP32, local_attention="megatron")
    kw["groups"] = relayout(1, 1)
    model = build_gpt_model(cfg, common.parallel(1, 1), megatron_attention, pre_process=True, post_process=True)
    with pytest.raises(ValueError, match="SDPA core attention"):
        generate_continuous(model, PROMPTS, rows, params, decode_slots=3, **kw)
    with pytest.raises(ValueError, match="does not take images"):
        generate_continuous(model, PROMPTS, rows, params, images=[None] * 6 + [object()], **kw)
    return out


def _train_steps(groups, tmp):
    """One trainer step (DP=2, 8 rows per rank) with the static sampler and with 3 decode slots."""
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.rollout import continuous as engine
    from megatron_gndpo.trainer.trainer import Trainer

    calls = []
    sample = engine.generate_continuous
    metrics = {}
    with mock.patch.object(engine, "generate_continuous",
                           lambda *a, **k: calls.append(k["decode_slots"]) or sample(*a, **k)):
        for continuous in (False, True):
            overrides = [f"trainer.output_dir={tmp}/run_{continuous}", f"rollout.continuous_batching={continuous}"]
            cfg = run_config(Path(tmp), overrides + (["rollout.decode_slots=3"] if continuous else []))
            destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
            trainer = Trainer(cfg)
            metrics[continuous] = trainer.train_step()
            trainer.close(destroy_process_group=False)
    assert calls == [3], calls  # the static step did not call it, the continuous one did, once
    return metrics


def _both_samplers_and_a_step(groups, tmp):
    return _both_samplers(groups), _train_steps(groups, tmp)


@pytest.mark.distributed
def test_continuous_batching_equals_static_sampler_at_every_layout(tmp_path):
    write_prompts(tmp_path / "train.parquet")
    for rank, (samplers, steps) in enumerate(run_distributed(_both_samplers_and_a_step, 2, args=(str(tmp_path),),
                                                             timeout_s=150)):
        # the step samples through rollout.continuous_batching: the same responses, so the same step
        for key in ("response/length_mean", "response/length_min", "reward", "actor/policy_loss", "score/mean"):
            assert steps[True][key] == steps[False][key], (rank, key)
        # context parallelism is off while decoding (each CP rank samples its replica's rows): the same rollout
        # as the same weights without CP (other TP sizes pad the vocabulary otherwise, hence other random weights)
        assert torch.equal(samplers[(1, 1, 2)][0].tokens, samplers[(1, 1, 1)][0].tokens), rank
        for layout, (static, *continuous) in samplers.items():
            lengths = static.response_lengths.tolist()
            assert min(lengths) <= 12 and max(lengths) == 24, lengths  # EOS stops some rows early, not all
            for slots, got in zip((3, None), continuous):
                where = f"layout {layout}, rank {rank}, decode_slots={slots}"
                assert torch.equal(got.tokens, static.tokens), where
                assert torch.equal(got.prompt_lengths, static.prompt_lengths), where
                assert torch.equal(got.response_lengths, static.response_lengths), where
                assert torch.equal(got.truncated, static.truncated), where
                if static.logprobs is None:
                    assert got.logprobs is None, where
                else:
                    torch.testing.assert_close(got.logprobs, static.logprobs, rtol=0, atol=1e-6, msg=where)


def test_config_refuses_what_continuous_batching_does_not_serve():
    from megatron_gndpo.config import load_config

    cfg = load_config(None, ["rollout.continuous_batching=true", "rollout.decode_slots=4"])
    assert cfg.rollout.continuous_batching and cfg.rollout.decode_slots == 4
    with pytest.raises(ValueError, match="applies to rollout.continuous_batching=true only"):
        load_config(None, ["rollout.decode_slots=4"])
    with pytest.raises(ValueError, match="decode_slots must be >= 1"):
        load_config(None, ["rollout.continuous_batching=true", "rollout.decode_slots=0"])
    with pytest.raises(ValueError, match="local_attention='megatron'"):
        load_config(None, ["rollout.continuous_batching=true", "precision.local_attention=megatron"])
    with pytest.raises(ValueError, match="does not take images"):
        load_config(None, ["rollout.continuous_batching=true", "data.images=process"])


def test_slot_scheduler_admits_each_prompt_once_in_order():
    sched = SlotScheduler(num_prompts=5)
    assert sched.admit([2, 0, 1]) == [(0, 0), (1, 1), (2, 2)]
    assert sched.admit([]) == []
    assert sched.admit([2, 1]) == [(1, 3), (2, 4)]  # lowest free slot first, prompts in order
    assert sched.pending == 0 and sched.admit([0, 1, 2]) == []
    again = SlotScheduler(num_prompts=5)  # deterministic: the same calls, the same admissions
    assert [again.admit(f) for f in ([0, 1, 2], [], [1, 2])] == [[(0, 0), (1, 1), (2, 2)], [], [(1, 3), (2, 4)]]
