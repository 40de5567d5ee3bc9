"""The trained student: a megatron-core model in megatron's DDP, its optimizer and LR schedule
(:class:`Student`, which scores its own samples and updates itself)."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights
from megatron_gndpo.checkpoint.vision import is_vision_language
from megatron_gndpo.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, RunConfig
from megatron_gndpo.distributed.collectives import all_reduce
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.provider import build_gpt_model, params_dtype
from megatron_gndpo.models.vlm import load_vlm_checkpoint
from megatron_gndpo.trainer.megatron_glue import (
    CollectFn,
    LogitsReadout,
    TokenLoss,
    forward_logprobs,
    forward_outputs,
    run_schedule,
)
from megatron_gndpo.trainer.rank_logging import rank0_logger

log0 = rank0_logger(__name__)
MicroBatch = Dict[str, torch.Tensor]


def build_student(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, *,
                  pre_process: bool, post_process: bool):
    """GPTModel for this stage inside megatron's DistributedDataParallel (:func:`wrap_in_ddp`)."""
    return wrap_in_ddp(build_gpt_model(model, parallel, precision, pre_process=pre_process,
                                       post_process=post_process), parallel)


def wrap_in_ddp(module, parallel: ParallelConfig):
    """``module`` (a GPTModel or a ``VisionLanguageModel``; its trainable parameters) inside megatron's
    DistributedDataParallel.

    ``calculate_per_token_loss`` is switched on so that megatron neither divides the loss by the
    micro-batch count nor the gradients by the DP size: our losses arrive already divided by the
    global normaliser of the step (see ``trainer/megatron_glue.py``).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = module.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, module)


def unwrap(model):
    """The GPTModel inside DDP (or the model itself)."""
    return getattr(model, "module", model)


def build_optimizer(optim: OptimConfig, precision: PrecisionConfig, parallel: ParallelConfig, model):
    """megatron's optimizer (grad clipping, fp32 main params under bf16, optional ZeRO-1)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = params_dtype(precision)
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [model])


def build_scheduler(optim: OptimConfig, optimizer, total_steps: int):
    """megatron's LR / weight-decay schedule, stepped once per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=max(total_steps, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


class Student:
    """The student's pipeline stage in megatron's DDP (``model``; the GPTModel, or the
    ``VisionLanguageModel`` of a vision-language ``student_checkpoint``, is ``module``), its
    optimizer and LR schedule, loaded from ``student_checkpoint``. ``total_optimizer_steps`` is the
    schedule's horizon. Counts the optimizer steps it skipped for non-finite gradients."""

    def __init__(self, cfg: RunConfig, groups: ProcessGroups, readout: LogitsReadout, *, total_optimizer_steps: int):
        self.groups, self.readout = groups, readout
        stage = dict(pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        self.vision_language = bool(cfg.student_checkpoint) and is_vision_language(cfg.student_checkpoint)
        if self.vision_language:  # loaded before DDP, which copies the weights into its buffers
            vlm = load_vlm_checkpoint(cfg.student_checkpoint, cfg.parallel, cfg.precision, role="student",
                                      train_vision_tower=not cfg.trainer.freeze_vision_tower, **stage)
            self.model = wrap_in_ddp(vlm, cfg.parallel)
        else:
            self.model = build_student(cfg.model, cfg.parallel, cfg.precision, **stage)
        self.optimizer = build_optimizer(cfg.optim, cfg.precision, cfg.parallel, self.model)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, total_optimizer_steps)
        if cfg.student_checkpoint:
            if not self.vision_language:
                load_model_weights(self.module, cfg.student_checkpoint, cfg.model, "student")
            self.optimizer.reload_model_params()  # fp32 main weights follow the loaded bf16 ones
        self.skipped_steps = 0

    @property
    def module(self):
        """The GPTModel stage inside DDP: what samples, what checkpoints hold."""
        return unwrap(self.model)

    def score(self, microbatches: List[MicroBatch], *extra: CollectFn) -> Dict[str, torch.Tensor]:
        """``old_logprobs`` ``[B, T]`` of the micro-batches' labels under the current weights (the PPO / GSPO
        "old" policy), read like the teacher's, and what each ``extra`` reads off the same logits (vopd's
        per-token KL to the teacher); on the last stage, {} elsewhere. Without ``extra`` the logits are never
        whole (the LM head chunk by chunk)."""
        if not extra:
            return forward_logprobs(self.module, microbatches, self.readout, "old_logprobs")

        def collect(logits_shard, mb):
            kept = {"old_logprobs": self.readout.logprobs(logits_shard, mb["labels"])}
            for fn in extra:
                kept.update(fn(logits_shard, mb))
            return kept

        return forward_outputs(self.module, microbatches, collect)

    def update(self, minibatch: List[MicroBatch], loss: TokenLoss) -> Dict[str, float]:
        """One optimizer step on ``minibatch``: forward / backward of its micro-batches through megatron's
        schedule with ``loss`` (each micro-batch's share of the loss, already divided by the step's
        global normaliser, and its metrics), then clip, optimizer and LR-schedule step; unless a gradient
        is non-finite on any rank: then the step is skipped (and counted) and training goes on.

        Returns ``actor/lr`` (the LR this step uses), ``actor/grad_norm`` and the sums of ``loss``'s
        metrics over micro-batches and data-parallel ranks (last stage)."""
        g = self.groups
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.model.train()
        out = run_schedule(self.model, minibatch, loss=loss, forward_only=False)

        metrics: Dict[str, float] = {"actor/lr": self.optimizer.param_groups[0]["lr"]}
        if self._gradients_finite():
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        else:
            self.skipped_steps += 1
            log0.warning("non-finite gradients: optimizer step skipped (%d skipped so far)", self.skipped_steps)
            metrics["actor/grad_norm"] = float("nan")
        if g.is_last_stage:
            keys = sorted(out[0])
            sums = all_reduce(torch.stack([sum(o[k].double() for o in out) for k in keys]), dist.ReduceOp.SUM, g.dp)
            metrics.update(zip(keys, sums.tolist()))
        return metrics

    def _gradients_finite(self) -> bool:
        """Whether every gradient of every rank is finite. Every main_grad is a view into one of DDP's
        flat grad buffers: a few reductions and one MIN all-reduce over the world."""
        buffers = [b.grad_data for b in self.model.buffers + self.model.expert_parallel_buffers]
        finite = torch.stack([torch.isfinite(grad).all() for grad in buffers]).all().float()
        return all_reduce(finite, dist.ReduceOp.MIN, dist.group.WORLD).item() == 1.0
