"""The frozen teacher: inference only, never wrapped in DDP, never seen by an optimizer."""

from __future__ import annotations

import torch

from megatron_gndpo.config.schema import ParallelConfig, TeacherConfig
from megatron_gndpo.models.provider import build_gpt_model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No parameter requires grad, so no .grad or main-grad buffer is ever allocated for it and
    autograd records nothing through it; eval() keeps dropout off."""
    model.requires_grad_(False)
    model.eval()
    return model


def build_teacher(teacher: TeacherConfig, parallel: ParallelConfig, *, pre_process: bool, post_process: bool):
    model = build_gpt_model(
        teacher.model, parallel, teacher.precision, pre_process=pre_process, post_process=post_process
    )
    return freeze(model)

