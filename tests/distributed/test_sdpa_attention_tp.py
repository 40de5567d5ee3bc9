"""SDPAttention at TP=2: the rank's heads only, GQA with fewer KV groups than ranks included."""

import pytest
import torch

from megatron_gndpo.models.provider import build_transformer_config
from tests import common
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def _gpt(cfg, attention, seed):
    from megatron.core.models.gpt import GPTModel

    from megatron_gndpo.models.attention import local_layer_spec

    torch.manual_seed(seed)
    return GPTModel(
        config=build_transformer_config(cfg, common.parallel(2), common.FP32),
        transformer_layer_spec=local_layer_spec(cfg.qk_layernorm, attention),
        vocab_size=cfg.padded_vocab_size(2), max_sequence_length=cfg.max_position_embeddings,
        parallel_output=True, position_embedding_type="rope", rotary_base=cfg.rope_theta,
    ).eval()


@torch.no_grad()
def _sdpa_vs_megatron(groups):
    """Per KV-group count: max |logit difference| of the full forward and of KV-cached single-token steps."""
    from megatron.core.inference.contexts import StaticInferenceContext

    toks = common.tokens(2, 12)
    pos = common.microbatch(toks)["position_ids"]
    out = {}
    for kv_heads in (2, 1):  # 1 group over 2 ranks: megatron hands each rank a copy of it
        cfg = common.model_config(num_hidden_layers=2, num_key_value_heads=kv_heads)
        reference = _gpt(cfg, "megatron", seed=0)
        sdpa = _gpt(cfg, "sdpa", seed=1)
        sdpa.load_state_dict(reference.state_dict())
        full = sdpa(toks, pos, None)
        forward_err = (full - reference(toks, pos, None)).abs().max().item()
        full = common.gather_vocab(full, groups, cfg.vocab_size)
        context, decode_err = StaticInferenceContext(2, 12), 0.0
        for start, size in ((0, 5), *((t, 1) for t in range(5, 12))):
            last = sdpa(toks[:, start:start + size], pos[:, start:start + size], None,
                        inference_context=context, runtime_gather_output=True)[:, -1, :cfg.vocab_size]
            context.sequence_len_offset += size
            decode_err = max(decode_err, (last - full[:, start + size - 1]).abs().max().item())
        out[kv_heads] = forward_err, decode_err
    return out


def test_sdpa_matches_megatron_attention_at_tp2():
    for rank, per_kv in enumerate(run_distributed(_sdpa_vs_megatron, 2, tp=2)):
        for kv_heads, (forward_err, decode_err) in per_kv.items():
            assert forward_err < 1e-5, f"rank {rank}, {kv_heads} KV groups: forward differs by {forward_err}"
            assert decode_err < 1e-5, f"rank {rank}, {kv_heads} KV groups: KV-cached decode differs by {decode_err}"
