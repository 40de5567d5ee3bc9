from megatron_gndpo.models.provider import build_gpt_model, build_transformer_config, layer_spec

__all__ = ["build_gpt_model", "build_transformer_config", "layer_spec"]
