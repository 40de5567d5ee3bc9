"""The single translation point from our configs to megatron-core objects.

Which megatron model class and which layer spec we build is decided here and nowhere else:
megatron-core 0.16 offers ``GPTModel`` (newer releases point to ``HybridModel``); swapping it is a
change to :func:`build_gpt_model` alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_gndpo.models.attention import local_layer_spec
from megatron_gndpo.models.te_support import unavailable_reason


def use_transformer_engine(precision: PrecisionConfig) -> bool:
    """'auto' means TE when it can run; asking for TE (or FP8) without it is an error, not a
    silent fall-back, because the numerics would differ from what the user configured."""
    if precision.transformer_impl == "local":
        return False
    reason = unavailable_reason()
    if precision.transformer_impl == "transformer_engine" or precision.fp8:
        if reason is not None:
            what = "precision.fp8" if precision.fp8 else "precision.transformer_impl='transformer_engine'"
            raise ValueError(f"{what} needs Transformer Engine on a CUDA device: {reason}")
        return True
    return reason is None


def params_dtype(precision: PrecisionConfig) -> torch.dtype:
    """``params_dtype='auto'``: bf16 on GPUs (what every GPU recipe trains in), fp32 on CPUs (CPU bf16
    matmuls are slow and the CPU runs are tests and demos). Resolved here, where the model is built, so
    that one config file means bf16 on the cluster and fp32 in CI."""
    name = precision.params_dtype
    if name == "auto":
        name = "bfloat16" if torch.cuda.is_available() else "float32"
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def check_fp8_recipe(precision: PrecisionConfig) -> None:
    """Refuse an FP8 recipe this GPU cannot run, before any rank builds a model."""
    if not precision.fp8 or precision.fp8_recipe != "mxfp8" or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        raise ValueError(f"precision.fp8_recipe='mxfp8' needs a Blackwell GPU (compute capability >= 10.0); "
                         f"{torch.cuda.get_device_name()} is {major}.{minor}: use 'delayed' or 'tensorwise'")


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    cpu_initialization: Optional[bool] = None,
):
    """Our dataclasses -> megatron-core ``TransformerConfig`` (never subclassed).

    ``cpu_initialization`` (default: when there is no GPU) makes megatron create the weights with no
    device, so they land on the CPU or on an enclosing ``torch.device`` context (the converter's meta
    model); without it megatron allocates them on the current GPU whatever the context says."""
    from megatron.core.transformer import TransformerConfig

    check_fp8_recipe(precision)
    dtype = params_dtype(precision)
    if cpu_initialization is None:
        cpu_initialization = not torch.cuda.is_available()
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
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU init draws every full weight from one generator and then slices it, so the same
        # seed gives the same model at every TP size; on GPUs weights come from checkpoints.
        use_cpu_initialization=cpu_initialization,
        # p2p on gloo is synchronous; the extra CUDA sync around batched isend/irecv is not needed.
        batch_p2p_sync=torch.cuda.is_available(),
        **({"mrope_section": list(model.mrope_section)} if model.mrope_section else {}),
        **fp8_kwargs,
    )


def layer_spec(model: ModelConfig, precision: PrecisionConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(precision):
        # No fp8= argument: megatron-core takes FP8 from the TransformerConfig (0.19 deprecates the argument).
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    return local_layer_spec(qk_layernorm=model.qk_layernorm, attention=precision.local_attention)


def rope_kwargs(model: ModelConfig) -> dict:
    """``GPTModel``'s rotary-embedding arguments for ``model``.

    Each maps onto what transformers computes for the same ``rope_type`` (proven against its logits in
    tests/distributed/test_hf_mapping.py): 'linear' is megatron's ``seq_len_interpolation_factor``
    (positions divided by the factor; transformers divides the inverse frequencies instead, the same
    angles up to float rounding), 'llama3' is megatron's ``rope_scaling`` (transformers' formula with
    megatron's fixed low/high frequency factors 1 and 4 and original context 8192). ``mrope_section``
    is megatron's 'mrope' (``MultimodalRotaryEmbedding``, sections from the TransformerConfig): the
    model then takes position ids ``[3, batch, seq]``, as transformers' Qwen2.5-VL does."""
    kwargs = dict(position_embedding_type="mrope" if model.mrope_section else "rope", rotary_base=model.rope_theta)
    if model.rope_scaling == "linear":
        kwargs["seq_len_interpolation_factor"] = model.rope_scaling_factor
    elif model.rope_scaling == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=model.rope_scaling_factor)
    return kwargs


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    pre_process: bool,
    post_process: bool,
    cpu_initialization: Optional[bool] = None,
    pg_collection=None,
):
    """A megatron-core decoder for this pipeline stage, logits left vocab-sharded (``parallel_output``).

    ``pg_collection`` (megatron-core's ``ProcessGroupCollection``, see ``distributed/init.py::layout_groups``)
    builds it on groups other than ``parallel_state``'s: its embedding, TP linears, attention, vocab-parallel
    output and layer offsets read those. megatron-core 0.16 still reads ``parallel_state`` in a few places,
    none of which changes what such a model computes: GPU random init's per-TP-rank RNG stream (random
    weights differ from the CPU-initialised ones anyway; real teachers load a checkpoint), the replica id of
    a tied output layer in its sharded state dict (a copy, never written by the frozen teacher), and the
    scratch buffer of its unfused ``DotProductAttention`` (memory, no group)."""
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(model, parallel, precision, cpu_initialization=cpu_initialization)
    if pg_collection is not None:
        sizes = (pg_collection.tp.size(), pg_collection.pp.size())
        if sizes != (config.tensor_model_parallel_size, config.pipeline_model_parallel_size):
            raise ValueError(f"process groups of TP x PP {sizes} for a model configured for "
                             f"{(config.tensor_model_parallel_size, config.pipeline_model_parallel_size)}")
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, precision),
        vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        pg_collection=pg_collection,
        **rope_kwargs(model),
    )
    # megatron's local norms (torch.nn.RMSNorm when apex is absent) take neither params_dtype nor the
    # device: Megatron-LM's training setup casts and moves the whole model (Float16Module, model.cuda()),
    # and so do we, or those weights stay float32 on the CPU beside bf16 GPU weights.
    gpt.to(dtype=config.params_dtype)
    if not config.use_cpu_initialization:
        gpt.cuda(torch.cuda.current_device())
    return gpt
