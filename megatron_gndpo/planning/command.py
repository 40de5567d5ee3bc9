"""``megatron-gndpo plan``: parse the command line (and optionally a run config), estimate every candidate
layout, print the ranking as text or JSON. Flags given on the command line win over the config's values,
which win over ``Workload``'s defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict

from megatron_gndpo.planning.architecture import read_architecture
from megatron_gndpo.planning.hardware import GPUS, Calibration
from megatron_gndpo.planning.layouts import candidate_layouts, evaluate, rank
from megatron_gndpo.planning.report import plan_dict, plan_text
from megatron_gndpo.planning.workload import Workload, workload_from_config

# flag -> Workload field it sets
WORKLOAD_FLAGS = {"prompts_per_step": "prompts_per_step", "samples": "samples", "max_prompt": "max_prompt",
                  "max_response": "max_response", "micro_batch_size": "micro_batch_size",
                  "max_tokens_per_microbatch": "max_tokens_per_microbatch",
                  "mini_batches": "mini_batches", "teacher_weights": "teacher", "top_k": "top_k",
                  "teacher_tp": "teacher_tp", "teacher_pp": "teacher_pp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", help="Hugging Face model directory (config.json) or converted checkpoint "
                                          "(default: the --config's model)")
    parser.add_argument("--teacher", help="likewise for the teacher (default: the --config's teacher.model)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    for flag in ("tp", "pp"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"fix {flag.upper()} (default: try every one)")
    parser.add_argument("--cp", type=int, default=None, help="context-parallel size (default: the --config's, else 1)")
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="responses per prompt")
    parser.add_argument("--max-prompt", type=int, default=None, help="prompt tokens per row")
    parser.add_argument("--max-response", type=int, default=None, help="response tokens per row")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=None,
                        help="micro-batches by a token budget (trainer.max_tokens_per_microbatch) instead of rows")
    parser.add_argument("--mini-batches", type=int, default=None, help="optimizer steps per rollout")
    parser.add_argument("--teacher-weights", choices=("bf16", "fp8", "offload"), default=None)
    for flag in ("tp", "pp"):
        parser.add_argument(f"--teacher-{flag}", type=int, default=None,
                            help=f"the teacher's own {flag.upper()} (teacher.parallel; default: the student's)")
    parser.add_argument("--top-k", type=int, default=None, help="teacher top-k log-probs kept per token")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--config", default=None, help="a run's YAML config: its models, batch shape and layout")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (docs/planning.md)")


def _from_config(path: str) -> tuple:
    """(student, teacher, Workload fields, parallel fields) of a run config."""
    from megatron_gndpo.config.loader import load_config

    cfg = load_config(path)
    parallel = {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                "cp": cfg.parallel.context_parallel_size}
    return cfg.model, cfg.teacher.model, dataclasses.asdict(workload_from_config(cfg)), parallel


def build_plan(args: argparse.Namespace) -> Dict[str, Any]:
    """The plan ``args`` ask for (raises ValueError / OSError naming what is wrong)."""
    student = teacher = None
    fields: Dict[str, Any] = {}
    tp, pp, cp = args.tp, args.pp, args.cp
    if args.config:
        student, teacher, fields, parallel = _from_config(args.config)
        tp, pp, cp = tp or parallel["tp"], pp or parallel["pp"], cp or parallel["cp"]
    cp = cp or 1
    student = read_architecture(args.student) if args.student else student
    teacher = read_architecture(args.teacher) if args.teacher else teacher
    if student is None or teacher is None:
        raise ValueError("name --student and --teacher (or a --config with both models)")
    fields.update({field: getattr(args, flag) for flag, field in WORKLOAD_FLAGS.items()
                   if getattr(args, flag) is not None})
    fields["recompute"] = args.recompute or fields.get("recompute", False)
    work = Workload(**fields)
    layouts = candidate_layouts(args.gpus, tp, pp, cp)
    if not layouts:
        raise ValueError(f"{args.gpus} GPUs do not split into TP {tp or '*'} x PP {pp or '*'} x CP {cp} x DP")
    gpu, calibration = GPUS[args.gpu], Calibration()
    ranked = rank([evaluate(student, teacher, layout, work, gpu, calibration) for layout in layouts])
    return plan_dict(student, teacher, gpu, work, calibration, ranked)


def run(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(plan, indent=2) if args.json else plan_text(plan), flush=True)
    return 0 if plan["best"] is not None else 1
