"""The pooled worlds of tests/harness.py: a rank that runs the next test inherits nothing from the last."""

from __future__ import annotations

import os
import threading

import pytest

from tests.harness import run_distributed


def _leave_traces(groups, step):
    """What a test may change in its rank: the environment, the working directory, torch's defaults, and
    megatron's process groups (each gloo group holds threads)."""
    import torch

    seen = {"env": os.environ.get("HARNESS_TRACE"), "cwd": os.getcwd(), "dtype": torch.get_default_dtype(),
            "threads": threading.active_count(), "pid": os.getpid()}
    os.environ["HARNESS_TRACE"] = str(step)
    os.chdir("/")
    torch.set_default_dtype(torch.float64)
    return seen


def _fails(groups):
    raise ValueError("this rank fails")


def test_a_pooled_rank_inherits_nothing_from_the_previous_call():
    first = run_distributed(_leave_traces, 2, tp=2, args=(1,))
    later = [run_distributed(_leave_traces, 2, args=(step,)) for step in (2, 3)]
    for before, after in zip(first, later[-1]):
        assert after["pid"] == before["pid"]  # the same process ran all three calls
        assert after["env"] is None and after["cwd"] == before["cwd"] and after["dtype"] == before["dtype"]
        assert after["threads"] == later[0][0]["threads"]  # no gloo group (and its threads) left behind


def test_a_failed_call_retires_its_world():
    before = run_distributed(_leave_traces, 2, args=(1,))
    with pytest.raises(RuntimeError, match="this rank fails"):
        run_distributed(_fails, 2)
    after = run_distributed(_leave_traces, 2, args=(1,))
    assert {r["pid"] for r in after}.isdisjoint(r["pid"] for r in before)
