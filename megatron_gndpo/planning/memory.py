"""Memory per GPU, by part and by phase, for the largest rank of a layout (the first or last pipeline
stage). Every row is taken at full length; the phases are the step's:

- ``rollout``: persistent + the student's KV cache for the rank's rows + one decode step's logits;
- ``teacher``: persistent + the teacher's forward over one micro-batch (+ its weights when offloaded);
- ``train``: persistent + the student's activations and logits of the micro-batches in flight;

where persistent = student weights, gradients, optimizer state, the teacher's resident weights and the
per-token scores kept between phases. The peak is the largest phase, plus ``Calibration.reserved_bytes``.
Activations assume flash / SDPA attention (no ``[S, S]`` scores kept; megatron's unfused attention needs
``a S^2`` more per layer) and no dropout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.hardware import Calibration, GPU
from megatron_gndpo.planning.model import (kv_cache_bytes_per_token, linear_parameters_per_rank,
                                           parameters_per_rank)
from megatron_gndpo.planning.workload import Layout, Workload

FP32 = 4


@dataclass
class MemoryEstimate:
    """Bytes per GPU. ``parts`` are what the phases are made of; ``phases`` their sums."""

    parts: Dict[str, float]
    phases: Dict[str, float]
    activations: Dict[str, float]
    """The student's activations with and without full recomputation (``parts`` holds the chosen one)."""
    reserved: float
    capacity: float
    peak_phase: str = field(init=False)
    peak: float = field(init=False)

    def __post_init__(self):
        self.peak_phase = max(self.phases, key=self.phases.get)
        self.peak = self.phases[self.peak_phase] + self.reserved

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def shortfall(self) -> Optional[str]:
        """What does not fit, in words (None when it fits): the phase at the peak and its largest parts."""
        if self.fits:
            return None
        parts = PHASE_PARTS[self.peak_phase]
        largest = sorted(parts, key=lambda p: -self.parts[p])[:3]
        return (f"the {self.peak_phase} phase needs {self.peak / 2**30:.1f} GiB of {self.capacity / 2**30:.1f} "
                f"GiB (largest: " + ", ".join(f"{p} {self.parts[p] / 2**30:.1f} GiB" for p in largest) + ")")


PERSISTENT = ("student weights", "student gradients", "optimizer state", "teacher weights (resident)", "score cache")
PHASE_PARTS = {
    "rollout": PERSISTENT + ("rollout KV cache", "rollout logits"),
    "teacher": PERSISTENT + ("teacher weights (loaded to score)", "teacher activations and logits"),
    "train": PERSISTENT + ("activations", "logits"),
}


def model_state_bytes(model: ModelConfig, layout: Layout, work: Workload) -> Dict[str, float]:
    """The student's weights (``param_bytes`` each), fp32 gradients (megatron's DDP reduces in fp32),
    and optimizer state: two fp32 Adam moments, plus fp32 main weights when the weights are bf16;
    with the distributed optimizer those are split over the DP x CP ranks."""
    n = parameters_per_rank(model, layout.tp, layout.pp)
    optimizer = 2 * FP32 + (FP32 if work.param_bytes < FP32 else 0)
    shards = layout.dp * layout.cp if work.distributed_optimizer else 1
    return {"student weights": n * work.param_bytes, "student gradients": n * FP32,
            "optimizer state": n * optimizer / shards}


def layer_activation_values(model: ModelConfig, tp: int, sequence_parallel: bool, transformer_impl: str) -> float:
    """Values one decoder layer keeps per token for its backward.

    Transformer Engine (fused norm + linear, fused SwiGLU input): the inputs of both norms and of QKV and
    fc1 (4h, split over TP with sequence parallelism), q, k, v ((a + 2g)d / TP), the attention output
    (ad / TP), fc1's output and the SwiGLU output (3f / TP).

    megatron's local spec (unfused; what the CPU runs use): each RMSNorm keeps its input and its
    normalised value besides the output the next linear keeps (6h), the attention output is kept twice
    (the attention's own and the projection's input after the head transpose: 2ad), and the SwiGLU keeps
    fc1's output, silu(gate) and the product (5f): ``6h + (a + 2g)d + 2ad + 5f`` (within 3% of a
    measured CPU layer, ``tests/distributed/test_plan_memory.py``)."""
    h, a, g, d, f = (model.hidden_size, model.num_attention_heads, model.num_key_value_heads, model.head_dim,
                     model.intermediate_size)
    if transformer_impl == "local":
        replicated, sharded = 6 * h, (a + 2 * g) * d + 2 * a * d + 5 * f
    else:
        replicated, sharded = 4 * h, (a + 2 * g) * d + a * d + 3 * f
    return replicated / (tp if sequence_parallel else 1) + sharded / tp


