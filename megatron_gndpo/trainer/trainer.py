"""The GNDPO / OPD trainer: one run, composed of

- ``setup.py``: the checks before compute, tokenizer, prompts, metrics, and the two models;
- ``models/student.py`` (:class:`Student`: scores its samples, updates itself) and
  ``models/teacher.py`` (:class:`Teacher`: scores the samples; quantisation and offload; also gopd's
  reference policy); ``distill.py``: how the student's phases compare with the teacher's distribution;
- ``step.py``: one step, read top to bottom; ``loss.py``: the update's loss;
- ``loop.py``: resume, validation, logging and checkpoints around the steps.

``Trainer(cfg, resume=...)``, ``.train()``, ``.train_step()``, ``.validate()``, ``.save()`` and
``.close()`` are the entry points (``train.py``, the tests, the benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from megatron_gndpo.checkpoint.vision import student_vision_files
from megatron_gndpo.config.schema import RunConfig
from megatron_gndpo.data.prompts import PromptOrder
from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
from megatron_gndpo.trainer import loop
from megatron_gndpo.trainer.batches import EmptyStepError, PromptSchedule
from megatron_gndpo.trainer.distill import TeacherComparison
from megatron_gndpo.trainer.dumps import VALIDATION, dump_path
from megatron_gndpo.trainer.evaluation import greedy_eval
from megatron_gndpo.trainer.loop import CheckpointSaveError
from megatron_gndpo.trainer.loss import UpdateLoss
from megatron_gndpo.trainer.setup import build_models, is_logging_rank, prepare_run
from megatron_gndpo.trainer.step import train_step

__all__ = ["CheckpointSaveError", "EmptyStepError", "Trainer"]


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False):
        self.cfg = cfg
        self.groups = g = init_parallel(cfg.parallel, seed=cfg.seed)
        self.run = prepare_run(cfg, g, resume=resume)
        self.student, self.teacher, self.reference = build_models(cfg, g, self.run)
        comparison = TeacherComparison(self.teacher, self.student.readout, cfg.algorithm.divergence.top_k)
        # what the student's scoring phase reads off its logits besides its log-probs
        self.scoring_extras = (comparison.token_kl,) if cfg.algorithm.estimator == "vopd" else ()
        self.loss = UpdateLoss(cfg.algorithm, self.run.policy_loss, self.student.readout, g.dp, comparison)
        self.order = PromptOrder(len(self.run.train_data), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.prompts = PromptSchedule(self.run.train_data, self.order, prompts_per_step=cfg.trainer.prompts_per_step,
                                      n_samples=cfg.rollout.n_samples, mini_batches=cfg.trainer.mini_batches,
                                      dp_rank=g.dp_rank, dp_size=g.dp_size, device=g.device)
        self.step = 0
        if resume:
            loop.resume(self)
        if self.run.claim.resume_from is not None:
            loop.follow_config_over_checkpoint(self, self.run.claim.resume_from)
        if self.teacher.quant_metrics:
            loop.log(self, self.teacher.quant_metrics)

    # what callers read of the run
    @property
    def checkpoints(self):
        return self.run.checkpoints

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def shared_vocab_size(self) -> int:
        return self.run.vocab_size

    @property
    def is_logging_rank(self) -> bool:
        return is_logging_rank()

    def train_step(self) -> Dict[str, float]:
        metrics = train_step(self, self.step + 1)
        self.step += 1
        return metrics

    def validate(self) -> Dict[str, float]:
        """Greedy responses to the first ``val_prompts`` held-out prompts: mean reward / accuracy, overall
        and per data source (with ``trainer.dump_validation``, every response to
        ``output_dir/validation/step_N.jsonl``)."""
        tc = self.cfg.trainer
        return greedy_eval(self.student.module, self.run.val_data, self.run.tokenizer, self.run.reward_fn,
                           self.run.sampling, groups=self.groups, vocab_size=self.run.vocab_size,
                           max_sequence_length=self.cfg.model.max_position_embeddings, limit=tc.val_prompts,
                           dump_to=dump_path(tc.output_dir, VALIDATION, self.step) if tc.dump_validation else None)

    def train(self) -> None:
        loop.train(self)

    def save(self) -> Path:
        s = self.student
        vision = student_vision_files(self.cfg.student_checkpoint, s.module) if s.vision_language else {}
        return self.run.checkpoints.save(self.step, s.module, s.optimizer, s.scheduler, model_config=self.cfg.model,
                                         trainer_state=loop.trainer_state(self), tokenizer=self.cfg.data.tokenizer,
                                         keep=self.cfg.trainer.keep_checkpoints, **vision)

    def close(self, destroy_process_group: bool = True) -> None:
        self.run.claim.release()
        destroy_parallel(destroy_process_group)
