"""What an architecture holds and computes, in closed form: parameters (whole model and per rank of a
TP x PP layout), matmul FLOPs per token, and KV-cache bytes per token. These are megatron-core's local
layer layout: fused QKV (optional bias, optional q/k RMSNorms), output projection, SwiGLU MLP, RMSNorms
replicated over TP, the vocabulary padded for TP and split over it."""

from __future__ import annotations

from typing import Dict

from megatron_gndpo.config.schema import ModelConfig


def _layer(model: ModelConfig, tp: int) -> Dict[str, int]:
    """One decoder layer on one TP rank: ``sharded`` parameters are split over TP (QKV, its bias, the
    output projection, the MLP), ``replicated`` ones are whole on every rank (the RMSNorms)."""
    h, heads, kv, d, f = (model.hidden_size, model.num_attention_heads, model.num_key_value_heads, model.head_dim,
                          model.intermediate_size)
    qkv = (heads + 2 * kv) * d
    sharded = h * qkv + (qkv if model.attention_bias else 0) + heads * d * h + 3 * h * f
    replicated = 2 * h + (2 * d if model.qk_layernorm else 0)
    return {"sharded": sharded // tp, "replicated": replicated}


def parameter_count(model: ModelConfig, tensor_model_parallel_size: int = 1,
                    padded_vocab: bool = True) -> Dict[str, int]:
    """Parameters of the whole model (all ranks together), by part: the embedding and LM head (the LM
    head is 0 when tied: counted once), ``num_hidden_layers`` decoder layers, the final norm.

    The vocabulary is megatron's, padded to a multiple of ``make_vocab_size_divisible_by x TP``; with
    ``padded_vocab=False`` it is ``vocab_size`` and the total is what ``transformers`` counts
    (``model.num_parameters()``). ``per_layer`` is one layer (2h norms + h(a+2g)d QKV [+ (a+2g)d bias]
    [+ 2d q/k norms] + a d h output projection + 3 h f SwiGLU)."""
    vocab = model.padded_vocab_size(tensor_model_parallel_size) if padded_vocab else model.vocab_size
    h = model.hidden_size
    layer = _layer(model, 1)
    per_layer = layer["sharded"] + layer["replicated"]
    parts = {"embedding": vocab * h, "layers": per_layer * model.num_hidden_layers, "final_norm": h,
             "lm_head": 0 if model.tie_word_embeddings else vocab * h}
    parts["total"] = sum(parts.values())
    parts["per_layer"] = per_layer
    return parts


def parameters_per_rank(model: ModelConfig, tp: int, pp: int) -> int:
    """Parameters held by the largest rank of a TP x PP layout: ``L / PP`` layers (sharded parts / TP),
    plus the vocabulary shard ``V_pad h / TP`` of the embedding (first stage) and of the LM head (last
    stage; with PP > 1 and tied embeddings the last stage keeps its own copy, as megatron does) and the
    final norm. The first stage and the last are compared, the larger is returned."""
    layer = _layer(model, tp)
    layers = (layer["sharded"] + layer["replicated"]) * (model.num_hidden_layers // pp)
    vocab_shard = model.padded_vocab_size(tp) // tp * model.hidden_size
    head = vocab_shard if (not model.tie_word_embeddings or pp > 1) else 0
    if pp == 1:
        return layers + vocab_shard + head + model.hidden_size
    return layers + max(vocab_shard, head + model.hidden_size)


def linear_parameters_per_rank(model: ModelConfig, tp: int, pp: int) -> int:
    """The decoder's linear weights on one rank (what an FP8 teacher stores in one byte each)."""
    return _layer(model, tp)["sharded"] * (model.num_hidden_layers // pp)


def matmul_flops_per_token(model: ModelConfig, context: float) -> float:
    """Forward FLOPs per token: ``2 (L P_layer + V h)`` for the matmuls with weights (the LM head once,
    tied or not) plus ``2 L a d context`` for the attention scores and their weighted sum (``4 L a d S``
    halved: causal, ``context`` is the mean number of earlier tokens, S / 2 for a full sequence of S).
    The benchmarks' convention (``benchmarks/train_step.py``), so that MFU means the same thing."""
    weights = _layer(model, 1)["sharded"] * model.num_hidden_layers + model.vocab_size * model.hidden_size
    attention = 4 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * context
    return 2 * weights + attention


def kv_cache_bytes_per_token(model: ModelConfig, tp: int, pp: int, bytes_per_value: int) -> int:
    """Keys and values of one token on one rank: ``2 (g / TP) d`` values per layer, ``L / PP`` layers."""
    return 2 * (model.num_key_value_heads // tp) * model.head_dim * (model.num_hidden_layers // pp) * bytes_per_value
