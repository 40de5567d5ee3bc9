"""The single translation point from our configs to megatron-core objects.

Which megatron model class and which layer spec we build is decided here and nowhere else:
megatron-core 0.16 offers ``GPTModel`` (newer releases point to ``HybridModel``); swapping it is a
change to :func:`build_gpt_model` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(precision: PrecisionConfig) -> bool:
    """'auto' means TE when it can run; asking for TE (or FP8) without it is an error, not a
    silent fall-back, because the numerics would differ from what the user configured."""
    if precision.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if precision.transformer_impl == "transformer_engine" or precision.fp8:
        if not available:
            what = "precision.fp8" if precision.fp8 else "precision.transformer_impl='transformer_engine'"
            raise ValueError(f"{what} needs Transformer Engine and CUDA, which this process does not have")
        return True
    return available


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
):
    """Our dataclasses -> megatron-core ``TransformerConfig`` (never subclassed)."""
    from megatron.core.transformer import TransformerConfig

    bf16 = precision.params_dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    fp8_kwargs = {}
    if precision.fp8:
        fp8_kwargs = dict(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.attention_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        # CPU init draws every full weight from one generator and then slices it, so the same
        # seed gives the same model at every TP size; on GPUs weights come from checkpoints.
        use_cpu_initialization=not torch.cuda.is_available(),
        # p2p on gloo is synchronous; the extra CUDA sync around batched isend/irecv is not needed.
        batch_p2p_sync=torch.cuda.is_available(),
        **fp8_kwargs,
    )


def layer_spec(model: ModelConfig, precision: PrecisionConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(precision):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model.qk_layernorm, fp8=precision.fp8
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    pre_process: bool,
    post_process: bool,
):
    """A megatron-core decoder for this pipeline stage, logits left vocab-sharded (``parallel_output``)."""
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(model, parallel, precision)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, precision),
        vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
    )
