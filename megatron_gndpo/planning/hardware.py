"""The GPUs a plan is made for, and the constants the estimates rest on, each with its source.

Calibration (``docs/benchmarks.md``, section "GPU: NVIDIA H100 80GB HBM3", measured 2026-11-22 on one
H100 SXM with torch 2.11, megatron-core 0.19.2, Transformer Engine 2.12):

- training: TE BF16, 1.5B (Qwen2.5 shapes) at 4096 tokens per sequence, 26.3% MFU (25,188 tokens/s);
- forward-only scoring: TE BF16 teacher, 1.5B at 4096, 28.1% MFU (80,742 tokens/s);
- rollout: one whole GNDPO step (0.5B student, 1.5B teacher, 64 rows, 512 new tokens) spent 25.42 s of
  27.30 s in the rollout, 50 ms per decode step where reading the weights and the KV cache takes well under
  1 ms: the embedded sampler is host-bound (megatron's per-layer module calls, one host sync per token).
  25.42 s / 512 steps / 24 layers = 2.07 ms of host time per layer per decode step;
- a device-to-device copy reached 3.0 TB/s (read + write), 90% of the 3.35 TB/s datasheet figure.

The MFUs are fractions of the dense BF16 datasheet peak and are assumed to carry over to the other GPUs and
layouts (a smaller model or shorter sequence runs at lower MFU: 0.5B at 4096 trained at 12.5%, so the
estimates are optimistic there). Bandwidths other than the H100's HBM are datasheet figures scaled by the
same 90%; interconnect figures are NCCL bus bandwidths typical of each fabric, not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator as the estimates see it."""

    name: str
    """What the command line calls it."""
    memory_bytes: int
    """HBM capacity."""
    peak_bf16_flops: float
    """Dense BF16 tensor-core peak (datasheet), FLOP/s: what MFU is a fraction of."""
    hbm_bytes_per_s: float
    """Achievable HBM bandwidth (datasheet x HBM_EFFICIENCY; measured on the H100)."""
    nvlink_bytes_per_s: float
    """NCCL all-reduce bus bandwidth between GPUs of one node (NVLink / NVSwitch)."""
    network_bytes_per_s: float
    """NCCL all-reduce bus bandwidth per GPU between nodes (InfiniBand, one NIC per GPU)."""
    gpus_per_node: int = 8
    """TP groups stay inside a node; data parallelism beyond it crosses the network."""


# 3.0 TB/s measured against the H100 SXM's 3.35 TB/s datasheet figure
HBM_EFFICIENCY = 3.0e12 / 3.35e12

GPUS: Dict[str, GPU] = {
    # H100 SXM 80GB: 989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3, NVLink 4 (450 GB/s each way), 400 Gb/s NDR IB
    "h100": GPU("h100", 80 * GIB, 989.4e12, 3.0e12, 360e9, 45e9),
    # H200 SXM 141GB: same compute as the H100, 4.8 TB/s HBM3e, same NVLink and IB
    "h200": GPU("h200", 141 * 10**9, 989.4e12, 4.8e12 * HBM_EFFICIENCY, 360e9, 45e9),
    # A100 SXM 80GB: 312 TFLOP/s dense BF16, 2.04 TB/s HBM2e, NVLink 3 (300 GB/s each way), 200 Gb/s HDR IB
    "a100": GPU("a100", 80 * GIB, 312e12, 2.039e12 * HBM_EFFICIENCY, 240e9, 22e9),
}


@dataclass(frozen=True)
class Calibration:
    """The efficiency constants of the time and memory model (defaults: the H100 figures above)."""

    train_mfu: float = 0.263
    """Forward + backward of the student (TE BF16, 1.5B / 4096 tokens)."""
    forward_mfu: float = 0.281
    """Forward-only passes: teacher scoring, the student's old log-probs, the rollout's prefill."""
    decode_host_s_per_layer: float = 25.42 / 512 / 24
    """Host time of one decoder layer in one decode step of the embedded sampler (2.07 ms): a decode
    step takes the larger of this x layers and its HBM traffic."""
    collective_latency_s: float = 20e-6
    """Fixed cost of one NCCL collective (launch and synchronisation), what small decode all-reduces pay."""
    reserved_bytes: int = 2 * GIB
    """Per GPU, outside the estimate: the CUDA context, NCCL buffers, allocator fragmentation."""
