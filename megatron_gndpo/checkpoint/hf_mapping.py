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

from typing import Any, Callable, Dict, Mapping, Tuple

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


# What megatron-core's llama3 RoPE scaling (RotaryEmbedding._apply_scaling, 0.16 and 0.19) hard-codes:
# GPTModel passes it only the factor. An HF config with other values is refused, never approximated.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# rope_type -> the keys its parameters may hold ("partial_rotary_factor" is checked on its own)
ROPE_KEYS = {"default": {"rope_type", "rope_theta"},
             "linear": {"rope_type", "rope_theta", "factor"},
             "llama3": {"rope_type", "rope_theta", "factor", *LLAMA3_FIXED}}
# (config class, model class, qk_layernorm, attention_bias) of each family: what its transformers model computes
FAMILY_TRAITS = {"llama": ("LlamaConfig", "LlamaForCausalLM", False, False),
                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False, True),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", True, False)}

# Every field a Llama / Qwen2 / Qwen3 config may carry and why accepting it is safe. A field not listed
# is refused by name: it may change what the model computes (a quantization_config, an attention
# variant), and dropping it would give a converted model whose logits differ, with no error.
#
#   field                                 | handling
#   --------------------------------------+----------------------------------------------------------------
#   vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
#   head_dim rms_norm_eps tie_word_embeddings max_position_embeddings
#                                         | mapped to the ModelConfig field of the same name
#   rope_parameters (transformers 5),     | mapped to rope_theta / rope_scaling / rope_scaling_factor for
#   rope_scaling rope_theta               | rope_type default, linear and llama3 (llama3 only with megatron's
#   partial_rotary_factor (4.x)           | fixed LLAMA3_FIXED); other types and keys refused;
#                                         | partial_rotary_factor must be 1
#   attention_bias                        | qwen2: unread (q/k/v always biased) -> attention_bias=True;
#                                         | llama, qwen3: it also biases o_proj, which megatron's layer spec
#                                         | has no parameter for -> must be false
#   hidden_act                            | must be "silu" (megatron is built with SwiGLU on F.silu)
#   mlp_bias                              | must be false (megatron is built with add_bias_linear=False)
#   attention_dropout                     | must be 0 (transformers applies it when training; megatron is
#                                         | built without)
#   use_sliding_window, layer_types       | must be false / all "full_attention" (megatron builds full causal
#                                         | attention in every layer)
#   use_mrope, is_encoder_decoder         | must be false: DeepSeek-R1-Distill-Qwen configs carry "use_mrope":
#                                         | false; true marks weights trained with Qwen2-VL's 3-D positions
#   sliding_window, max_window_layers     | inert: read only for "sliding_attention" layers, refused above
#   pretraining_tp                        | inert: unread by transformers 5; 4.x splits the same matmuls into
#                                         | that many slices (the same sums in another order)
#   initializer_range                     | inert: initialisation only, the weights come from the checkpoint
#   bos/eos/pad_token_id, tokenizer_class | inert for the forward: tokenizer and generation metadata
#                                         | (pad_token_id's padding_idx only masks that row's gradient)
#   use_cache, output_attentions,         | inert: what forward returns, not its values
#   output_hidden_states, return_dict     |
#   dtype / torch_dtype                   | inert: tensors are converted in their stored dtype
#   _name_or_path architectures model_type transformers_version | names
HF_MAPPED_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "attention_bias"})
HF_REQUIRED_VALUES = {"hidden_act": "silu", "mlp_bias": False, "attention_dropout": 0.0,
                      "use_sliding_window": False, "use_mrope": False, "is_encoder_decoder": False}
HF_INERT_FIELDS = frozenset({
    "layer_types", "sliding_window", "max_window_layers", "pretraining_tp", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "dtype", "torch_dtype", "_name_or_path", "architectures",
    "model_type", "transformers_version"})


