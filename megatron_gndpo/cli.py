"""``megatron-gndpo``: the project's command line.

    megatron-gndpo train --config CONFIG.yaml [--resume] [--print-config] [key=value ...]
    megatron-gndpo eval --config CONFIG.yaml --checkpoint CKPT [--out FILE.json] [--limit N] [key=value ...]
    megatron-gndpo convert {hf-to-megatron,megatron-to-hf,reshard,verify} ...
    megatron-gndpo plan --student S --teacher T --gpus N --gpu h100|h200|a100 [--tp --pp --cp] [--json] ...
    megatron-gndpo sweep GRID.yaml --out DIR [--submit] [--dry-run]
    megatron-gndpo report DIR... --out REPORT_DIR [--overwrite]

``eval`` runs under torchrun too (``torchrun ... -m megatron_gndpo.cli eval ...``) for a TP x PP layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (model, data.val_files, tokenizer, "
                                                        "reward, rollout.max_new_tokens)")
    parser.add_argument("--checkpoint", required=True,
                        help="a step checkpoint (RUN/checkpoints/step_N) or a checkpoint directory with `latest`")
    parser.add_argument("--out", default=None,
                        help="JSON file for the metrics (default: trainer.output_dir/eval_<checkpoint>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts (default: all)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")


def run_eval(args: argparse.Namespace) -> int:
    """Greedy validation of a checkpoint's student on data.val_files: metrics printed and written to JSON."""
    from megatron_gndpo import train
    from megatron_gndpo.checkpoint.dist_ckpt import resolve_checkpoint
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.evaluation import evaluate_checkpoint, write_json
    from megatron_gndpo.trainer.preflight import SetupError

    train.configure_logging()
    cfg = train.load_run_config(args)
    if cfg is None:
        return 2
    if args.limit is not None and args.limit < 1:
        train.report_error(ValueError(f"--limit must be >= 1, got {args.limit}"), show=train.global_rank() == 0)
        return 2
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except (ValueError, OSError) as e:
        train.report_error(e, show=train.global_rank() == 0)
        return 2
    out = Path(args.out or Path(cfg.trainer.output_dir) / f"eval_{checkpoint.name}.json")
    if out.exists() and not args.overwrite:
        train.report_error(ValueError(f"{out} exists; pass --overwrite to replace it, or --out elsewhere"),
                           show=train.global_rank() == 0)
        return 2
    try:
        result = evaluate_checkpoint(cfg, str(checkpoint), limit=args.limit)
    except SetupError as e:
        return train.stop_together(e)
    try:
        if train.global_rank() == 0:
            write_json(str(out), result)
            print(json.dumps(result, indent=2), flush=True)
            print(f"metrics written to {out}", file=sys.stderr, flush=True)
    finally:
        destroy_parallel()
    return 0


def main(argv=None) -> int:
    from megatron_gndpo import train

    train.quiet_megatron()  # before anything imports megatron-core
    from megatron_gndpo.checkpoint import convert
    from megatron_gndpo.planning import command as plan
    from megatron_gndpo.scaling import report, sweep

    parser = argparse.ArgumentParser(prog="megatron-gndpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="tool", required=True)
    train.add_arguments(sub.add_parser("train", help="on-policy distillation (GNDPO / OPD)"))
    add_eval_arguments(sub.add_parser("eval", help="greedy validation of a checkpoint on data.val_files"))
    convert.add_arguments(sub.add_parser("convert", help="Hugging Face <-> megatron checkpoints"))
    plan.add_arguments(sub.add_parser("plan", help="memory and time per layout of a run, before it starts"))
    sweep.add_arguments(sub.add_parser("sweep", help="run a grid of training runs, resumably"))
    report.add_arguments(sub.add_parser("report", help="table, plots and a page of what scaled across runs"))
    # Overrides may come on both sides of a flag (`key=value --resume key=value`); argparse leaves the later
    # ones over, and its intermixed parsing does not support subcommands.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if args.tool == "train":
        return train.run(args)
    if args.tool in ("plan", "sweep", "report"):
        return {"plan": plan, "sweep": sweep, "report": report}[args.tool].run(args)
    return run_eval(args) if args.tool == "eval" else convert.run(args)


if __name__ == "__main__":
    sys.exit(main())
