"""Train a student by on-policy distillation (GNDPO by default).

    megatron-gndpo train --config examples/configs/demo_gndpo.yaml [--resume] [key=value ...]
    torchrun --nproc-per-node 8 --nnodes N ... -m megatron_gndpo.train --config CONFIG.yaml

The same command runs as a single process, under torchrun on one node or many, on GPUs (nccl) or
CPUs (gloo). Overrides are dotted config keys, e.g. ``trainer.steps=10 rollout.n_samples=4``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_gndpo.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see examples/configs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in trainer.save_dir (or output_dir/checkpoints)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")


def run(args: argparse.Namespace) -> int:
    from megatron_gndpo.trainer.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-gndpo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
