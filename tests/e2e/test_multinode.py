"""A real two-node launch: two torchrun agents meeting through the c10d rendezvous, one process each,
train exactly as one torchrun agent with two processes does."""

from __future__ import annotations

import json

import pytest

from megatron_gndpo.distributed.init import free_port
from tests.e2e.run_helpers import (assert_same_checkpoint, finish, launcher, metric_rows, torchrun, train_command,
                                   write_config)

STEPS = 2


@pytest.mark.distributed
def test_two_nodes_equal_one_node_with_two_processes(tmp_path):
    config = write_config(tmp_path)
    common = (f"trainer.steps={STEPS}", "parallel.tensor_model_parallel_size=1")  # TP=1 x DP=2
    rendezvous = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", f"gndpo-{tmp_path.name}")
    # c10d hands out the global ranks in the order the agents join (--node-rank is for the static
    # rendezvous); both agents are the same machine, so either order trains the same.
    runs = {f"node{r}": torchrun(*rendezvous, "--node-rank", str(r)) for r in (0, 1)}
    # A free port rather than torchrun's default 29500, which another run on this machine may hold.
    runs["single"] = torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    out = {"node0": two, "node1": two, "single": one}
    # All three launches at once: the agents must be up together anyway, and the single-node run is independent.
    with launcher() as launch:
        procs = {name: launch(train_command(config, f"trainer.output_dir={out[name]}", *common, prefix=prefix),
                              tmp_path / f"{name}.log")
                 for name, prefix in runs.items()}
        for name, proc in procs.items():
            finish(proc, tmp_path / f"{name}.log", timeout_s=240)

    final = f"checkpoints/step_{STEPS:08d}"
    assert json.loads((two / final / "gndpo_meta.json").read_text())["layout"] == {"tp": 1, "pp": 1, "dp": 2, "cp": 1}
    rows = metric_rows(two)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["actor/grad_norm"] > 0 for r in rows)
    assert rows == metric_rows(one)  # rewards, losses, grad norms, score and advantage statistics: equal
    assert_same_checkpoint(two / final, one / final)
