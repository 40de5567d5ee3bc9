"""The planner's estimate of one cell: ``planning``'s model evaluated at the cell's own layout and step
(``workload_from_config`` on its resolved RunConfig), kept as the plan JSON (``megatron-gndpo.plan/1``,
``docs/planning.md``) and as the few figures the report compares with the measured ones."""

from __future__ import annotations

import re
from typing import Any, Dict

from megatron_gndpo.config.schema import RunConfig
from megatron_gndpo.planning.hardware import GPUS, Calibration
from megatron_gndpo.planning.layouts import evaluate
from megatron_gndpo.planning.report import plan_dict
from megatron_gndpo.planning.workload import Layout, workload_from_config


def plan_cell(cfg: RunConfig, dp: int, gpu: str) -> Dict[str, Any]:
    """The plan of ``cfg`` at TP x PP x CP (from its config) x ``dp`` on ``gpu``: one candidate layout."""
    if gpu not in GPUS:
        raise ValueError(f"plan.gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    par = cfg.parallel
    layout = Layout(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                    cp=par.context_parallel_size, dp=dp)
    work, calibration = workload_from_config(cfg), Calibration()
    candidate = evaluate(cfg.model, cfg.teacher.model, layout, work, GPUS[gpu], calibration)
    return plan_dict(cfg.model, cfg.teacher.model, GPUS[gpu], work, calibration, [candidate])


def plan_summary(plan: Dict[str, Any]) -> Dict[str, Any]:
    """``plan/*`` figures of a one-layout plan: GPU, whether it fits, peak GiB, step seconds (and per phase,
    named in file-name-safe words), tokens/s per GPU, why it was rejected. Missing estimates (an invalid
    layout) are None."""
    entry = plan["layouts"][0]
    memory, time = entry["memory_gib"] or {}, entry["time_s"] or {}
    out = {"plan/gpu": plan["gpu"]["name"], "plan/fits": memory.get("fits"), "plan/peak_gib": memory.get("peak"),
           "plan/step_s": time.get("step"), "plan/tokens_per_s_per_gpu": entry["tokens_per_s_per_gpu"],
           "plan/rejected": "; ".join(entry["rejected"]) or None}
    for phase, seconds in (time.get("phases") or {}).items():
        out[f"plan/time/{re.sub('[^a-z0-9]+', '_', phase)}_s"] = seconds
    return out
