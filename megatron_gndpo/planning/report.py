"""The plan as a JSON-able dict (schema ``megatron-gndpo.plan/1``, documented in ``docs/planning.md``)
and as text. Memory is in GiB, time in seconds."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.hardware import GIB, GPU, Calibration
from megatron_gndpo.planning.layouts import Candidate
from megatron_gndpo.planning.model import parameter_count
from megatron_gndpo.planning.workload import Workload

SCHEMA = "megatron-gndpo.plan/1"
CALIBRATION_SOURCE = "docs/benchmarks.md, GPU: NVIDIA H100 80GB HBM3 (2026-11-22)"


def _gib(values: Dict[str, float]) -> Dict[str, float]:
    return {k: round(v / GIB, 3) for k, v in values.items()}


def _model(model: ModelConfig) -> Dict[str, Any]:
    published = parameter_count(model, padded_vocab=False)
    return {"parameters": published["total"], "embedding": published["embedding"],
            "lm_head": published["lm_head"], "per_layer": published["per_layer"],
            "layers": model.num_hidden_layers, "tied_embeddings": model.tie_word_embeddings,
            "parameters_padded_vocab": parameter_count(model, 1)["total"]}


def _candidate(c: Candidate, position: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"layout": {**dataclasses.asdict(c.layout), "gpus": c.layout.gpus},
                           "rank": None if c.rejected else position, "rejected": list(c.rejected),
                           "memory_gib": None, "time_s": None, "tokens_per_s_per_gpu": None}
    if c.memory:
        m = c.memory
        out["memory_gib"] = {"parts": _gib(m.parts), "phases": _gib(m.phases), "activations": _gib(m.activations),
                             "reserved": round(m.reserved / GIB, 3), "peak": round(m.peak / GIB, 3),
                             "peak_phase": m.peak_phase, "capacity": round(m.capacity / GIB, 3), "fits": m.fits}
    if c.time:
        out["time_s"] = {"phases": {k: round(v, 4) for k, v in c.time.phases.items()},
                         "step": round(c.time.step_s, 4), "decode_bound": c.time.decode_bound}
        out["tokens_per_s_per_gpu"] = round(c.time.tokens_per_s_per_gpu(c.layout.gpus), 1)
    return out


def plan_dict(student: ModelConfig, teacher: ModelConfig, gpu: GPU, work: Workload, calibration: Calibration,
              ranked: List[Candidate]) -> Dict[str, Any]:
    """The plan: inputs, constants, both models' parameters and every candidate layout, ranked."""
    layouts = [_candidate(c, i + 1) for i, c in enumerate(ranked)]
    return {
        "schema": SCHEMA,
        "gpu": {"name": gpu.name, "memory_gib": round(gpu.memory_bytes / GIB, 2),
                "peak_bf16_tflops": gpu.peak_bf16_flops / 1e12, "hbm_tb_per_s": round(gpu.hbm_bytes_per_s / 1e12, 3),
                "nvlink_gb_per_s": gpu.nvlink_bytes_per_s / 1e9, "network_gb_per_s": gpu.network_bytes_per_s / 1e9,
                "gpus_per_node": gpu.gpus_per_node},
        "calibration": {**dataclasses.asdict(calibration), "source": CALIBRATION_SOURCE},
        "workload": dataclasses.asdict(work),
        "models": {"student": _model(student), "teacher": _model(teacher)},
        "layouts": layouts,
        "best": next((entry["layout"] for entry in layouts if entry["rank"] is not None), None),
    }


def plan_text(plan: Dict[str, Any]) -> str:
    """What ``plan`` prints without ``--json``."""
    g, w = plan["gpu"], plan["workload"]
    lines = [f"GPU {g['name']}: {g['memory_gib']} GiB, {g['peak_bf16_tflops']:.0f} TFLOP/s BF16, "
             f"{g['hbm_tb_per_s']} TB/s HBM; MFU train {plan['calibration']['train_mfu']:.1%} / forward "
             f"{plan['calibration']['forward_mfu']:.1%} (from {plan['calibration']['source']})",
             f"step: {w['prompts_per_step']} prompts x {w['samples']} samples, {w['max_prompt']} + "
             f"{w['max_response']} tokens, micro-batch "
             + (f"{w['max_tokens_per_microbatch']} tokens" if w.get("max_tokens_per_microbatch")
                else f"{w['micro_batch_size']}") + f", teacher {w['teacher']}"]
    for role, m in plan["models"].items():
        lines.append(f"{role}: {m['parameters'] / 1e9:.3f} B parameters ({m['layers']} layers of "
                     f"{m['per_layer'] / 1e6:.2f} M, embedding {m['embedding'] / 1e6:.1f} M, "
                     + ("tied)" if m["tied_embeddings"] else f"LM head {m['lm_head'] / 1e6:.1f} M)"))
    for entry in plan["layouts"]:
        lay = entry["layout"]
        name = f"TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']}"
        head = f"#{entry['rank']} {name}" if entry["rank"] else f"rejected {name}"
        if entry["time_s"]:
            head += (f": step {entry['time_s']['step']:.2f} s, {entry['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
                     f"peak {entry['memory_gib']['peak']:.1f} / {entry['memory_gib']['capacity']:.1f} GiB "
                     f"({entry['memory_gib']['peak_phase']})")
        lines += ["", head] + [f"  - {reason}" for reason in entry["rejected"]]
        if entry["memory_gib"]:
            mem = entry["memory_gib"]
            lines.append("  memory GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in mem["parts"].items() if v))
            lines.append(f"  activations GiB: without recompute {mem['activations']['no_recompute']:.2f}, with "
                         f"{mem['activations']['recompute']:.2f}")
            lines.append("  time s: " + ", ".join(f"{k} {v:.3f}" for k, v in entry["time_s"]["phases"].items())
                         + f" (decode {entry['time_s']['decode_bound']}-bound)")
    return "\n".join(lines)
