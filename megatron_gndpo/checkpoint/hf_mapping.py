"""Hugging Face (Llama / Qwen2 / Qwen3) <-> megatron's layout-free weights (see models/weights.py).

Every transform works one decoder layer at a time (``layer_from_hf`` / ``layer_to_hf``), so the
converter streams a checkpoint layer by layer and the rollout weight sync maps what one TP group
has just gathered; ``hf_to_global`` / ``global_to_hf`` are the whole-model compositions.

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
    L + "self_attention.linear_qkv.weight": (_qkv_merge, _qkv_split,
                                            tuple(f"self_attn.{p}_proj.weight" for p in "qkv")),
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
    rope = (getattr(hf_config, "rope_theta", None)
            or (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, rope_theta=float(rope), rms_norm_eps=hf_config.rms_norm_eps,
        qk_layernorm=arch == "qwen3",
        attention_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def _shape_table(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """The shape of each kind of HF tensor (per-layer keys without their ``model.layers.{i}.`` prefix)."""
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


def _checked(get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> Callable[[str], torch.Tensor]:
    """``get`` with every tensor's shape checked against the config (the HF key is named)."""
    shapes = hf_tensor_shapes(cfg)

    def take(key: str) -> torch.Tensor:
        t = get(key)
        want = shapes[key]
        if tuple(t.shape) != want:
            raise ValueError(f"Hugging Face tensor {key!r} has shape {tuple(t.shape)}, the config implies {want}")
        return t

    return take


def pad_vocab(w: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])


def hf_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor of this architecture and its shape, in the order the converter writes them."""
    table = _shape_table(cfg)
    renames, fused = _layer_keys(cfg)
    per_layer = [LAYER_RENAMES[k] for k in renames] + [p for k in fused for p in LAYER_FUSED[k][2]]
    out = {"model.embed_tokens.weight": table["model.embed_tokens.weight"]}
    out.update({f"model.layers.{i}.{p}": table[p] for i in range(cfg.num_hidden_layers) for p in per_layer})
    out["model.norm.weight"] = table["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = table["lm_head.weight"]
    return out


def ignorable_hf_key(key: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry nothing megatron keeps: rotary caches, and a tied model's lm_head copy."""
    return key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_word_embeddings)


def non_layer_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig,
                      padded_vocab: int) -> Dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output layer, vocabulary padded to ``padded_vocab`` rows."""
    get = _checked(get, cfg)
    out = {"embedding.word_embeddings.weight": pad_vocab(get("model.embed_tokens.weight"), padded_vocab),
           "decoder.final_layernorm.weight": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab(get("lm_head.weight"), padded_vocab)
    return out


def layer_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig, i: int) -> Dict[str, torch.Tensor]:
    """Layer ``i``'s HF tensors (fetched by ``get``) -> stacked megatron key -> that layer's slice."""
    get = _checked(get, cfg)
    renames, fused = _layer_keys(cfg)
    out = {key: get(f"model.layers.{i}.{LAYER_RENAMES[key]}") for key in renames}
    for key in fused:
        merge, _, parts = LAYER_FUSED[key]
        out[key] = merge(cfg, *(get(f"model.layers.{i}.{p}") for p in parts))
    return out


def non_layer_to_hf(weights: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Embedding, final norm and output layer -> HF (padded vocabulary rows dropped). Maps those of
    them ``weights`` holds (a pipeline stage has some), ignoring any layer tensors."""
    v = cfg.vocab_size
    names = {"embedding.word_embeddings.weight": ("model.embed_tokens.weight", v),
             "decoder.final_layernorm.weight": ("model.norm.weight", None)}
    if not cfg.tie_word_embeddings:
        names["output_layer.weight"] = ("lm_head.weight", v)
    return {hf: (weights[key][:rows] if rows else weights[key]).contiguous()
            for key, (hf, rows) in names.items() if key in weights}


def layer_to_hf(layer: Mapping[str, torch.Tensor], cfg: ModelConfig, i: int) -> Dict[str, torch.Tensor]:
    """Stacked megatron key -> layer ``i``'s slice  =>  HF name -> tensor."""
    renames, fused = _layer_keys(cfg)
    out = {f"model.layers.{i}.{LAYER_RENAMES[key]}": layer[key] for key in renames}
    for key in fused:
        _, split, parts = LAYER_FUSED[key]
        for p, piece in zip(parts, split(cfg, layer[key])):
            out[f"model.layers.{i}.{p}"] = piece
    return {k: t.contiguous() for k, t in out.items()}


def hf_to_global(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """A whole HF state dict -> megatron global weights. Missing or unexpected HF tensors are named."""
    def get(key):
        if key not in hf:
            raise KeyError(f"Hugging Face checkpoint has no tensor {key!r}")
        return hf[key]

    unexpected = sorted(k for k in set(hf) - set(hf_tensor_shapes(cfg)) if not ignorable_hf_key(k, cfg))
    if unexpected:
        raise KeyError(f"Hugging Face checkpoint has tensors this {cfg.num_hidden_layers}-layer config does not use: "
                       f"{unexpected[:5]}")
    out = non_layer_from_hf(get, cfg, padded_vocab)
    layers = [layer_from_hf(get, cfg, i) for i in range(cfg.num_hidden_layers)]
    out.update({key: torch.stack([layer[key] for layer in layers]) for key in layers[0]})
    return out


def global_to_hf(weights: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Megatron global weights -> HF state dict (padded vocabulary rows dropped)."""
    out = non_layer_to_hf(weights, cfg)
    stacked = [k for k in weights if k.startswith(L)]
    for i in range(cfg.num_hidden_layers):
        out.update(layer_to_hf({k: weights[k][i] for k in stacked}, cfg, i))
    return out
