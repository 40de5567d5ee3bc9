"""The frozen teacher: inference only, never wrapped in DDP, never seen by an optimizer."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from megatron_gndpo.config.schema import ParallelConfig, TeacherConfig
from megatron_gndpo.models.provider import build_gpt_model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No parameter requires grad, so no .grad or main-grad buffer is ever allocated for it and
    autograd records nothing through it; eval() keeps dropout off."""
    model.requires_grad_(False)
    model.eval()
    return model


def build_teacher(teacher: TeacherConfig, parallel: ParallelConfig, *, pre_process: bool, post_process: bool,
                  cpu_initialization: Optional[bool] = None):
    """The teacher's stage, frozen. ``cpu_initialization`` builds it in CPU memory (``teacher.offload``:
    it must never sit on the GPU beside the student's optimizer state)."""
    model = build_gpt_model(teacher.model, parallel, teacher.precision, pre_process=pre_process,
                            post_process=post_process, cpu_initialization=cpu_initialization)
    return freeze(model)


class OffloadedWeights:
    """A frozen model whose weights live in pinned CPU memory and visit ``device`` only while it scores.

    Every parameter and buffer is copied once into page-locked memory and the module's tensors point
    there. :meth:`on_device` copies them to the GPU with non-blocking transfers (pinned memory makes
    them true asynchronous DMA, overlapping each other) and, on exit, points the module back at the
    host copies: the weights never change, so nothing is copied back and the GPU memory is released to
    the caching allocator for the student's phases."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.host: Dict[str, torch.Tensor] = {}
        for name, t in self._tensors():
            host = t.detach().to("cpu")
            self.host[name] = host.pin_memory() if device.type == "cuda" else host
            t.data = self.host[name]

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.named_parameters(remove_duplicate=True)
        yield from self.model.named_buffers(remove_duplicate=True)

    @contextlib.contextmanager
    def on_device(self):
        for name, t in self._tensors():
            t.data = self.host[name].to(self.device, non_blocking=True)
        try:
            yield self.model
        finally:
            for name, t in self._tensors():
                t.data = self.host[name]