def hf_rope_parameters(hf_config) -> Dict[str, Any]:
    """The config's RoPE settings as one flat dict with ``rope_type`` and ``rope_theta``: transformers 5
    keeps them in ``rope_parameters``, 4.x in ``rope_scaling`` beside top-level ``rope_theta`` and
    ``partial_rotary_factor``; the legacy key ``type`` is read as ``rope_type``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if getattr(hf_config, key, None) is not None:
            params.setdefault(key, getattr(hf_config, key))
    params.setdefault("rope_theta", 10000.0)
    legacy = params.pop("type", None)
    params.setdefault("rope_type", legacy or "default")
    if legacy is not None and legacy != params["rope_type"]:
        raise ValueError(f"rope_parameters has rope_type={params['rope_type']!r} and type={legacy!r}")
    return params


def rope_from_hf(params: Mapping[str, Any]) -> Dict[str, Any]:
    """HF RoPE parameters (as ``hf_rope_parameters`` returns them) -> ModelConfig's ``rope_theta``,
    ``rope_scaling``, ``rope_scaling_factor``. Raises ValueError naming the rope type or key when
    megatron-core does not compute exactly what transformers does for them."""
    rope_type = params["rope_type"]
    if rope_type not in ROPE_KEYS:
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported: megatron-core computes "
                         f"only {sorted(ROPE_KEYS)} the way transformers does")
    unknown = sorted(set(params) - ROPE_KEYS[rope_type] - {"partial_rotary_factor"})
    if unknown:
        raise ValueError(f"rope_parameters keys {unknown} are not supported with rope_type={rope_type!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']!r} is not "
                         "supported: only full-width RoPE (1.0)")
    if rope_type == "llama3":
        for key, fixed in LLAMA3_FIXED.items():
            if params.get(key) != fixed:
                raise ValueError(f"rope_parameters.{key}={params.get(key)!r} is not supported: megatron-core's "
                                 f"llama3 RoPE scaling has it fixed at {fixed!r}")
    scaling = None if rope_type == "default" else rope_type
    return {"rope_theta": float(params["rope_theta"]), "rope_scaling": scaling,
            "rope_scaling_factor": float(params["factor"]) if scaling else None}


def rope_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """The inverse of ``rope_from_hf``: ModelConfig's RoPE fields -> HF ``rope_parameters``."""
    params: Dict[str, Any] = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        params["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        params.update(LLAMA3_FIXED)
    return params


def check_hf_config(hf_config) -> None:
    """Refuse a config whose fields change the math in a way ModelConfig does not map (the table above):
    raises ValueError naming every such field."""
    arch = hf_config.model_type
    fields = hf_config.to_diff_dict()  # every field set in the file or differing from transformers' default
    problems = [f"{k}={fields[k]!r} (not understood by the converter: remove it from config.json only if it "
                "does not change the model's outputs)"
                for k in sorted(set(fields) - HF_MAPPED_FIELDS - HF_INERT_FIELDS - set(HF_REQUIRED_VALUES))]
    for key, want in HF_REQUIRED_VALUES.items():
        value = getattr(hf_config, key, want)
        if value != want:
            problems.append(f"{key}={value!r} (only {want!r} is supported)")
    sliding = sorted({t for t in (getattr(hf_config, "layer_types", None) or []) if t != "full_attention"})
    if sliding:
        problems.append(f"layer_types with {sliding} (only full_attention is supported)")
    if arch != "qwen2" and getattr(hf_config, "attention_bias", False):
        problems.append(f"attention_bias=True ({arch} biases o_proj too, which megatron's layer has no "
                        "parameter for)")
    if problems:
        raise ValueError(f"unsupported {arch} config: " + "; ".join(problems))


def model_config_from_hf(hf_config) -> ModelConfig:
    """A transformers ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config`` -> our ModelConfig. Every field
    that changes the math and is not mapped is refused (``check_hf_config``, ``rope_from_hf``)."""
    arch = hf_config.model_type
    if arch not in FAMILY_TRAITS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILY_TRAITS)}")
    check_hf_config(hf_config)
    return ModelConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, rms_norm_eps=hf_config.rms_norm_eps,
        qk_layernorm=FAMILY_TRAITS[arch][2], attention_bias=FAMILY_TRAITS[arch][3],
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=hf_config.max_position_embeddings,
        **rope_from_hf(hf_rope_parameters(hf_config)),
    )


def hf_config_from_model(cfg: ModelConfig, family: str, dtype: str):
    """ModelConfig -> the transformers config of ``family`` ('llama', 'qwen2', 'qwen3') that computes
    the same model, for ``dtype`` tensors: ``model_config_from_hf`` of it gives ``cfg`` back. Raises
    ValueError when ``family`` cannot express ``cfg`` (qk-norm is Qwen3's, QKV bias Qwen2's)."""
    import transformers

    if family not in FAMILY_TRAITS:
        raise ValueError(f"unknown Hugging Face architecture {family!r}; supported: {', '.join(FAMILY_TRAITS)}")
    if cfg.mrope_section:
        raise ValueError(f"a model with M-RoPE (mrope_section={cfg.mrope_section}) is not a {family} model: its "
                         "positions are 3-D")
    config_class, model_class, qk_layernorm, attention_bias = FAMILY_TRAITS[family]
    if (cfg.qk_layernorm, cfg.attention_bias) != (qk_layernorm, attention_bias):
        raise ValueError(f"a model with qk_layernorm={cfg.qk_layernorm} and attention_bias={cfg.attention_bias} "
                         f"is not a {family} model ({family} has qk_layernorm={qk_layernorm}, "
                         f"attention_bias={attention_bias})")
    rope = rope_to_hf(cfg)
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_theta=rope.pop("rope_theta"), architectures=[model_class], torch_dtype=dtype,
                  # transformers 5 reads it into rope_parameters, 4.x keeps it as is
                  rope_scaling=rope if cfg.rope_scaling else None)
    return getattr(transformers, config_class)(**kwargs)


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
