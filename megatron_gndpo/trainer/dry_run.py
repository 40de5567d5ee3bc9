"""``--print-config``: what a run would be, without building it. The resolved config, the world layout,
the parameter counts of student and teacher (from their configs, megatron-core's local layer layout),
and the per-rank memory by part from the planner (``megatron_gndpo.planning``). Nothing here imports
megatron or touches a device."""

from __future__ import annotations

import dataclasses
from typing import Dict

import yaml

from megatron_gndpo.config.schema import RunConfig
from megatron_gndpo.planning.hardware import GIB, GPUS
from megatron_gndpo.planning.memory import estimate_memory
from megatron_gndpo.planning.model import parameter_count
from megatron_gndpo.planning.workload import Layout, workload_from_config

__all__ = ["describe_run", "memory_per_rank", "parameter_count"]


def memory_per_rank(cfg: RunConfig, world_size: int) -> Dict[str, float]:
    """The planner's estimate (``planning.memory``), in bytes, of the largest rank's memory by part at the
    configured layout: every phase's parts, each phase fitting in turn. Allocator slack, communication
    buffers and the CUDA context are not counted."""
    par = cfg.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    layout = Layout(tp=tp, pp=pp, cp=cp, dp=max(world_size // (tp * pp * cp), 1))
    estimate = estimate_memory(cfg.model, cfg.teacher.model, layout, workload_from_config(cfg), GPUS["h100"])
    return {name: size for name, size in estimate.parts.items() if size}


def describe_run(cfg: RunConfig, world_size: int) -> str:
    """The text ``--print-config`` prints: the resolved config as YAML, then the layout, the
    parameter counts and the memory estimate as comments."""
    par = cfg.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    lines = [yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).rstrip(), ""]
    if world_size % (tp * pp * cp):
        lines.append(f"# layout: world size {world_size} is not divisible by TP {tp} x PP {pp} x CP {cp}: this run "
                     "would not start")
        return "\n".join(lines)
    dp = world_size // (tp * pp * cp)
    lines.append(f"# layout: world {world_size} = TP {tp} x PP {pp} x CP {cp} x DP {dp}; "
                 f"{cfg.trainer.prompts_per_step * cfg.rollout.n_samples // dp} responses per DP rank per step")
    if cfg.teacher_on_own_layout:
        t = cfg.teacher_parallel
        t_tp, t_pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
        lines.append(f"# teacher layout (teacher.parallel): TP {t_tp} x PP {t_pp} x DP {world_size // (t_tp * t_pp)}"
                     if world_size % (t_tp * t_pp) == 0 else
                     f"# teacher layout: world size {world_size} is not divisible by teacher.parallel's TP {t_tp} x "
                     f"PP {t_pp}: this run would not start")
    for role, model in (("student", cfg.model), ("teacher", cfg.teacher.model)):
        n = parameter_count(model, tp)
        lines.append(f"# {role}: {n['total'] / 1e9:.3f} B parameters ({model.num_hidden_layers} layers of "
                     f"{n['per_layer'] / 1e6:.2f} M, embedding {n['embedding'] / 1e6:.1f} M, "
                     + ("LM head tied)" if model.tie_word_embeddings else f"LM head {n['lm_head'] / 1e6:.1f} M)"))
    memory = memory_per_rank(cfg, world_size)
    lines.append(f"# memory per rank, roughly: {sum(memory.values()) / GIB:.2f} GiB for all parts together (every "
                 "sequence at max_prompt_length + max_new_tokens; each phase holds some of them: "
                 "`megatron-gndpo plan --config` gives the peak)")
    lines += [f"#   {name}: {size / GIB:.2f} GiB" for name, size in memory.items()]
    if cfg.teacher.offload:
        lines.append("#   (teacher.offload: the teacher's weights live in host memory outside its scoring phase)")
    return "\n".join(lines)
