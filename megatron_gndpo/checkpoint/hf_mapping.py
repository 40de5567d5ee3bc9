"""Hugging Face (Llama / Qwen2 / Qwen3) <-> megatron's layout-free weights (see models/weights.py).

The megatron side is the global form of ``sharded_state_dict``: per-layer tensors stacked along a
leading layer axis under one key, SwiGLU fc1 as [gate; up], QKV interleaved per query group
([q heads of group g; k_g; v_g] for each g), vocabulary padded. One table of renames plus two
reusable transforms (QKV, gated MLP) covers the family; the rollout weight sync reuses it.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch

from megatron_gndpo.config.schema import ModelConfig

L = "decoder.layers."
# stacked megatron key -> HF key inside model.layers.{i}.
LAYER_RENAMES = {
    L + "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    L + "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    L + "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    L + "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    L + "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    L + "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _qkv_merge(cfg: ModelConfig, q, k, v):
    g, r, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    q = q.reshape(g, r * d, *q.shape[1:])
    return torch.cat([q, k.reshape(g, d, *k.shape[1:]), v.reshape(g, d, *v.shape[1:])], dim=1).reshape(
        g * (r + 2) * d, *q.shape[2:])


def _qkv_split(cfg: ModelConfig, qkv):
    g, r, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    x = qkv.reshape(g, (r + 2) * d, *qkv.shape[1:])
    q, k, v = x.split([r * d, d, d], dim=1)
    return q.reshape(g * r * d, *qkv.shape[1:]), k.reshape(g * d, *qkv.shape[1:]), v.reshape(g * d, *qkv.shape[1:])


def _gate_up_merge(cfg: ModelConfig, gate, up):
    return torch.cat([gate, up], dim=0)


def _gate_up_split(cfg: ModelConfig, fc1):
    return tuple(fc1.chunk(2, dim=0))


# stacked megatron key -> (merge, split, HF keys inside model.layers.{i}.)
LAYER_FUSED: Dict[str, Tuple[Callable, Callable, Tuple[str, ...]]] = {
    L + "self_attention.linear_qkv.weight": (_qkv_merge, _qkv_split, tuple(f"self_attn.{p}_proj.weight" for p in "qkv")),
    L + "self_attention.linear_qkv.bias": (_qkv_merge, _qkv_split, tuple(f"self_attn.{p}_proj.bias" for p in "qkv")),
    L + "mlp.linear_fc1.weight": (_gate_up_merge, _gate_up_split, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
}


QK_NORM = {L + "self_attention.q_layernorm.weight", L + "self_attention.k_layernorm.weight"}
QKV_BIAS = L + "self_attention.linear_qkv.bias"


def _layer_keys(cfg: ModelConfig):
    """The stacked keys this architecture has: qk-norm only with qk_layernorm (Qwen3), QKV bias only
    with attention_bias (Qwen2)."""
    renames = [k for k in LAYER_RENAMES if cfg.qk_layernorm or k not in QK_NORM]
    fused = [k for k in LAYER_FUSED if cfg.attention_bias or k != QKV_BIAS]
    return renames, fused


def model_config_from_hf(hf_config) -> ModelConfig:
    """A transformers ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config`` -> our ModelConfig."""
    arch = hf_config.model_type
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"unsupported architecture {arch!r}; supported: llama, qwen2, qwen3")
    rope = getattr(hf_config, "rope_theta", None) or (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, rope_theta=float(rope), rms_norm_eps=hf_config.rms_norm_eps,
        qk_layernorm=arch == "qwen3", attention_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """The shape every HF tensor must have (per-layer keys without their ``model.layers.{i}.`` prefix)."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }


def hf_to_global(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """HF state dict -> megatron global weights. Missing or unexpected HF tensors are named."""
    used = set()

    shapes = hf_shapes(cfg)

    def take(key):
        if key not in hf:
            raise KeyError(f"Hugging Face checkpoint has no tensor {key!r}")
        want = shapes[key.split(".", 3)[-1] if key.startswith("model.layers.") else key]
        if tuple(hf[key].shape) != want:
            raise ValueError(f"Hugging Face tensor {key!r} has shape {tuple(hf[key].shape)}, the config implies {want}")
        used.add(key)
        return hf[key]

    def pad_vocab(w):
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])

    out = {"embedding.word_embeddings.weight": pad_vocab(take("model.embed_tokens.weight")),
           "decoder.final_layernorm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab(take("lm_head.weight"))
    renames, fused = _layer_keys(cfg)
    n = cfg.num_hidden_layers
    for key in renames:
        out[key] = torch.stack([take(f"model.layers.{i}.{LAYER_RENAMES[key]}") for i in range(n)])
    for key in fused:
        merge, _, parts = LAYER_FUSED[key]
        out[key] = torch.stack([merge(cfg, *(take(f"model.layers.{i}.{p}") for p in parts)) for i in range(n)])
    unexpected = sorted(set(hf) - used - {"lm_head.weight"} - {k for k in hf if k.endswith("rotary_emb.inv_freq")})
    if unexpected:
        raise KeyError(f"Hugging Face checkpoint has tensors this {cfg.num_hidden_layers}-layer config does not use: "
                       f"{unexpected[:5]}")
    return out


def global_to_hf(weights: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Megatron global weights -> HF state dict (padded vocabulary rows dropped)."""
    v = cfg.vocab_size
    out = {"model.embed_tokens.weight": weights["embedding.word_embeddings.weight"][:v],
           "model.norm.weight": weights["decoder.final_layernorm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = weights["output_layer.weight"][:v]
    renames, fused = _layer_keys(cfg)
    for key in renames:
        for i, t in enumerate(weights[key]):
            out[f"model.layers.{i}.{LAYER_RENAMES[key]}"] = t
    for key in fused:
        _, split, parts = LAYER_FUSED[key]
        for i, t in enumerate(weights[key]):
            for p, piece in zip(parts, split(cfg, t)):
                out[f"model.layers.{i}.{p}"] = piece
    return {k: t.contiguous() for k, t in out.items()}
