"""HF <-> megatron weight mapping against transformers' own models (random weights, nothing downloaded)."""

import pytest
import torch

from megatron_gndpo.checkpoint.hf_mapping import global_to_hf, hf_to_global, model_config_from_hf
from tests import common
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

SIZES = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# Llama-3.2's scaling; Llama-3's rope_theta puts the 16-wide heads' frequencies in all three llama3 bands
# (wavelength < 2048 kept, 2048..8192 smoothed, > 8192 divided by the factor)
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
LINEAR = {"rope_type": "linear", "factor": 4.0}


def _hf_model(family, tied, rope_scaling=None, qk_scale=1.0):
    """A random transformers model; ``qk_scale`` multiplies the query and key projections so that
    attention is sharp enough for the positions (RoPE) to move the logits well beyond the tolerance."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    extra = {"head_dim": 24} if family == "qwen3" else {}
    if rope_scaling is not None:
        extra.update(rope_scaling=rope_scaling, rope_theta=500000.0, max_position_embeddings=131072)
    torch.manual_seed(0)
    model = cls[1](cls[0](**{**SIZES, **extra}, tie_word_embeddings=tied)).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so the mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(qk_scale)
    return model


def _megatron_logits(groups, toks, *model_args):
    from megatron_gndpo.models.provider import build_gpt_model

    hf = _hf_model(*model_args)
    cfg = model_config_from_hf(hf.config)
    out = {}
    for tp in (1, 2):
        groups = relayout(tp)
        model = build_gpt_model(cfg, common.parallel(tp), common.FP32, pre_process=True, post_process=True)
        from megatron_gndpo.models.weights import gather_global_weights, load_global_weights

        load_global_weights(model, hf_to_global(hf.state_dict(), cfg, cfg.padded_vocab_size(tp)))
        with torch.no_grad():
            shard = model(toks, common.microbatch(toks)["position_ids"], None)
        out[tp] = (common.gather_vocab(shard, groups, cfg.vocab_size), global_to_hf(gather_global_weights(model), cfg))
    return out


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_megatron_logits_match_transformers_and_round_trip_is_exact(family, tied):
    toks = common.tokens(2, 12)
    hf = _hf_model(family, tied)
    with torch.no_grad():
        ref = hf(toks).logits
    ref_sd = hf.state_dict()
    for rank, per_tp in enumerate(run_distributed(_megatron_logits, 2, args=(toks, family, tied))):
        for tp, (logits, back) in per_tp.items():
            diff = (logits - ref).abs().max().item()
            assert diff < 1e-4, f"{family} tied={tied} rank {rank} TP={tp}: max |logits - transformers| = {diff}"
            expected = {k for k in ref_sd if not (tied and k == "lm_head.weight")}
            assert set(back) == expected, f"{family}: keys differ: {set(back) ^ expected}"
            for k in expected:
                assert torch.equal(back[k], ref_sd[k]), f"{family} TP={tp}: {k} not bit-exact after the round trip"


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR], ids=lambda r: r["rope_type"])
def test_rope_scaling_logits_match_transformers(rope):
    """Llama-3.x and linear RoPE scaling: megatron's logits equal transformers' at TP 1 and 2 over 64
    positions. The same model without the scaling is checked to be far off, so a mapping that dropped
    it (as the converter once did) fails here."""
    toks = common.tokens(2, 64)
    with torch.no_grad():
        ref = _hf_model("llama", False, rope, 30.0)(toks).logits
        unscaled = _hf_model("llama", False, {"rope_type": "default"}, 30.0)(toks).logits
    assert (ref - unscaled).abs().max().item() > 1e-2
    for rank, per_tp in enumerate(run_distributed(_megatron_logits, 2, args=(toks, "llama", False, rope, 30.0))):
        for tp, (logits, _) in per_tp.items():
            diff = (logits - ref).abs().max().item()
            assert diff < 1e-4, f"{rope['rope_type']} rank {rank} TP={tp}: max |logits - transformers| = {diff}"
