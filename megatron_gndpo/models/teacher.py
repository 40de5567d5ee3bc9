"""The frozen teacher: inference only, never wrapped in DDP, never seen by an optimizer. It scores the
student's sampled tokens (:class:`Teacher`), optionally ModelOpt-quantised and offloaded to host
memory between its scoring phases."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights
from megatron_gndpo.checkpoint.vision import is_vision_language
from megatron_gndpo.config.schema import ParallelConfig, TeacherConfig
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.provider import build_gpt_model
from megatron_gndpo.models.vlm import load_vlm_checkpoint
from megatron_gndpo.models.quantization import logprob_error, quantize_teacher
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_topk_logprobs
from megatron_gndpo.trainer.megatron_glue import LogitsReadout, forward_logprobs, forward_outputs, model_forward
from megatron_gndpo.trainer.rank_logging import last_rank_logger, rank0_logger

log0, log_last = rank0_logger(__name__), last_rank_logger(__name__)
MicroBatch = Dict[str, torch.Tensor]


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


class Teacher:
    """A frozen model's pipeline stage, loaded from ``cfg.checkpoint``, that scores token sequences: the
    teacher (``role="teacher"``), or gopd's reference policy (``role="ref"``).

    :meth:`score` returns ``<role>_logprobs`` of the micro-batches' labels and, with ``top_k``, the
    ``top_k`` largest logits' ids and their log-probs plus the tail bucket's (``<role>_top_ids``,
    ``<role>_top_logprobs``), from the same forward pass: what the student's phases compare their
    distribution against, never the full-vocabulary logits. With ``teacher.quantize`` it is quantised
    at construction (ModelOpt, calibrated on ``calibration``) and ``quant_metrics`` holds its log-prob
    error on ``held_out`` (last stage; {} elsewhere). With ``teacher.offload`` on GPUs its weights live
    in pinned host memory outside :meth:`score`."""

    def __init__(self, cfg: TeacherConfig, parallel: ParallelConfig, groups: ProcessGroups, readout: LogitsReadout,
                 *, calibration: Optional[Tuple[List[MicroBatch], List[MicroBatch]]] = None, role: str = "teacher",
                 top_k: Optional[int] = None):
        self.groups, self.readout, self.role, self.top_k = groups, readout, role, top_k
        self.quantized = bool(cfg.quantize)  # ModelOpt may quantise the output layer: read its logits then
        offload = cfg.offload and groups.device.type == "cuda"
        stage = dict(pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        if cfg.checkpoint and is_vision_language(cfg.checkpoint):  # RunConfig refuses offload / quantize with images
            self.model = freeze(load_vlm_checkpoint(cfg.checkpoint, parallel, cfg.precision, role=role, **stage))
        else:
            self.model = build_teacher(cfg, parallel, cpu_initialization=True if offload else None, **stage)
            if cfg.checkpoint:
                load_model_weights(self.model, cfg.checkpoint, cfg.model, role)
        if not cfg.checkpoint and role == "teacher":
            log0.info("teacher.checkpoint is not set: the teacher has random weights (tests only)")
        self.offloaded: Optional[OffloadedWeights] = None  # quantisation scores with the weights on the device
        self.quant_metrics: Dict[str, float] = self._quantize(cfg.quantize, *calibration) if cfg.quantize else {}
        if offload:
            self.offloaded = OffloadedWeights(self.model, groups.device)

    def score(self, microbatches: List[MicroBatch]) -> Dict[str, torch.Tensor]:
        """``<role>_logprobs`` ``[B, T]`` at the readout's temperature (and the top-k cache ``[B, T, k]``,
        ``[B, T, k + 1]``) on the last stage; {} elsewhere."""
        with self.offloaded.on_device() if self.offloaded else contextlib.nullcontext():
            return self._outputs(self.model, microbatches)

    @torch.no_grad()
    def logits(self, mb: MicroBatch) -> torch.Tensor:
        """The logits shard ``[b, T, V/tp]`` of one micro-batch (one pipeline stage only): full-vocabulary
        comparisons recompute it inside the student's micro-batch rather than keep it for the step."""
        return model_forward(self.model, mb)

    def _outputs(self, model, microbatches: List[MicroBatch]) -> Dict[str, torch.Tensor]:
        r = self.readout
        if not self.top_k and not self.quantized:  # log-probs alone: the LM head chunk by chunk, logits never whole
            return forward_logprobs(model, microbatches, r, f"{self.role}_logprobs")

        def collect(logits_shard, mb):
            kept = {f"{self.role}_logprobs": r.logprobs(logits_shard, mb["labels"])}
            if self.top_k:
                ids, top_lp = vocab_parallel_topk_logprobs(logits_shard, self.top_k, group=r.group,
                                                           temperature=r.temperature, vocab_size=r.vocab_size)
                kept.update({f"{self.role}_top_ids": ids, f"{self.role}_top_logprobs": top_lp})
            return kept

        return forward_outputs(model, microbatches, collect)

    def _quantize(self, method: str, calibration: List[MicroBatch], held_out: List[MicroBatch]) -> Dict[str, float]:
        """Scales calibrated on ``calibration``, then the log-prob error against the unquantised teacher
        on ``held_out`` (last stage: the metrics; {} elsewhere)."""
        self.model.to(self.groups.device)  # calibration runs on the GPU; offloading takes it back afterwards
        key = f"{self.role}_logprobs"
        reference = self.score(held_out).get(key)
        self.model = quantize_teacher(self.model, method, lambda model: self._outputs(model, calibration))
        quantized = self.score(held_out).get(key)
        if not self.groups.is_last_stage:
            return {}
        mask = torch.cat([mb["mask"] for mb in held_out])
        error = logprob_error(reference, quantized, mask, self.groups.dp_cp)
        log_last.info("teacher quantised with ModelOpt (%s): |log-prob error| mean %.3g, max %.3g over %d held-out "
                      "prompt tokens", method, error["abs_mean"], error["abs_max"], error["tokens"])
        return {f"teacher_quant/logprob_{k}": v for k, v in error.items()}
