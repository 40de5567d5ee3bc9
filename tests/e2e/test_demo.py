"""The training entry point as users launch it: torchrun at TP=2, and a single process."""

import json
import os
import subprocess
import sys

import pytest

from tests.trainer_setup import REPO

ARGS = ["--config", "examples/configs/demo.yaml", "teacher.checkpoint=null", "student_checkpoint=null",
        "trainer.steps=2", "trainer.prompts_per_step=4", "trainer.mini_batches=1", "trainer.micro_batch_size=16",
        "trainer.val_interval=0", "trainer.progress=false", "trainer.tensorboard=false"]


def _run(cmd, out, env=None):
    proc = subprocess.run(cmd + [f"trainer.output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/grad_norm"] > 0 for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.distributed
def test_train_under_torchrun_with_tp2(tmp_path):
    # Two ranks on CPU with gloo even on a one-GPU machine (two NCCL ranks would share one GPU).
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_gndpo.train", *ARGS],
         tmp_path / "tp2", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_train_as_a_single_process(tmp_path):
    _run([sys.executable, "-m", "megatron_gndpo.train", *ARGS, "parallel.tensor_model_parallel_size=1"],
         tmp_path / "single")
