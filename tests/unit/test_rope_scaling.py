"""RoPE scaling and the HF config audit: what the converter maps (HF config.json -> ModelConfig ->
config.json), what it refuses, and that megatron's rotary angles are transformers' (single process;
the logits are compared in tests/distributed/test_hf_mapping.py)."""

import json

import pytest
import torch

from megatron_gndpo.checkpoint.hf_mapping import (HF_INERT_FIELDS, HF_REQUIRED_VALUES, hf_config_from_model,
                                                  model_config_from_hf)
from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.models.provider import rope_kwargs

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# config.json files as published (written by transformers 4.x: rope_scaling beside rope_theta)
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA3, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True,
    "vocab_size": 128256}
QWEN2_5 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
# a Qwen2 checkpoint carrying "use_mrope": false (DeepSeek-R1-Distill-Qwen) and a linear-scaled Llama
R1_DISTILL = {**QWEN2_5, "use_mrope": False, "sliding_window": 4096, "rope_theta": 10000}
LLAMA_LINEAR = {**LLAMA_3_2_1B, "rope_scaling": {"rope_type": "linear", "factor": 2.5}, "pretraining_tp": 2}


def _load(path, fields):
    """What the converter sees: ``fields`` written as config.json and read back by AutoConfig."""
    from transformers import AutoConfig

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def test_llama_3_2_rope_scaling_is_mapped(tmp_path):
    cfg = model_config_from_hf(_load(tmp_path, LLAMA_3_2_1B))
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (500000.0, "llama3", 32.0)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.rms_norm_eps) == (64, 8, True, 1e-5)
    assert rope_kwargs(cfg) == dict(position_embedding_type="rope", rotary_base=500000.0, rope_scaling=True,
                                    rope_scaling_factor=32.0)
    linear = model_config_from_hf(_load(tmp_path / "linear", LLAMA_LINEAR))
    assert (linear.rope_scaling, linear.rope_scaling_factor) == ("linear", 2.5)
    assert rope_kwargs(linear)["seq_len_interpolation_factor"] == 2.5
    assert "rope_scaling" not in rope_kwargs(model_config_from_hf(_load(tmp_path / "q", QWEN3)))


@pytest.mark.parametrize("family,fields", [("llama", LLAMA_3_2_1B), ("llama", LLAMA_LINEAR), ("qwen2", QWEN2_5),
                                           ("qwen2", R1_DISTILL), ("qwen3", QWEN3)])
def test_export_round_trips_every_field_that_changes_the_math(tmp_path, family, fields):
    """HF config.json -> ModelConfig -> config.json: every field that is not inert comes back equal
    (a field the export leaves out must be at the only value the import accepts)."""
    from transformers import AutoConfig

    original = _load(tmp_path / "in", fields)
    cfg = model_config_from_hf(original)
    hf_config_from_model(cfg, family, "bfloat16").save_pretrained(str(tmp_path / "out"))
    back = AutoConfig.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert model_config_from_hf(back) == cfg
    assert back.rope_parameters == original.rope_parameters
    for key, value in original.to_diff_dict().items():
        if key not in HF_INERT_FIELDS:
            assert getattr(back, key, HF_REQUIRED_VALUES.get(key)) == value, key


def _refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(_load(tmp_path, fields))


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, "rope_type='yarn'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
      "original_max_position_embeddings": 4096}, "rope_type='longrope'"),
    ({**LLAMA3, "low_freq_factor": 2.0}, "low_freq_factor=2.0 is not supported"),
    ({**LLAMA3, "high_freq_factor": 8.0}, "high_freq_factor=8.0"),
    ({**LLAMA3, "original_max_position_embeddings": 4096}, "original_max_position_embeddings=4096"),
    ({"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}, r"keys \['attention_factor'\]"),
])
def test_unsupported_rope_is_refused_by_name(tmp_path, rope, message):
    _refused(tmp_path, {**LLAMA_3_2_1B, "rope_scaling": rope}, message)


