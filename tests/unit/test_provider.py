import pytest
import torch

from megatron_gndpo.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_gndpo.models import provider


def test_transformer_config_carries_the_model_fields():
    model = ModelConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        intermediate_size=96, qk_layernorm=True, attention_bias=True, rms_norm_eps=1e-5)
    cfg = provider.build_transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"))
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (2, 32, 96)
    assert cfg.qk_layernorm and cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.gated_linear_unit
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fall-back")
def test_layer_spec_choice_without_transformer_engine():
    assert not provider.use_transformer_engine(PrecisionConfig(transformer_impl="auto"))
    with pytest.raises(ValueError, match="needs Transformer Engine on a CUDA device: .*not installed"):
        provider.use_transformer_engine(PrecisionConfig(transformer_impl="transformer_engine"))
    with pytest.raises(ValueError, match="precision.fp8 needs"):
        provider.use_transformer_engine(PrecisionConfig(fp8="hybrid"))
    with pytest.raises(ValueError, match="precision.fp8 needs precision.transformer_impl"):
        PrecisionConfig(fp8="e4m3", transformer_impl="local")


def test_fp8_settings_reach_megatron_and_a_bf16_teacher_can_pair_with_them():
    model = ModelConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96)
    fp8 = PrecisionConfig(params_dtype="bfloat16", transformer_impl="transformer_engine", fp8="hybrid",
                          fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    cfg = provider.build_transformer_config(model, ParallelConfig(), fp8)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == \
        ("hybrid", "delayed", 16, "most_recent")
    plain = provider.build_transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"))
    assert plain.fp8 is None


def test_vllm_engine_is_refused_with_the_reason():
    from megatron_gndpo.config.schema import RolloutConfig

    with pytest.raises(ValueError, match="rollout.engine='vllm' is not available.*use rollout.engine='megatron'"):
        RolloutConfig(engine="vllm")
