"""python -m tools.checkpoint_convert {hf-to-megatron,megatron-to-hf,reshard,verify} ..."""

import sys

from megatron_gndpo.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
