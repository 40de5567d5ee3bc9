"""The step's peak-memory metric (what the scaling report compares with the planner)."""

import subprocess
import sys

PROBE = """
import torch
from megatron_gndpo.trainer.metrics import memory_metrics
peak = lambda: memory_metrics(torch.device("cpu"))["memory/peak_rss_gib"]
before = peak()
x = torch.ones(128 * 2**20)  # 512 MiB, touched
during = peak()
del x
print(before, during, peak())
"""


def test_cpu_peak_memory_is_the_process_high_water_mark():
    # a fresh process, whose peak before the tensor is known to be below the tensor's size plus the imports
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    before, during, after = map(float, out.split())
    assert before > 0.01
    assert during >= before + 0.45  # grew by the tensor (0.5 GiB)
    assert after >= during  # a high-water mark: freeing does not lower it