@pytest.mark.parametrize("fields,message", [
    ({**LLAMA_3_2_1B, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({**LLAMA_3_2_1B, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({**LLAMA_3_2_1B, "mlp_bias": True}, "mlp_bias=True"),
    ({**LLAMA_3_2_1B, "attention_bias": True}, "attention_bias=True"),
    ({**QWEN3, "attention_bias": True}, "attention_bias=True"),
    ({**LLAMA_3_2_1B, "attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({**QWEN2_5, "use_sliding_window": True}, "use_sliding_window=True.*sliding_attention"),
    ({**QWEN3, "layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, "layer_types"),
    ({**R1_DISTILL, "use_mrope": True}, "use_mrope=True"),
    ({**QWEN3, "quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unmapped_fields_that_change_the_math_are_refused_by_name(tmp_path, fields, message):
    _refused(tmp_path, fields, message)


def test_model_config_checks_its_rope_fields():
    for kwargs, message in [(dict(rope_scaling="llama3"), "model.rope_scaling_factor"),
                            (dict(rope_scaling_factor=8.0), "model.rope_scaling_factor"),
                            (dict(rope_scaling="yarn", rope_scaling_factor=4.0), "model.rope_scaling must be"),
                            (dict(rope_scaling="linear", rope_scaling_factor=0.5), "model.rope_scaling_factor must")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**kwargs)


def test_export_refuses_a_family_that_cannot_express_the_model():
    with pytest.raises(ValueError, match="not a llama model"):
        hf_config_from_model(ModelConfig(qk_layernorm=True), "llama", "float32")
    with pytest.raises(ValueError, match="not a qwen3 model"):
        hf_config_from_model(ModelConfig(attention_bias=True, qk_layernorm=True), "qwen3", "float32")


@pytest.mark.parametrize("rope", [LLAMA3, {**LLAMA3, "factor": 8.0}, {"rope_type": "linear", "factor": 2.5}, None],
                         ids=["llama3-32", "llama3-8", "linear", "default"])
def test_megatron_rotary_angles_are_transformers(rope):
    """The angle of every position up to 128K and frequency of megatron's RotaryEmbedding, built with
    ``rope_kwargs``, is transformers' (to float32 rounding: linear scales positions, transformers
    scales frequencies); transformers applies no attention scaling for these types, megatron none."""
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_theta=500000.0,
                                         rope_scaling=rope, max_position_embeddings=131072)
    cfg = model_config_from_hf(hf_config)
    kwargs = {k: v for k, v in rope_kwargs(cfg).items() if k != "position_embedding_type"}
    ours = RotaryEmbedding(kv_channels=cfg.head_dim, rotary_percent=1.0, use_cpu_initialization=True, **kwargs)
    theirs = LlamaRotaryEmbedding(hf_config)
    assert theirs.attention_scaling == 1.0
    n = 131072
    # what LlamaRotaryEmbedding.forward computes for position_ids 0..n-1
    expected = torch.arange(n, dtype=torch.float32)[:, None] * theirs.inv_freq
    torch.testing.assert_close(ours.get_freqs_non_repeated(n), expected, rtol=1e-6, atol=0)


# Qwen2.5-VL-3B-Instruct's config.json in the layout it is published in (transformers 4.x: the language model's
# fields at the top level, M-RoPE as rope_scaling type "mrope")
QWEN2_5_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}


def test_qwen2_5_vl_language_model_is_qwen2_with_mrope(tmp_path):
    from megatron_gndpo.models.vlm import vlm_language_config

    cfg = vlm_language_config(_load(tmp_path, QWEN2_5_VL_3B))
    assert (cfg.mrope_section, cfg.rope_theta, cfg.rope_scaling) == ([16, 24, 24], 1e6, None)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_key_value_heads) == (2048, 36, 128, 2)
    assert cfg.attention_bias and not cfg.qk_layernorm and cfg.tie_word_embeddings
    assert rope_kwargs(cfg) == dict(position_embedding_type="mrope", rotary_base=1e6)
    with pytest.raises(ValueError, match="M-RoPE.*positions are 3-D"):  # a text export would drop the 3-D positions
        hf_config_from_model(cfg, "qwen2", "bfloat16")


@pytest.mark.parametrize("rope,message", [
    ({"type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]}, "only M-RoPE"),
    ({"type": "mrope"}, "no mrope_section"),
])
def test_qwen2_5_vl_rope_other_than_mrope_is_refused_by_name(tmp_path, rope, message):
    from megatron_gndpo.models.vlm import vlm_language_config

    with pytest.raises(ValueError, match=message):
        vlm_language_config(_load(tmp_path, {**QWEN2_5_VL_3B, "rope_scaling": rope}))


def test_model_config_checks_its_mrope_section():
    assert ModelConfig(hidden_size=64, num_attention_heads=4, mrope_section=(2, 3, 3)).mrope_section == [2, 3, 3]
    for kwargs, message in [(dict(mrope_section=[2, 3, 4]), "summing to head_dim / 2 \\(8\\)"),
                            (dict(mrope_section=[8]), "3 positive sizes"),
                            (dict(mrope_section=[2, 3, 3], rope_scaling="linear", rope_scaling_factor=2.0),
                             "without frequency scaling")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(hidden_size=64, num_attention_heads=4, **kwargs)
