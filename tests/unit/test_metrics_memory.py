"""The step's peak-memory metric (what the scaling report compares with the planner)."""

import subprocess
import sys

PROBE = """
import torch
from megatron_gndpo.trainer.metrics import memory_metrics
peak = lambda: memory_metrics(torch.device("cpu"))["memory/peak_rss_gib"]
before = peak()
x = torch.ones(256 * 2**20)  # 1 GiB, touched: above the peak the imports left
during = peak()
del x
print(before, during, peak())
"""


def test_cpu_peak_memory_is_the_process_high_water_mark():
    # a fresh process: its peak before the tensor (the imports', ~0.5 GiB) is below the tensor alone
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    before, during, after = map(float, out.split())
    assert before > 0.01
    assert during >= 1.0 > before  # the tensor is counted
    assert after >= during  # a high-water mark: freeing does not lower it
