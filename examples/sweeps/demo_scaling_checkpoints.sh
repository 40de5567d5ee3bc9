#!/bin/bash
# The checkpoints examples/sweeps/demo_scaling.yaml starts from, under outputs/demo/: the demo's teacher and
# hidden-64 student warm-up (the same commands and recipes as `make demo`, so its cache is reused) and a
# hidden-32 student warmed up the same way. Each step skips its work when its directory already holds the
# same checkpoint. Run from the repository root:  bash examples/sweeps/demo_scaling_checkpoints.sh [PYTHON]
set -euo pipefail
PY=${1:-python}
sft() { "$PY" examples/arithmetic/train_sft.py --config examples/configs/demo.yaml --threads 1 "$@" \
    parallel.tensor_model_parallel_size=1; }
sft --role teacher --steps 1000 --lr 3e-3 --decay cosine --out outputs/demo/teacher
sft --role student --steps 600 --lr 2e-3 --decay constant --out outputs/demo/student
sft --role student --steps 600 --lr 2e-3 --decay constant --out outputs/demo/student_h32 \
    model.hidden_size=32 model.intermediate_size=64
