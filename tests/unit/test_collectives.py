"""``megatron_gndpo.distributed.collectives``: ``group=None`` is one process, and it is the project's
only all-reduce helper."""

import pathlib
import re

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.distributed import collectives

PACKAGE = pathlib.Path(collectives.__file__).resolve().parents[1]
GROUP = object()


@pytest.fixture
def calls(monkeypatch):
    """A fake world of 2 ranks that records the all-reduces (they change nothing)."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((op, group)))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    return seen


def test_group_none_is_one_process_even_in_a_world_of_many(calls):
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t) is t and collectives.all_reduce(t, dist.ReduceOp.MAX, None) is t
    assert calls == [], "group=None must not reach torch.distributed (which reads it as the world)"
    assert collectives.group_size(None) == 1 and collectives.group_rank(None) == 0
    assert collectives.group_size(GROUP) == 2 and collectives.group_rank(GROUP) == 1


def test_a_group_is_reduced_with_the_op_given(calls):
    t = torch.ones(3)
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN):
        assert collectives.all_reduce(t, op, GROUP) is t
    assert collectives.all_reduce(t, group=GROUP) is t
    assert calls == [(dist.ReduceOp.SUM, GROUP), (dist.ReduceOp.MAX, GROUP), (dist.ReduceOp.MIN, GROUP),
                     (dist.ReduceOp.SUM, GROUP)]


def test_a_group_of_one_rank_makes_no_call(calls, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    collectives.all_reduce(torch.ones(1), group=GROUP)
    assert calls == []


# Files that still call torch.distributed's all_reduce themselves, each with why.
STILL_DIRECT = {
    "distributed/collectives.py": "the helper itself",
    "models/weights.py": "group=None there means the whole world (dist.is_initialized() guards it)",
}


def test_no_other_all_reduce_helper_in_the_package():
    """One meaning of group=None: no private all-reduce helpers, no direct torch.distributed calls."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        src = path.read_text()
        if re.search(r"def _?all_reduce\w*\(", src) and rel != "distributed/collectives.py":
            found[rel] = "defines an all-reduce helper"
        elif re.search(r"\bdist\.all_reduce\(", src) and rel not in STILL_DIRECT:
            found[rel] = "calls dist.all_reduce"
    assert found == {}, f"use megatron_gndpo.distributed.collectives.all_reduce: {found}"
