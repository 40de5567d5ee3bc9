"""Train a student by on-policy distillation (GNDPO by default).

    megatron-gndpo train --config examples/configs/demo.yaml [--resume] [--print-config] [key=value ...]
    torchrun --nproc-per-node 8 --nnodes N ... -m megatron_gndpo.train --config CONFIG.yaml

The same command runs as a single process, under torchrun on one node or many, on GPUs (nccl) or
CPUs (gloo). Overrides are dotted config keys, e.g. ``trainer.steps=10 rollout.n_samples=4``.

A fresh run refuses a checkpoint directory that holds an earlier run's checkpoints (``--resume``
continues that run, ``trainer.overwrite=true`` replaces it), and a directory another run is using.
A mistake in the config or the setup is one line, ``error: ...``, printed once, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# What megatron-core prints at import and at model build about optional packages and a deprecated default
# of its own, and torch's deprecations inside megatron's checkpoint loader: on every rank of every
# command, and nothing a user of this project can act on.
MEGATRON_NOISE = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"`load_state_dict` is deprecated", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)


def quiet_megatron() -> None:
    """Filters that noise by message (other warnings still show); call it before megatron is first
    imported."""
    for message, category in MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see examples/configs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in trainer.save_dir (or output_dir/checkpoints)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, the layout, parameter counts and a rough memory estimate "
                             "per rank, then exit without building the models")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --print-config: the number of processes to plan for (default: torchrun's "
                             "WORLD_SIZE, or 1)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def configure_logging() -> None:
    """Timestamped log lines; this project's INFO lines (checkpoint saved, ...) from rank 0 only, since
    every rank would print the same."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_gndpo").setLevel(logging.INFO if global_rank() == 0 else logging.WARNING)


def report_error(error: BaseException, *, show: bool) -> None:
    """``error: ...`` on stderr, without a traceback: for mistakes in the config or the setup, whose
    message says what to change."""
    if show:
        print(f"error: {error}", file=sys.stderr, flush=True)


def stop_together(error: BaseException) -> int:
    """For a SetupError, which every rank raises with the failing rank's message: rank 0 prints it, and
    the ranks leave together, since a rank that exits first has the launcher kill rank 0, perhaps
    before it printed. Returns the exit status, 2."""
    import torch.distributed as dist

    report_error(error, show=global_rank() == 0)
    if dist.is_initialized():
        dist.barrier()
    return 2


def load_run_config(args: argparse.Namespace):
    """The resolved config, or None after reporting a config mistake (from rank 0: every rank has the same)."""
    import yaml

    from megatron_gndpo.config import load_config

    try:
        return load_config(args.config, args.overrides)
    except (ValueError, OSError, yaml.YAMLError) as e:
        report_error(e, show=global_rank() == 0)
        return None


def run(args: argparse.Namespace) -> int:
    configure_logging()
    cfg = load_run_config(args)
    if cfg is None:
        return 2
    if args.print_config:
        from megatron_gndpo.trainer.dry_run import describe_run

        if global_rank() == 0:
            print(describe_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
        return 0

    import torch.distributed as dist

    from megatron_gndpo.trainer.preflight import SetupError
    from megatron_gndpo.trainer.trainer import CheckpointSaveError, Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except SetupError as e:
        return stop_together(e)
    except ValueError as e:
        # Before the process group exists an error can only come from the config and the environment,
        # the same on every rank; after, it may be this rank's own.
        if dist.is_initialized() and dist.get_world_size() > 1:
            e = ValueError(f"rank {global_rank()}: {e}")
        report_error(e, show=global_rank() == 0 or dist.is_initialized())
        return 2
    try:
        trainer.train()
    except CheckpointSaveError as e:
        report_error(e, show=not e.details_elsewhere)
        return 1
    finally:
        trainer.close()
    return 0


def main(argv=None) -> int:
    quiet_megatron()
    parser = argparse.ArgumentParser(prog="megatron-gndpo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))  # overrides on both sides of --resume


if __name__ == "__main__":
    sys.exit(main())
