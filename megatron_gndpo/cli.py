"""``megatron-gndpo``: the project's command line.

    megatron-gndpo train --config CONFIG.yaml [--resume] [key=value ...]
    megatron-gndpo convert {hf-to-megatron,megatron-to-hf,reshard} ...
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from megatron_gndpo import train
    from megatron_gndpo.checkpoint import convert

    parser = argparse.ArgumentParser(prog="megatron-gndpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="tool", required=True)
    train.add_arguments(sub.add_parser("train", help="on-policy distillation (GNDPO / OPD)"))
    convert.add_arguments(sub.add_parser("convert", help="Hugging Face <-> megatron checkpoints"))
    args = parser.parse_args(argv)
    return train.run(args) if args.tool == "train" else convert.run(args)


if __name__ == "__main__":
    sys.exit(main())
