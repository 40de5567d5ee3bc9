"""The frozen teacher: inference only, never wrapped in DDP, never seen by an optimizer. It scores the
student's sampled tokens (:class:`Teacher`), optionally ModelOpt-quantised and offloaded to host
memory between its scoring phases."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights
from megatron_gndpo.checkpoint.vision import is_vision_language
from megatron_gndpo.config.schema import ParallelConfig, TeacherConfig
from megatron_gndpo.distributed.collectives import all_gather, all_reduce, group_rank
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.provider import build_gpt_model
from megatron_gndpo.models.vlm import load_vlm_checkpoint
from megatron_gndpo.models.quantization import logprob_error, quantize_teacher
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_topk_logprobs
from megatron_gndpo.trainer.batches import gather_rows
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
                  cpu_initialization: Optional[bool] = None, pg_collection=None):
    """The teacher's stage, frozen. ``cpu_initialization`` builds it in CPU memory (``teacher.offload``:
    it must never sit on the GPU beside the student's optimizer state); ``pg_collection``: on groups of
    its own (``teacher.parallel``)."""
    model = build_gpt_model(teacher.model, parallel, teacher.precision, pre_process=pre_process,
                            post_process=post_process, cpu_initialization=cpu_initialization,
                            pg_collection=pg_collection)
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
    in pinned host memory outside :meth:`score`.

    ``groups`` are the model's: the student's, or its own layout's (``groups.megatron`` set,
    ``distributed/init.py::layout_groups``), which it is then built on, loaded over and run over;
    :class:`TeacherOnOwnLayout` brings it the rows to score."""

    def __init__(self, cfg: TeacherConfig, parallel: ParallelConfig, groups: ProcessGroups, readout: LogitsReadout,
                 *, calibration: Optional[Tuple[List[MicroBatch], List[MicroBatch]]] = None, role: str = "teacher",
                 top_k: Optional[int] = None):
        self.groups, self.readout, self.role, self.top_k = groups, readout, role, top_k
        own_groups = groups.megatron
        self.quantized = bool(cfg.quantize)  # ModelOpt may quantise the output layer: read its logits then
        offload = cfg.offload and groups.device.type == "cuda"
        stage = dict(pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        if cfg.checkpoint and is_vision_language(cfg.checkpoint):  # RunConfig refuses offload / quantize with images
            self.model = freeze(load_vlm_checkpoint(cfg.checkpoint, parallel, cfg.precision, role=role, **stage))
        else:
            self.model = build_teacher(cfg, parallel, cpu_initialization=True if offload else None,
                                       pg_collection=own_groups, **stage)
            if cfg.checkpoint:
                load_model_weights(self.model, cfg.checkpoint, cfg.model, role,
                                   dp_cp_group=None if own_groups is None else groups.dp)
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
        pgs = self.groups.megatron
        if not self.top_k and not self.quantized:  # log-probs alone: the LM head chunk by chunk, logits never whole
            return forward_logprobs(model, microbatches, r, f"{self.role}_logprobs", pgs)

        def collect(logits_shard, mb):
            kept = {f"{self.role}_logprobs": r.logprobs(logits_shard, mb["labels"])}
            if self.top_k:
                ids, top_lp = vocab_parallel_topk_logprobs(logits_shard, self.top_k, group=r.group,
                                                           temperature=r.temperature, vocab_size=r.vocab_size)
                kept.update({f"{self.role}_top_ids": ids, f"{self.role}_top_logprobs": top_lp})
            return kept

        return forward_outputs(model, microbatches, collect, pgs)

    def output_shapes(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """What :meth:`score` returns per token, known on every stage: key -> (trailing shape, dtype)."""
        shapes = {f"{self.role}_logprobs": ((), torch.float32)}
        if self.top_k:
            shapes.update({f"{self.role}_top_ids": ((self.top_k,), torch.long),
                           f"{self.role}_top_logprobs": ((self.top_k + 1,), torch.float32)})
        return shapes

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
        error = logprob_error(reference, quantized, mask, self.groups.dp)
        log_last.info("teacher quantised with ModelOpt (%s): |log-prob error| mean %.3g, max %.3g over %d held-out "
                      "prompt tokens", method, error["abs_mean"], error["abs_max"], error["tokens"])
        return {f"teacher_quant/logprob_{k}": v for k, v in error.items()}


class TeacherOnOwnLayout:
    """A :class:`Teacher` built on its own layout (``teacher.parallel``: its own TP x PP, and data
    parallelism DP_t = world / (TP x PP), whatever the student's), scoring the rows of the student's
    micro-batches. :meth:`score`, collective over the world:

    1. every student data-parallel rank's rows (token ids, labels and response mask, ``[B, W]`` integers,
       read back from its micro-batches, packed or not) are all-gathered over the student's DP group, so
       that every rank holds the step's ``N`` rows in student-DP order (:func:`gather_step_rows`);
    2. the teacher's DP rank ``j`` takes rows ``[j N / DP_t, (j + 1) N / DP_t)``, forms its micro-batches
       with ``form`` (the trainer's micro-batch settings) and scores them with its TP x PP, as a teacher on
       the student's layout does (vocab-parallel max / sum all-reduces over its TP group, p2p over its PP
       group; log-probs, and the top-k cache when the algorithm reads it);
    3. per output, TP rank 0 of each teacher last stage writes its rows into a zero ``[N, W, ...]`` tensor
       that one SUM all-reduce over the world completes (each element is written by exactly one rank, so
       the sum is exact); every student rank keeps its own rows.

    What moves per step: 3 int32 per token of the step to every rank, then the outputs of the step (one
    float32 per token; with top-k another ``2k + 1`` numbers) all-reduced over the world: never logits."""

    def __init__(self, teacher: Teacher, student_groups: ProcessGroups,
                 form: Callable[[MicroBatch], List[MicroBatch]]):
        self.teacher, self.student_groups, self.form = teacher, student_groups, form
        self.readout, self.quant_metrics = teacher.readout, teacher.quant_metrics

    def score(self, microbatches: List[MicroBatch]) -> Dict[str, torch.Tensor]:
        """:meth:`Teacher.score` of the student's ``microbatches``: ``[B, W]`` outputs of this rank's rows on
        the student's last stage, {} elsewhere."""
        g, t = self.student_groups, self.teacher.groups
        rows, mine = gather_step_rows(microbatches, g.dp)
        n, width = rows.shape[0], rows.shape[2]
        if n < t.dp_size:
            raise ValueError(f"the step has {n} rows, fewer than the teacher's {t.dp_size} data-parallel ranks "
                             "(teacher.parallel): raise trainer.prompts_per_step or rollout.n_samples")
        lo, hi = t.dp_rank * n // t.dp_size, (t.dp_rank + 1) * n // t.dp_size
        share = rows[lo:hi]
        scored = self.teacher.score(self.form({
            "tokens": share[:, 0].long(), "labels": share[:, 1].long(), "mask": share[:, 2].bool(),
            "position_ids": torch.arange(width, device=rows.device).expand(hi - lo, width).contiguous()}))
        writes = t.writes_rows
        out = {}
        for key, (tail, dtype) in self.teacher.output_shapes().items():
            full = torch.zeros((n, width, *tail), dtype=dtype, device=t.device)
            if writes:
                full[lo:hi, :scored[key].shape[1]] = scored[key]
            out[key] = all_reduce(full, group=dist.group.WORLD)[mine]
        return out if g.is_last_stage else {}


def gather_step_rows(microbatches: List[MicroBatch], group) -> Tuple[torch.Tensor, Tuple[slice, slice]]:
    """Collective over ``group`` (the student's data-parallel group): the step's rows ``[N, 3, W]`` int32,
    every rank's ``tokens`` / ``labels`` / ``mask`` ``[B_r, W_r]`` (read back from its micro-batches: a packed
    one's tokens through its ``unpack`` index) stacked in rank order at the widest width (zero beyond a
    row's own); and the index of this rank's ``[B_r, W_r]`` in them. Two all-gathers."""
    parts = {k: [] for k in ("tokens", "labels", "mask")}
    for mb in microbatches:
        tokens = mb["tokens"].reshape(-1)[mb["unpack"]] if "cu_seqlens" in mb else mb["tokens"]
        for k, v in (("tokens", tokens), ("labels", mb["labels"]), ("mask", mb["mask"])):
            parts[k].append(v.to(torch.int32))  # token ids fit int32: half the bytes of int64
    local = torch.stack([gather_rows(parts[k], microbatches) for k in parts], dim=1)  # [B, 3, W]
    sizes = all_gather(torch.tensor([list(local.shape[::2])], device=local.device), group)  # [ranks, (B, W)]
    most_rows, width = (int(x) for x in sizes.max(dim=0).values)
    padded = local.new_zeros((most_rows, 3, width))
    padded[:local.shape[0], :, :local.shape[2]] = local
    everyone = all_gather(padded, group).view(-1, most_rows, 3, width)
    rows = torch.cat([everyone[r, :int(b)] for r, b in enumerate(sizes[:, 0])])
    start = int(sizes[:group_rank(group), 0].sum())
    return rows, (slice(start, start + local.shape[0]), slice(0, local.shape[2]))
