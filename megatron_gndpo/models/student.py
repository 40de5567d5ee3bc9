"""The trained student: a megatron-core model in megatron's DDP, and its optimizer."""

from __future__ import annotations

from megatron_gndpo.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig
from megatron_gndpo.models.provider import build_gpt_model, params_dtype


def build_student(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, *,
                  pre_process: bool, post_process: bool):
    """GPTModel for this stage inside megatron's DistributedDataParallel.

    ``calculate_per_token_loss`` is switched on so that megatron neither divides the loss by the
    micro-batch count nor the gradients by the DP size: our losses arrive already divided by the
    global normaliser of the step (see ``trainer/megatron_glue.py``).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    module = build_gpt_model(model, parallel, precision, pre_process=pre_process, post_process=post_process)
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
