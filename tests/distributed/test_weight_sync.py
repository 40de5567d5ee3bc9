"""Rollout weight sync: TP-gathered, bucketed HF tensors equal the exported checkpoint's, at TP=2 x PP=2."""

from __future__ import annotations

import math

import pytest
import torch

from tests import common
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
BUCKET = 160 * 1024  # bytes: several buckets, several tensors per bucket, for this model


def _sync(groups, tied):
    import torch.distributed as dist

    from megatron_gndpo.checkpoint.hf_mapping import global_to_hf
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.weights import gather_global_weights
    from megatron_gndpo.rollout import weight_sync

    cfg = common.model_config(num_key_value_heads=2, qk_layernorm=True, attention_bias=True, tie_word_embeddings=tied)
    model = build_gpt_model(cfg, common.parallel(2, 2), common.FP32, pre_process=groups.is_first_stage,
                            post_process=groups.is_last_stage)
    reference = global_to_hf(gather_global_weights(model), cfg)  # independent path: main replicas + all-reduce

    gathers = []
    real_all_gather = dist.all_gather
    weight_sync.dist.all_gather = lambda *a, **k: (gathers.append(1), real_all_gather(*a, **k))[1]
    sync = weight_sync.WeightSync(model, cfg, groups, bucket_bytes=BUCKET)
    whole = list(sync.hf_buckets(across_pipeline=True))
    stage_gathers = len(gathers)
    own = list(sync.hf_buckets())
    weight_sync.dist.all_gather = real_all_gather
    sharded = sum(1 for p in sync._pieces if not p.replicated)
    stage_bytes = sum(p.local.numel() * p.local.element_size() * (1 if p.replicated else 2) for p in sync._pieces)
    return {"reference": reference, "whole": whole, "own": [n for b in own for n, _ in b], "sharded": sharded,
            "gathers": stage_gathers, "max_gathers": math.ceil(stage_bytes / BUCKET) + 1,
            "stage": groups.pp_rank}


@pytest.mark.parametrize("tied", [False, True])
def test_weight_sync_matches_exported_checkpoint(tied):
    results = run_distributed(_sync, 4, tp=2, pp=2, args=(tied,))
    reference = results[0]["reference"]
    layers_of_stage = {0: {0, 1}, 1: {2, 3}}
    for r in results:
        names = [n for bucket in r["whole"] for n, _ in bucket]
        assert len(names) == len(set(names)), "a tensor was sent twice"
        assert set(names) == set(reference)
        for bucket in r["whole"]:
            for name, t in bucket:
                assert torch.equal(t, reference[name]), name
        # bucketed: far fewer all-gathers than sharded tensors, about one per bucket of bytes
        assert r["gathers"] <= r["max_gathers"] < r["sharded"]
        # without across_pipeline a rank sees its own stage only
        own_layers = {int(n.split(".")[2]) for n in r["own"] if n.startswith("model.layers.")}
        assert own_layers == layers_of_stage[r["stage"]]
        assert ("model.embed_tokens.weight" in r["own"]) == (r["stage"] == 0)
        assert ("model.norm.weight" in r["own"]) == (r["stage"] == 1)
        assert ("lm_head.weight" in r["own"]) == (r["stage"] == 1 and not tied)
        assert len(r["whole"]) > 2
