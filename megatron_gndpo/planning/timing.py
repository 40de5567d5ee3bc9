"""Seconds per phase of one step on one DP rank (all DP ranks run in parallel), and the step's throughput.

- rollout prefill: ``2 N`` FLOPs per prompt token (``model.matmul_flops_per_token``) at ``forward_mfu``;
- rollout decode, one token per row per step: the larger of the HBM traffic (the rank's weights and the
  rows' KV cache at its mean length, ``/ hbm_bytes_per_s``) and the embedded sampler's host time
  (``decode_host_s_per_layer x L``), plus two TP all-reduces per layer at ``collective_latency_s`` each;
  pipeline stages decode one after another, so PP does not shorten it;
- teacher scoring and the student's old log-probs: forward FLOPs over every token at ``forward_mfu``;
- training: 3x forward FLOPs (4x with full recomputation) at ``train_mfu``;
- each FLOP-bound phase is divided over TP and PP and stretched by the 1F1B bubble
  ``1 + (PP - 1) / m`` (m micro-batches per pass); TP adds two all-reduces per layer forward (four with
  backward) of the activations, ``2 (TP - 1) / TP x bytes / nvlink_bytes_per_s``;
- the DP all-reduce of the fp32 gradients per optimizer step: ``2 (DP - 1) / DP x 4 P_rank / bandwidth``,
  NVLink inside a node, the network across nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.hardware import GPU, Calibration
from megatron_gndpo.planning.memory import FP32, microbatches_per_update
from megatron_gndpo.planning.model import kv_cache_bytes_per_token, matmul_flops_per_token, parameters_per_rank
from megatron_gndpo.planning.workload import Layout, Workload


@dataclass
class StepTime:
    """Seconds per phase; ``decode_bound`` says what limits a decode step ('host' or 'memory')."""

    phases: Dict[str, float]
    decode_bound: str
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return sum(self.phases.values())

    def tokens_per_s_per_gpu(self, gpus: int) -> float:
        return self.tokens_per_step / self.step_s / gpus


def _ring_all_reduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    return 0.0 if ranks == 1 else latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def _forward_s(model: ModelConfig, tokens: float, context: float, layout: Layout, gpu: GPU, mfu: float,
               passes: float, microbatches: int, activation_bytes_per_token: int, calib: Calibration) -> float:
    """``passes`` x forward FLOPs over ``tokens`` on one TP x PP x CP group, with the 1F1B bubble and the
    TP all-reduces (2 per layer and pass)."""
    compute = passes * matmul_flops_per_token(model, context) * tokens / (layout.tp * layout.pp * layout.cp)
    seconds = compute / (gpu.peak_bf16_flops * mfu) * (1 + (layout.pp - 1) / microbatches)
    per_layer = tokens / layout.cp * model.hidden_size * activation_bytes_per_token / microbatches
    reduces = 2 * passes * model.num_hidden_layers * microbatches
    return seconds + reduces * _ring_all_reduce_s(per_layer, layout.tp, gpu.nvlink_bytes_per_s,
                                                  calib.collective_latency_s)


def estimate_time(student: ModelConfig, teacher: ModelConfig, layout: Layout, work: Workload, gpu: GPU,
                  calib: Calibration = Calibration()) -> StepTime:
    """Seconds per phase of one step (see the module docstring)."""
    rows = work.rows / layout.dp
    e = work.param_bytes
    phases = {}
    phases["rollout prefill"] = (matmul_flops_per_token(student, work.max_prompt / 2) * rows * work.max_prompt
                                 / (layout.tp * gpu.peak_bf16_flops * calib.forward_mfu))
    weights = parameters_per_rank(student, layout.tp, 1) * e
    kv = rows * (work.max_prompt + work.max_response / 2) * kv_cache_bytes_per_token(student, layout.tp, 1, e)
    memory_s = (weights + kv) / gpu.hbm_bytes_per_s
    host_s = calib.decode_host_s_per_layer * student.num_hidden_layers
    tp_s = 2 * student.num_hidden_layers * (calib.collective_latency_s if layout.tp > 1 else 0.0)
    phases["rollout decode"] = work.max_response * (max(memory_s, host_s) + tp_s)
    tokens = rows * work.sequence
    context = work.sequence / 2
    scoring_mb = max(math.ceil(rows / work.microbatch_rows), 1)
    phases["teacher scoring"] = _forward_s(teacher, tokens, context, layout, gpu, calib.forward_mfu, 1, scoring_mb,
                                           e, calib)
    phases["old log-probs"] = _forward_s(student, tokens, context, layout, gpu, calib.forward_mfu, 1, scoring_mb,
                                         e, calib)
    train_mb = microbatches_per_update(layout, work)
    phases["train"] = work.mini_batches * _forward_s(student, tokens / work.mini_batches, context, layout, gpu,
                                                     calib.train_mfu, 4 if work.recompute else 3, train_mb, e, calib)
    bandwidth = gpu.nvlink_bytes_per_s if layout.gpus <= gpu.gpus_per_node else gpu.network_bytes_per_s
    grads = parameters_per_rank(student, layout.tp, layout.pp) * FP32
    phases["gradient all-reduce"] = work.mini_batches * _ring_all_reduce_s(grads, layout.dp * layout.cp, bandwidth,
                                                                           calib.collective_latency_s)
    return StepTime(phases, "host" if host_s >= memory_s else "memory", work.rows * work.sequence)
