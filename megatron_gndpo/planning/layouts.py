"""The candidate layouts of a number of GPUs, why a layout cannot run, and the ranking of those that can:
fastest step first (highest tokens/s per GPU), ties to the smaller TP x PP (less communication to go
wrong). A layout is rejected when megatron would refuse it (divisibility), when this stack cannot run
it (TP across nodes, context parallelism beside a teacher on its own layout), or when its peak memory exceeds
the GPU's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.hardware import GPU, Calibration
from megatron_gndpo.planning.memory import MemoryEstimate, estimate_memory
from megatron_gndpo.planning.timing import StepTime, estimate_time
from megatron_gndpo.planning.workload import Layout, Workload


@dataclass
class Candidate:
    """One layout, its estimates and, when it cannot run, why (``rejected``)."""

    layout: Layout
    memory: Optional[MemoryEstimate] = None
    time: Optional[StepTime] = None
    rejected: List[str] = field(default_factory=list)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(gpus: int, tp: Optional[int] = None, pp: Optional[int] = None, cp: int = 1) -> List[Layout]:
    """Every TP x PP x CP x DP = ``gpus`` with TP and PP as given, or all their divisors when not."""
    layouts = []
    for t in [tp] if tp else _divisors(gpus):
        rest = gpus // (t * cp) if gpus % (t * cp) == 0 else 0
        for p in [pp] if pp else _divisors(rest):
            if rest and rest % p == 0:
                layouts.append(Layout(tp=t, pp=p, cp=cp, dp=rest // p))
    return layouts


def layout_problems(student: ModelConfig, teacher: ModelConfig, layout: Layout, work: Workload,
                    gpu: GPU) -> List[str]:
    """Why this stack cannot run ``layout`` at all, before any estimate ([] when it can)."""
    problems = []
    if layout.cp > 1 and work.teacher_layout(layout) != layout:
        problems.append("context parallelism with the teacher on its own layout (teacher.parallel) is not built")
    if layout.tp > gpu.gpus_per_node:
        problems.append(f"TP {layout.tp} spans nodes ({gpu.gpus_per_node} GPUs each): its all-reduces per layer "
                        "would cross the network")
    t_layout = work.teacher_layout(layout)
    if t_layout.dp == 0 or t_layout.gpus != layout.gpus:
        problems.append(f"the teacher's TP {t_layout.tp} x PP {t_layout.pp} does not divide {layout.gpus} GPUs")
    elif work.rows < t_layout.dp:
        problems.append(f"{work.rows} rows per step are fewer than the teacher's DP {t_layout.dp}")
    if t_layout.tp > gpu.gpus_per_node and t_layout.tp != layout.tp:
        problems.append(f"the teacher's TP {t_layout.tp} spans nodes ({gpu.gpus_per_node} GPUs each)")
    for role, model, own in (("student", student, layout), ("teacher", teacher, t_layout)):
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(model, name) % own.tp:
                problems.append(f"{role}.{name} ({getattr(model, name)}) is not divisible by TP {own.tp}")
        if model.num_hidden_layers % own.pp:
            problems.append(f"{role}.num_hidden_layers ({model.num_hidden_layers}) is not divisible by PP {own.pp}")
    if work.rows % layout.dp or (work.rows // layout.dp) % work.mini_batches:
        problems.append(f"{work.rows} rows per step do not split into DP {layout.dp} x {work.mini_batches} "
                        "mini-batches")
    if work.sequence_parallel and layout.tp == 1:
        problems.append("sequence parallelism needs TP > 1")
    return problems


def evaluate(student: ModelConfig, teacher: ModelConfig, layout: Layout, work: Workload, gpu: GPU,
             calibration: Calibration = Calibration()) -> Candidate:
    """Estimates of one layout (none when it cannot run at all)."""
    candidate = Candidate(layout, rejected=layout_problems(student, teacher, layout, work, gpu))
    if candidate.rejected:
        return candidate
    candidate.memory = estimate_memory(student, teacher, layout, work, gpu, calibration)
    candidate.time = estimate_time(student, teacher, layout, work, gpu, calibration)
    if not candidate.memory.fits:
        candidate.rejected.append("out of memory: " + candidate.memory.shortfall())
    return candidate


def rank(candidates: List[Candidate]) -> List[Candidate]:
    """Runnable layouts fastest first, then the rejected ones (those that were estimated first)."""
    def key(c: Candidate):
        speed = -c.time.tokens_per_s_per_gpu(c.layout.gpus) if c.time else 0.0
        return (bool(c.rejected), c.time is None, speed, c.layout.tp * c.layout.pp)
    return sorted(candidates, key=key)
