"""A run's safety in real (gloo) worlds: checks before compute stop every rank together, a fresh run
does not overwrite an earlier one, a resumed run follows its new LR horizon, a failed save says where
and why, ``megatron-gndpo eval`` scores a checkpoint as validation does, and a config mistake under
torchrun is one line."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.trainer_setup import ARCH, REPO, make_initial_checkpoints, run_config

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_safety")
    run_distributed(make_initial_checkpoints, 1, args=(str(tmp),))
    return tmp


def _config(tmp, overrides=(), **sections):
    tmp = Path(tmp)
    return run_config(tmp, overrides, student_checkpoint=str(tmp / "student"),
                      teacher={"checkpoint": str(tmp / "teacher")}, **sections)


def _trainer(cfg, resume=False):
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
    return Trainer(cfg, resume=resume)


# --- checks before compute: every rank stops, with the same message -----------------------------------

def _agree_over_two_ranks(groups):
    import torch.distributed as dist

    from megatron_gndpo.trainer.preflight import SetupError, agree

    rank = dist.get_rank()
    decided = agree("deciding", lambda: f"rank {rank} decided", rank0_only=True)

    def fails_on_rank_1():
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/probe")
        return rank

    try:
        agree("probing", fails_on_rank_1)
    except SetupError as e:
        return decided, str(e)
    return decided, None


def test_a_failure_on_one_rank_stops_every_rank():
    for decided, error in run_distributed(_agree_over_two_ranks, 2):
        assert decided == "rank 0 decided"
        assert error == "probing (rank 1): [Errno 28] No space left on device: '/scratch/probe'"


def _refusals(groups, tmp):
    import psutil
    import torch.distributed as dist

    from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet
    from megatron_gndpo.trainer.preflight import SetupError
    from megatron_gndpo.trainer.run_lock import LOCK_FILE, LockHolder

    tmp = Path(tmp)
    earlier, locked, long_prompts = tmp / "earlier", tmp / "locked", tmp / "long.parquet"
    if dist.get_rank() == 0:
        (earlier / "checkpoints" / "step_00000002").mkdir(parents=True, exist_ok=True)
        (earlier / "checkpoints" / "latest").write_text("step_00000002")
        locked.mkdir(exist_ok=True)
        parent = os.getppid()  # the test process: alive, on this host, and not this run
        (locked / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(
            LockHolder(parent, os.uname().nodename, "earlier", psutil.Process(parent).create_time()))))
        write_prompt_parquet(str(long_prompts), [verl_row([{"role": "user", "content": c}], "2", data_source="t")
                                                 for c in ("1+1=", "2+2=", "3+3=", "12+34+56=", "4+4=")])
    dist.barrier()

    def refusal(overrides):
        try:
            _trainer(_config(tmp, overrides))
        except SetupError as e:
            return str(e)
        return None

    return {
        "earlier": refusal([f"trainer.output_dir={earlier}"]),
        "locked": refusal([f"trainer.output_dir={locked}"]),
        "long": refusal([f"trainer.output_dir={tmp}/long_run", f"data.train_files=[{long_prompts}]",
                         "data.val_files=[]"]),
        "architecture": refusal([f"trainer.output_dir={tmp}/wide_run", "model.intermediate_size=96"]),
        "latest_after": (earlier / "checkpoints" / "latest").read_text(),
        "lock_after": json.loads((locked / LOCK_FILE).read_text())["pid"],
        "parent": os.getppid(),
    }


def test_setup_refusals_reach_every_rank_before_compute(workdir):
    """Two ranks: a fresh run over an earlier run's checkpoints, a directory another live process holds,
    an overlong prompt and a student checkpoint of another architecture each stop both ranks with one
    message, before any model is built, and change nothing on disk."""
    out = run_distributed(_refusals, 2, args=(str(workdir),))
    assert out[0]["earlier"] == out[1]["earlier"] and out[0]["locked"] == out[1]["locked"]
    assert out[0]["long"] == out[1]["long"] and out[0]["architecture"] == out[1]["architecture"]
    assert "holds a different student architecture than configured: intermediate_size: checkpoint 64 vs " \
           "config 96" in out[0]["architecture"]
    assert "holds an earlier run's checkpoints (latest: step_00000002" in out[0]["earlier"]
    assert "--resume" in out[0]["earlier"] and "trainer.overwrite=true" in out[0]["earlier"]
    assert f"in use by another run: pid {out[0]['parent']} on host" in out[0]["locked"]
    assert "long.parquet: row 3: the prompt is 9 tokens, longer than data.max_prompt_length (8)" in out[0]["long"]
    assert out[0]["latest_after"] == "step_00000002" and out[0]["lock_after"] == out[0]["parent"]


# --- --resume with a longer cosine schedule and another peak LR -----------------------------------------

def _cosine_resumed_longer(groups, tmp):
    import logging

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_gndpo").addHandler(Keep(level=logging.WARNING))
    run = f"trainer.output_dir={tmp}/cosine"
    first = _trainer(_config(tmp, [run, "optim.lr_decay_style=cosine", "trainer.steps=2"]))
    first.train()
    first.close(destroy_process_group=False)
    resumed = _trainer(_config(tmp, [run, "optim.lr_decay_style=cosine", "trainer.steps=4", "optim.lr=2e-3"]),
                       resume=True)
    resumed.train()
    rows = [json.loads(line) for line in (Path(tmp) / "cosine" / "metrics.jsonl").read_text().splitlines()]
    return rows, messages


def test_resume_with_more_steps_follows_the_new_cosine_horizon(workdir):
    """Two steps of a cosine schedule (2 optimizer steps each), resumed with trainer.steps=4 and
    optim.lr=2e-3: steps 3-4 train at the LR of a 2e-3 cosine over 8 optimizer steps (megatron's restored
    scheduler would have ended the old 4-step horizon: LR 0), and the changes are logged."""
    rows, messages = run_distributed(_cosine_resumed_longer, 1, args=(str(workdir),))[0]

    def lr(n):  # the LR optimizer step n + 1 uses
        return 2e-3 * 0.5 * (1 + math.cos(math.pi * n / 8))

    by_step = {r["step"]: r for r in rows}
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert by_step[3]["actor/lr"] == pytest.approx((lr(4) + lr(5)) / 2, rel=1e-6)
    assert by_step[4]["actor/lr"] == pytest.approx((lr(6) + lr(7)) / 2, rel=1e-6)
    assert by_step[4]["actor/lr"] > 1e-4 and by_step[4]["actor/grad_norm"] > 0
    changes = next(m for m in messages if "differs from the checkpoint's" in m)
    assert "optim.lr: 0.001 -> 0.002" in changes and "trainer.steps: 2 -> 4" in changes
    assert any("lr_decay_steps 4 -> 8" in m and "max_lr 0.001 -> 0.002" in m for m in messages)


# --- a save that cannot be written ------------------------------------------------------------------------

def _save_into_a_full_disk(groups, tmp):
    import resource
    import signal

    from megatron_gndpo.trainer.trainer import CheckpointSaveError

    trainer = _trainer(_config(tmp, [f"trainer.output_dir={tmp}/full", "trainer.steps=2", "trainer.save_interval=1"]))
    real_save = trainer.save
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def save_with_no_room():
        if trainer.step == 2:  # from now on, writes past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
        return real_save()

    trainer.save = save_with_no_room
    try:
        trainer.train()
        error = None
    except CheckpointSaveError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    root = trainer.checkpoints.root
    return error, str(root), (root / "latest").read_text()


def test_failed_save_names_path_and_errno_and_keeps_latest(workdir):
    error, root, latest = run_distributed(_save_into_a_full_disk, 1, args=(str(workdir),))[0]
    assert error is not None and error.startswith(f"the step-2 checkpoint could not be written under {root}")
    assert "[Errno 27]" in error and f"'{root}/.write_probe." in error
    assert error.endswith(f"latest still points to {root}/step_00000001")
    assert latest == "step_00000001"


# --- megatron-gndpo eval ------------------------------------------------------------------------------------

def _eval_matches_validation(groups, tmp):
    import yaml

    from megatron_gndpo import cli

    cfg = _config(tmp, [f"trainer.output_dir={tmp}/evalrun", "trainer.steps=1"])
    trainer = _trainer(cfg)
    trainer.train()
    expected = trainer.validate()
    trainer.close(destroy_process_group=False)
    config = Path(tmp) / "evalrun.yaml"
    config.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    argv = ["eval", "--config", str(config), "--checkpoint", f"{tmp}/evalrun/checkpoints", "--limit", "8"]
    rc = cli.main(argv)
    again = cli.main(argv)  # the JSON exists: refused without --overwrite
    return expected, rc, again, json.loads((Path(tmp) / "evalrun" / "eval_step_00000001.json").read_text())


def test_eval_scores_a_checkpoint_as_validation_does(workdir):
    expected, rc, again, result = run_distributed(_eval_matches_validation, 1, args=(str(workdir),))[0]
    assert (rc, again) == (0, 2)
    assert result["step"] == 1 and result["prompts"] == 8 and result["checkpoint"].endswith("step_00000001")
    assert result["val/acc"] == expected["val/acc"] and result["val/reward"] == expected["val/reward"]


# --- --print-config counts what megatron builds ------------------------------------------------------------

def _built_parameters(groups):
    from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.trainer.dry_run import parameter_count

    out = []
    for extra in ({}, {"tie_word_embeddings": True, "qk_layernorm": True, "attention_bias": True}):
        arch = ModelConfig(**{**ARCH, **extra})
        model = build_gpt_model(arch, ParallelConfig(), PrecisionConfig(params_dtype="float32",
                                                                        transformer_impl="local"),
                                pre_process=True, post_process=True)
        out.append((sum(p.numel() for p in model.parameters()), parameter_count(arch)["total"]))
    return out


def test_dry_run_parameter_count_matches_the_built_model():
    for built, counted in run_distributed(_built_parameters, 1)[0]:
        assert built == counted


# --- the command line under torchrun: a refused run is one line --------------------------------------------

def test_refused_run_under_torchrun_prints_one_error_line(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000001")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_gndpo.train",
           "--config", "examples/configs/demo.yaml", "teacher.checkpoint=null", "student_checkpoint=null",
           "trainer.prompts_per_step=4", "trainer.mini_batches=1", "trainer.micro_batch_size=16",
           f"trainer.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "holds an earlier run's checkpoints" in errors[0]
    assert "megatron_gndpo/" not in proc.stderr  # no traceback through our code from any rank
    assert "Apex" not in proc.stderr and "Transformer Engine" not in proc.stderr  # megatron's import noise
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