def microbatches_per_update(layout: Layout, work: Workload) -> int:
    """Micro-batches per optimizer step on one DP rank."""
    rows = work.rows // layout.dp // work.mini_batches
    return max(math.ceil(rows / work.microbatch_rows), 1)


def logits_bytes(model: ModelConfig, layout: Layout, work: Workload, rows: float) -> float:
    """One pass's logits shard (``rows S / CP`` tokens x ``V_pad / TP``): the output layer's in the
    weights' dtype, its ``[b, s]`` transposed copy (GPTModel's return value), and the float32 buffer the
    vocab-parallel log-prob keeps (``exp(x - m)``, which its backward turns into the logits' gradient in
    place)."""
    vocab = model.padded_vocab_size(layout.tp) // layout.tp
    return rows * work.sequence / layout.cp * vocab * (2 * work.param_bytes + FP32)


def training_pass_bytes(model: ModelConfig, layout: Layout, work: Workload, recompute: bool) -> Dict[str, float]:
    """The student's activations and logits during its forward / backward, on the stage where they are
    largest. Each micro-batch is ``mbs S / CP`` tokens (``mbs``: ``Workload.microbatch_rows``); a stage runs
    ``L / PP`` layers of ``layer_activation_values``, and under 1F1B the first stage holds ``min(PP, micro-batches)``
    micro-batches in flight, the last stage one, plus the final norm's input and output (2h per token)
    and the logits. With full recomputation a layer keeps only its input (h per token) and one layer's
    full activations are live while it is recomputed."""
    tokens = work.microbatch_rows * work.sequence / layout.cp
    layers = model.num_hidden_layers // layout.pp
    full = layer_activation_values(model, layout.tp, work.sequence_parallel, work.transformer_impl)
    kept = model.hidden_size / (layout.tp if work.sequence_parallel else 1) if recompute else full

    def stage(in_flight: int) -> float:
        return tokens * (kept * layers * in_flight + (full if recompute else 0)) * work.param_bytes

    last = {"activations": stage(1) + tokens * 2 * model.hidden_size * work.param_bytes,
            "logits": logits_bytes(model, layout, work, work.microbatch_rows)}
    if layout.pp == 1:
        return last
    first = {"activations": stage(min(layout.pp, microbatches_per_update(layout, work))), "logits": 0.0}
    return max(first, last, key=lambda p: sum(p.values()))


def teacher_weight_bytes(teacher: ModelConfig, layout: Layout, work: Workload) -> float:
    """The teacher's weights on one rank: ``param_bytes`` each, or with FP8 one byte per decoder-linear
    weight (embedding, LM head and norms keep ``param_bytes``)."""
    n = parameters_per_rank(teacher, layout.tp, layout.pp)
    if work.teacher == "fp8":
        linear = linear_parameters_per_rank(teacher, layout.tp, layout.pp)
        return linear + (n - linear) * work.param_bytes
    return n * work.param_bytes


def estimate_memory(student: ModelConfig, teacher: ModelConfig, layout: Layout, work: Workload, gpu: GPU,
                    calibration: Calibration = Calibration()) -> MemoryEstimate:
    """Bytes per GPU of each part and phase (see the module docstring)."""
    rows = work.rows / layout.dp  # each DP rank's share of the step
    parts = model_state_bytes(student, layout, work)
    teacher_bytes = teacher_weight_bytes(teacher, layout, work)
    parts["teacher weights (resident)"] = 0.0 if work.teacher == "offload" else teacher_bytes
    # teacher, old and rollout log-probs and the advantages per token (+ the teacher's top-k ids and values)
    per_token = 4 * FP32 + (work.top_k * (FP32 + 8) if work.top_k else 0)
    parts["score cache"] = rows * work.sequence * per_token
    parts["rollout KV cache"] = rows * work.sequence * kv_cache_bytes_per_token(student, layout.tp, layout.pp,
                                                                                work.param_bytes)
    parts["rollout logits"] = rows * student.padded_vocab_size(layout.tp) // layout.tp * FP32
    parts["teacher weights (loaded to score)"] = teacher_bytes if work.teacher == "offload" else 0.0
    mb = work.microbatch_rows
    teacher_layer = layer_activation_values(teacher, layout.tp, work.sequence_parallel, work.transformer_impl)
    parts["teacher activations and logits"] = (mb * work.sequence / layout.cp * teacher_layer * work.param_bytes
                                               + logits_bytes(teacher, layout, work, mb))
    passes = {"no_recompute": training_pass_bytes(student, layout, work, recompute=False),
              "recompute": training_pass_bytes(student, layout, work, recompute=True)}
    parts.update(passes["recompute" if work.recompute else "no_recompute"])
    activations = {k: p["activations"] for k, p in passes.items()}
    phases = {phase: sum(parts[p] for p in names) for phase, names in PHASE_PARTS.items()}
    return MemoryEstimate(parts, phases, activations, calibration.reserved_bytes, gpu.memory_bytes)
