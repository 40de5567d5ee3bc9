"""``collectives.all_reduce`` in a real 2-rank gloo world: the world must be named, None is one process."""

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def _reduce(groups):
    from megatron_gndpo.distributed.collectives import all_reduce, group_rank, group_size

    rank = dist.get_rank()
    mine = torch.tensor([rank + 1.0, -rank - 1.0])
    out = {op: all_reduce(mine.clone(), getattr(dist.ReduceOp, op), dist.group.WORLD).tolist()
           for op in ("SUM", "MAX", "MIN")}
    out["none"] = all_reduce(mine.clone(), dist.ReduceOp.SUM, None).tolist()
    out["size_rank"] = (group_size(dist.group.WORLD), group_rank(dist.group.WORLD), group_size(None), group_rank(None))
    return out


def test_world_reduces_and_none_does_not():
    for rank, out in enumerate(run_distributed(_reduce, 2)):
        assert out["SUM"] == [3.0, -3.0] and out["MAX"] == [2.0, -1.0] and out["MIN"] == [1.0, -2.0]
        assert out["none"] == [rank + 1.0, -rank - 1.0], "group=None is this process alone"
        assert out["size_rank"] == (2, rank, 1, 0)
