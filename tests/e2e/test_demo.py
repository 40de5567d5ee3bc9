import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_demo_runs_as_a_single_process_without_torchrun():
    r = _run([sys.executable, "-m", "megatron_gndpo.demo", "--new-tokens", "4", "parallel.tensor_model_parallel_size=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "log pi_T - log pi_S (TP=1)" in r.stdout and "'valid_tokens': 16.0" in r.stdout


@pytest.mark.distributed
def test_demo_under_torchrun_with_tp2():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = _run([torchrun, "--nproc-per-node", "2", "-m", "megatron_gndpo.demo", "--new-tokens", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(TP=2)" in r.stdout and "'adv_std': 1.0" in r.stdout
