"""The run around the steps: resume, validation, logging and checkpoints."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Dict

import torch.distributed as dist

from megatron_gndpo.config.loader import config_changes
from megatron_gndpo.models.student import build_scheduler
from megatron_gndpo.trainer.preflight import describe_write_failure
from megatron_gndpo.trainer.rank_logging import rank0_logger

if TYPE_CHECKING:
    from megatron_gndpo.trainer.trainer import Trainer

log0 = rank0_logger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); ``latest`` still points to the
    previous one. ``details_elsewhere``: another rank failed and reports the details; this rank has
    only learnt that the save failed."""

    def __init__(self, message: str, *, details_elsewhere: bool = False):
        super().__init__(message)
        self.details_elsewhere = details_elsewhere


def train(t: Trainer) -> None:
    """Steps until ``trainer.steps``: greedy validation before the first and every ``val_interval``
    steps (and after the last), metrics logged per step, a checkpoint every ``save_interval`` steps and
    after the last."""
    tc = t.cfg.trainer
    validating = t.run.val_data is not None and tc.val_interval
    try:
        if validating and t.step == 0:
            log(t, t.validate())
        while t.step < tc.steps:
            metrics = t.train_step()
            if validating and (t.step % tc.val_interval == 0 or t.step == tc.steps):
                metrics.update(t.validate())
            log(t, metrics)
            if (tc.save_interval and t.step % tc.save_interval == 0) or t.step == tc.steps:
                save_checkpoint(t)
    finally:
        if t.run.metrics is not None:
            t.run.metrics.close()


def log(t: Trainer, metrics: Dict[str, float]) -> None:
    if t.run.metrics is not None:
        t.run.metrics.log(t.step, metrics)


def trainer_state(t: Trainer) -> dict:
    # the config, so that a resumed run can say what it changes (follow_config_over_checkpoint)
    return {"step": t.step, "skipped_steps": t.student.skipped_steps, "data": t.order.state_dict(),
            "config": dataclasses.asdict(t.cfg)}


def save_checkpoint(t: Trainer) -> None:
    """``t.save()``, timed. A failed write (disk full, permissions) stops the run with a message that
    names the path and errno and says which checkpoint ``latest`` still points to; megatron reports a
    failure on any rank to every rank, with the details on rank 0 alone."""
    from torch.distributed.checkpoint import CheckpointException

    checkpoints = t.run.checkpoints
    start = time.perf_counter()
    try:
        path = t.save()
    except (Exception, CheckpointException) as e:
        previous = checkpoints.latest()
        kept = f"latest still points to {previous}" if previous else "there is no earlier checkpoint"
        raise CheckpointSaveError(
            f"the step-{t.step} checkpoint could not be written under {checkpoints.root}: "
            f"{describe_write_failure(e, checkpoints.root, 'trainer.save_dir')}; {kept}",
            details_elsewhere=isinstance(e, CheckpointException) and not e.failures) from e
    log0.info("checkpoint saved to %s (%.1f s)", path, time.perf_counter() - start)


def resume(t: Trainer) -> None:
    """Collective: the student, its optimizer and schedule, the step and the data position from the
    checkpoint to resume from (a damaged ``latest`` falls back, with a warning, to an intact one)."""
    checkpoints = t.run.checkpoints
    path = checkpoints.resume_point()
    if path is None:
        log0.warning("--resume: no checkpoint under %s; starting from scratch", checkpoints.root)
        return
    s = t.student
    _take_saved_group_settings(s.optimizer, path)
    state = checkpoints.load(path, s.module, s.optimizer, s.scheduler, model_config=t.cfg.model)
    t.step, s.skipped_steps = state["step"], state["skipped_steps"]
    t.order.load_state_dict(state["data"])
    log0.info("resumed from %s at step %d", path, t.step)


def _take_saved_group_settings(optimizer, checkpoint) -> None:
    """megatron-core 0.19 matches the checkpoint's optimizer param groups to the current ones by their
    per-group settings (``max_lr``, ``min_lr``, ...), so a run resumed with another ``optim.lr`` would
    find no group to load. For the load, the groups take the values the checkpoint was saved with;
    :func:`follow_config_over_checkpoint` then applies the configured ones."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(checkpoint))["trainer"].get("config")
    if saved is not None:
        for group in optimizer.param_groups:
            group.update(max_lr=saved["optim"]["lr"], min_lr=saved["optim"]["min_lr"])


def follow_config_over_checkpoint(t: Trainer, checkpoint: str) -> None:
    """A resumed run trains with its configuration, not the checkpoint's. Loading restores megatron's
    scheduler state (peak and floor LR, warm-up, horizon, decay style) and, in the optimizer's param
    groups, the peak / floor LR and Adam's betas and eps, all over the configuration: a cosine run
    resumed with a larger trainer.steps would keep the old horizon and train at min_lr, silently.
    So the schedule is rebuilt from the configuration at the checkpoint's optimizer step, the param
    groups take the configured values, and rank 0 logs what differs from the checkpoint."""
    optim, tc, s = t.cfg.optim, t.cfg.trainer, t.student
    restored = s.scheduler.state_dict()
    for group in s.optimizer.param_groups:
        group.update(max_lr=optim.lr, min_lr=optim.min_lr, betas=(optim.adam_beta1, optim.adam_beta2),
                     eps=optim.adam_eps)
    s.scheduler = build_scheduler(optim, s.optimizer, tc.steps * tc.mini_batches)
    s.scheduler.step(increment=restored["num_steps"])
    if dist.get_rank() != 0:
        return
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(checkpoint)["trainer"].get("config")
    changes = config_changes(saved, dataclasses.asdict(t.cfg)) if saved is not None else []
    if changes:
        log0.warning("resumed from %s with a configuration that differs from the checkpoint's: %s", checkpoint,
                     "; ".join(changes))
    schedule = s.scheduler.state_dict()
    differs = [f"{k} {restored[k]!r} -> {v!r}" for k, v in schedule.items() if restored[k] != v]
    if differs:
        log0.warning("the LR schedule follows the configuration, not the checkpoint (%s): %s over %d optimizer "
                     "steps, now at step %d with lr %.3g", ", ".join(differs), schedule["lr_decay_style"],
                     schedule["lr_decay_steps"], schedule["num_steps"], s.optimizer.param_groups[0]["lr"])
