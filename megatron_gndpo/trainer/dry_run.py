"""``--print-config``: what a run would be, without building it. The resolved config, the world layout,
the parameter counts of student and teacher (from their configs, megatron-core's local layer layout),
and a rough per-rank memory estimate. Nothing here imports megatron or touches a device."""

from __future__ import annotations

import dataclasses
from typing import Dict

import yaml

from megatron_gndpo.config.schema import ModelConfig, PrecisionConfig, RunConfig

GIB = 2**30


def parameter_count(model: ModelConfig, tensor_model_parallel_size: int = 1) -> Dict[str, int]:
    """Parameters of the whole model (all ranks together), by part: the embedding and LM head at the
    vocabulary padded for ``tensor_model_parallel_size``, one decoder layer (RMSNorms, fused QKV with
    its optional bias and q/k norms, output projection, SwiGLU MLP), the final norm."""
    vocab = model.padded_vocab_size(tensor_model_parallel_size)
    h, heads, kv, d = model.hidden_size, model.num_attention_heads, model.num_key_value_heads, model.head_dim
    qkv = (heads + 2 * kv) * d
    layer = (2 * h                                           # input and pre-MLP RMSNorm
             + h * qkv + (qkv if model.attention_bias else 0)
             + (2 * d if model.qk_layernorm else 0)
             + heads * d * h                                 # attention output projection
             + h * 2 * model.intermediate_size               # SwiGLU gate and up
             + model.intermediate_size * h)                  # down
    parts = {"embedding": vocab * h, "layers": layer * model.num_hidden_layers, "final_norm": h,
             "lm_head": 0 if model.tie_word_embeddings else vocab * h}
    parts["total"] = sum(parts.values())
    parts["per_layer"] = layer
    return parts


def _bytes_per_weight(precision: PrecisionConfig) -> int:
    # 'auto' is bfloat16 where the run would train (GPUs); float32 is the CPU fallback
    return 4 if precision.params_dtype == "float32" else 2


def memory_per_rank(cfg: RunConfig, world_size: int) -> Dict[str, float]:
    """A rough estimate, in bytes, of the largest rank's memory: model states split evenly over TP x PP,
    the rollout's KV cache for this rank's rows, and one micro-batch's fp32 logits (with their gradient)
    and layer activations. Allocator slack, communication buffers and the CUDA context are not counted."""
    par, tc = cfg.parallel, cfg.trainer
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = max(world_size // (tp * pp), 1)
    student = parameter_count(cfg.model, tp)["total"] / (tp * pp)
    w = _bytes_per_weight(cfg.precision)
    # fp32 gradients (grad_reduce_in_fp32), Adam's two fp32 moments, fp32 main weights under bf16
    optimizer = 8 + (4 if w == 2 else 0)
    out = {"student weights": student * w, "student gradients": student * 4,
           "optimizer states": student * optimizer / (dp if par.use_distributed_optimizer else 1)}
    teacher = parameter_count(cfg.teacher.model, tp)["total"] / (tp * pp)
    teacher_bytes = 1 if cfg.teacher.quantize else _bytes_per_weight(cfg.teacher.precision)
    out["teacher weights"] = 0.0 if cfg.teacher.offload else teacher * teacher_bytes
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    rows = tc.prompts_per_step * cfg.rollout.n_samples // dp
    m = cfg.model
    out["rollout KV cache"] = (rows * seq * 2 * max(m.num_key_value_heads // tp, 1) * m.head_dim * w
                               * m.num_hidden_layers / pp)
    vocab = m.padded_vocab_size(tp) // tp
    out["logits (one micro-batch)"] = tc.micro_batch_size * seq * vocab * 4 * 2
    # megatron's estimate without recomputation: about 34 bytes per token and hidden unit per layer
    tokens = tc.micro_batch_size * seq
    out["activations (one micro-batch)"] = tokens * m.hidden_size * 34 * m.num_hidden_layers / (pp * tp)
    return out


def describe_run(cfg: RunConfig, world_size: int) -> str:
    """The text ``--print-config`` prints: the resolved config as YAML, then the layout, the
    parameter counts and the memory estimate as comments."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    lines = [yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).rstrip(), ""]
    if world_size % (tp * pp):
        lines.append(f"# layout: world size {world_size} is not divisible by TP {tp} x PP {pp}: this run would not "
                     "start")
        return "\n".join(lines)
    dp = world_size // (tp * pp)
    lines.append(f"# layout: world {world_size} = TP {tp} x PP {pp} x DP {dp}; "
                 f"{cfg.trainer.prompts_per_step * cfg.rollout.n_samples // dp} responses per DP rank per step")
    for role, model in (("student", cfg.model), ("teacher", cfg.teacher.model)):
        n = parameter_count(model, tp)
        lines.append(f"# {role}: {n['total'] / 1e9:.3f} B parameters ({model.num_hidden_layers} layers of "
                     f"{n['per_layer'] / 1e6:.2f} M, embedding {n['embedding'] / 1e6:.1f} M, "
                     + ("LM head tied)" if model.tie_word_embeddings else f"LM head {n['lm_head'] / 1e6:.1f} M)"))
    memory = memory_per_rank(cfg, world_size)
    lines.append(f"# memory per rank, roughly: {sum(memory.values()) / GIB:.2f} GiB (every sequence at "
                 "max_prompt_length + max_new_tokens)")
    lines += [f"#   {name}: {size / GIB:.2f} GiB" for name, size in memory.items()]
    if cfg.teacher.offload:
        lines.append("#   (teacher.offload: the teacher's weights live in host memory outside its scoring phase)")
    return "\n".join(lines)
