"""Every benchmark script runs end to end on a configuration small enough for CI and writes its JSON, so a
refactor that breaks one (an import, a renamed helper) fails here rather than in the next measurement.
The figures themselves are measured by hand and recorded in docs/benchmarks.md, never asserted.
``convert_memory.py`` is left out: it measures the converter in subprocesses of its own (~90 s even
tiny), and the converter is tested by tests/distributed/test_convert.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "context_parallel": "--rows 1 --seq 32 --hidden 32 --layers 2 --heads 4 --kv-heads 2 --vocab 256 --repeats 1",
    "continuous_batching": "--rows 4 --slots 2 --min-len 4 --max-len 16 --hidden 32 --vocab 256",
    "step_efficiency": "--rows 4 --prompt 4 --min-len 4 --max-len 32 --hidden 32 --vocab 256 --memory-vocab 1024 "
                       "--memory-seq 32 --repeats 1",
    "sampler": "--batch 2 --vocab 512 --repeats 1",
    "vocab_parallel": "--vocab 512 --tokens 16 --tp 1 2 --hidden 32 --repeats 1",
    "train_step": "--seqs 16 --steps 1 --warmup 0 --tokens-per-iter 32",
    "gndpo_step": "--prompts 2 --samples 2 --prompt-len 8 --max-new 4 --micro-batch 2 --steps 1",
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_writes_its_json(script, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", *TINY[script].split(), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()), f"{script} wrote an empty result"
