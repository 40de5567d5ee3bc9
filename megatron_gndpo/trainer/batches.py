"""Which rows a step trains on, and the next-token view the models score and train on.

Rows of a step: ``prompts_per_step x n_samples`` responses, numbered globally and cut into
``mini_batches`` consecutive blocks; data-parallel rank d holds the d-th share of every block (whole
prompt groups), so each optimizer step sees the same rows at every layout. Tensor- and
pipeline-parallel ranks of one replica hold the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.data.prompts import PromptDataset, PromptOrder
from megatron_gndpo.data.vision import ImageInputs
from megatron_gndpo.distributed.collectives import all_reduce
from megatron_gndpo.rollout.generator import Rollout

MicroBatch = Dict[str, torch.Tensor]


class EmptyStepError(ValueError):
    """Every response of a step is empty: there is nothing to learn from."""


@dataclasses.dataclass
class StepPrompts:
    """This rank's rows of one step."""

    ids: List[List[int]]
    """Prompt token ids, one list per row (a prompt repeated for its n samples)."""
    truths: List[str]
    data_sources: List[str]
    rows: torch.Tensor
    """``[B]`` global row ids: with the step's seed they key the sampling noise."""
    prompt_index: torch.Tensor
    """``[B]`` the prompt's slot in the step; the samples of one prompt share it (GRPO's groups)."""
    images: List[Optional[ImageInputs]]
    """Each row's images (None: a text-only row); the n samples of a prompt share one object, so the
    sampler runs the vision tower once per prompt."""


class PromptSchedule:
    """The prompts of successive steps, read in ``order`` (checkpointed with the run)."""

    def __init__(self, dataset: PromptDataset, order: PromptOrder, *, prompts_per_step: int, n_samples: int,
                 mini_batches: int, dp_rank: int, dp_size: int, device: torch.device):
        self.dataset, self.order = dataset, order
        self.prompts_per_step, self.n_samples = prompts_per_step, n_samples
        rows_per_rank = prompts_per_step * n_samples // dp_size
        # Mini-batch i is the same global rows at every layout: its i-th block, split over DP ranks.
        block, share = rows_per_rank * dp_size // mini_batches, rows_per_rank // mini_batches
        self.rows = torch.cat([torch.arange(i * block + dp_rank * share, i * block + (dp_rank + 1) * share,
                                            device=device) for i in range(mini_batches)])

    def next_step(self) -> StepPrompts:
        """Every rank draws the same global list of prompts and keeps its rows."""
        indices = self.order.take(self.prompts_per_step)
        prompt_index = self.rows // self.n_samples
        picked = [indices[s] for s in prompt_index.tolist()]
        images = {i: self.dataset.image_inputs(i) for i in dict.fromkeys(picked)}  # once per prompt
        return StepPrompts(ids=[self.dataset.prompt_ids(i) for i in picked],
                           truths=[self.dataset.rows[i].ground_truth for i in picked],
                           data_sources=[self.dataset.rows[i].data_source for i in picked],
                           rows=self.rows, prompt_index=prompt_index, images=[images[i] for i in picked])


def _next_token_view(tokens: torch.Tensor, mask: torch.Tensor) -> MicroBatch:
    b, length = tokens.shape
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "position_ids": torch.arange(length - 1, device=tokens.device).expand(b, length - 1).contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "mask": mask,
    }


def sequences_from_rollout(rollout: Rollout) -> MicroBatch:
    """Next-token training view of a rollout: position t predicts token t+1.

    ``mask[b, t]`` is 1 where token t+1 belongs to row b's response (EOS included)."""
    tokens = rollout.tokens
    t = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None, :] + 1
    p = rollout.prompt_lengths[:, None]
    return _next_token_view(tokens, (t >= p) & (t < p + rollout.response_lengths[:, None]))


def sequences_from_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> MicroBatch:
    """Next-token view of right-padded prompts on ``device``; ``mask[b, t]`` is 1 where token t+1 is one
    of row b's prompt tokens."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max())), pad_token_id, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long, device=device)
    t = torch.arange(tokens.shape[1] - 1, device=device)[None, :] + 1
    return _next_token_view(tokens, t < lengths[:, None])


def pad_sequence_length(batch: MicroBatch, multiple: int, pad_token_id: int) -> MicroBatch:
    """``batch`` with its sequence dimension right-padded to a multiple of ``multiple`` (mask 0, pad
    tokens, positions continuing). FP8 GEMMs in Transformer Engine need the token count of every GEMM
    (rows x sequence) to be a multiple of 16; padded positions are masked out of every loss and
    statistic, and causal attention keeps them from influencing the real ones."""
    b, t = batch["tokens"].shape
    extra = -t % multiple
    if extra == 0:
        return batch
    device = batch["tokens"].device
    pad = torch.full((b, extra), pad_token_id, dtype=torch.long, device=device)
    return {
        "tokens": torch.cat([batch["tokens"], pad], dim=1),
        "labels": torch.cat([batch["labels"], pad], dim=1),
        "position_ids": torch.arange(t + extra, device=device).expand(b, t + extra).contiguous(),
        "mask": torch.cat([batch["mask"], torch.zeros((b, extra), dtype=batch["mask"].dtype, device=device)], dim=1),
    }


def training_batch(rollout: Rollout, *, step: int, multiple: int, pad_token_id: int,
                   group: ProcessGroup) -> MicroBatch:
    """Collective over ``group`` (data parallel): the next-token view of ``rollout``, padded to
    ``multiple``; EmptyStepError on every rank when the global batch has no response token."""
    batch = pad_sequence_length(sequences_from_rollout(rollout), multiple, pad_token_id)
    if all_reduce(batch["mask"].sum().double(), dist.ReduceOp.SUM, group).item() == 0:
        raise EmptyStepError(f"step {step}: every response of the global batch is empty (0 response tokens); "
                             "check the prompts, EOS ids and rollout.max_new_tokens")
    return batch


SEQUENCE_KEYS = ("tokens", "position_ids", "labels", "mask")
"""The ``[B, T]`` tensors of a batch; any other key is per row (``[B, ...]``) and follows its rows."""


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` positions each row needs: through its last response token, ``max{t : mask[b, t]} + 1``
    (1 for a row with no response token). Causal attention makes the positions after it irrelevant."""
    t = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.bool() * t).amax(dim=1).clamp_min(1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def microbatch_cost(lengths: Sequence[int], *, pack: bool, multiple: int) -> int:
    """Tokens a micro-batch of rows of ``lengths`` computes: ``ceil_m(sum l)`` packed into one row,
    ``n * ceil_m(max l)`` padded to its longest row (``ceil_m``: up to a multiple of ``multiple``)."""
    if pack:
        return _round_up(sum(lengths), multiple)
    return len(lengths) * _round_up(max(lengths), multiple)


def first_fit_decreasing(lengths: Sequence[int], budget: int, *, pack: bool, multiple: int = 1) -> List[List[int]]:
    """Groups of the indices of ``lengths`` whose :func:`microbatch_cost` is at most ``budget``: rows by
    decreasing length (ties by index), each into the first group it fits, else a new group (a row alone
    always forms one, even over the budget). Deterministic: a function of ``lengths`` alone, so every rank
    holding the same rows forms the same groups. Each group is in increasing index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: List[List[int]] = []
    for i in order:
        for group in groups:
            if microbatch_cost([lengths[j] for j in group] + [lengths[i]], pack=pack, multiple=multiple) <= budget:
                group.append(i)
                break
        else:
            groups.append([i])
    return [sorted(group) for group in groups]


def _rows(batch: MicroBatch, ids: torch.Tensor, width: int) -> MicroBatch:
    """Rows ``ids`` of ``batch``, its sequence tensors cut to ``width`` columns, and ``row_ids``."""
    mb = {k: v[ids, :width] if k in SEQUENCE_KEYS else v[ids] for k, v in batch.items()}
    mb["row_ids"] = ids
    return mb


def pack_rows(batch: MicroBatch, ids: torch.Tensor, lengths: torch.Tensor, *, multiple: int,
              pad_token_id: int) -> MicroBatch:
    """Rows ``ids`` of ``batch`` (their first ``lengths`` positions) laid end to end in one packed row.

    The model reads ``tokens`` / ``position_ids`` ``[1, L]`` (positions restart at 0 for every row; L is
    the total rounded up to ``multiple``, the tail a padding segment of its own) and ``cu_seqlens``
    ``[n + 1]`` (int32, segment boundaries, the tail included), from which the model's forward builds a
    block-diagonal causal mask or THD parameters. ``labels``, ``mask`` and per-row keys stay row-major
    ``[n, W]`` (W: the longest row), and ``unpack`` ``[n, W]`` is where each row position sits in the
    packed row (clamped to the row's last position beyond its end), so that outputs read per row."""
    lengths = lengths.tolist()
    total = sum(lengths)
    width = max(lengths)
    packed_length = _round_up(total, multiple)
    segments = lengths + ([packed_length - total] if packed_length > total else [])
    device = batch["tokens"].device
    cu_seqlens = torch.tensor([0] + segments, device=device).cumsum(0).to(torch.int32)
    mb = _rows(batch, ids, width)
    del mb["tokens"], mb["position_ids"]
    t = torch.arange(width, device=device)
    starts = cu_seqlens[:len(lengths), None].long()
    mb["unpack"] = starts + torch.minimum(t[None, :], torch.tensor(lengths, device=device)[:, None] - 1)
    tokens = torch.full((packed_length,), pad_token_id, dtype=torch.long, device=device)
    tokens[:total] = torch.cat([batch["tokens"][row, :n] for row, n in zip(ids.tolist(), lengths)])
    mb["tokens"] = tokens[None]
    mb["position_ids"] = torch.cat([torch.arange(n, device=device) for n in segments])[None]
    mb["cu_seqlens"] = cu_seqlens
    return mb


def split_rows(batch: MicroBatch, size: int) -> List[MicroBatch]:
    """Consecutive micro-batches of ``size`` rows, full width, each with its ``row_ids``."""
    n = next(iter(batch.values())).shape[0]
    device = batch["tokens"].device
    return [_rows(batch, torch.arange(i, min(i + size, n), device=device), batch["tokens"].shape[1])
            for i in range(0, n, size)]


def form_microbatches(batch: MicroBatch, *, mini_batches: int, micro_batch_size: int, max_tokens: Optional[int],
                      pack: bool, multiple: int, pad_token_id: int) -> List[MicroBatch]:
    """This rank's micro-batches of ``batch``, mini-batch after mini-batch (mini-batch i: local rows
    ``[i B / n, (i + 1) B / n)``, the same global rows at every layout), each with its ``row_ids``.

    Without ``max_tokens`` nor ``pack``: ``micro_batch_size`` consecutive rows, the batch's full width
    (:func:`split_rows`). Otherwise each mini-batch's rows are grouped by :func:`first_fit_decreasing`
    on their :func:`row_lengths` within ``max_tokens`` (packed: default ``micro_batch_size`` x the batch
    width), each group padded to its own longest row (up to ``multiple``) or packed (:func:`pack_rows`).
    Every rank of a model-parallel group holds the same rows, hence forms the same micro-batches."""
    n_rows, width = batch["tokens"].shape
    if max_tokens is None and not pack:
        return split_rows(batch, micro_batch_size)
    budget = max_tokens if max_tokens is not None else micro_batch_size * width
    lengths = row_lengths(batch["mask"])
    per_mini = n_rows // mini_batches
    out = []
    for first in range(0, n_rows, per_mini):
        block = lengths[first:first + per_mini].tolist()
        for group in first_fit_decreasing(block, budget, pack=pack, multiple=multiple):
            ids = torch.tensor(group, device=lengths.device) + first
            if pack:
                out.append(pack_rows(batch, ids, lengths[ids], multiple=multiple, pad_token_id=pad_token_id))
            else:
                out.append(_rows(batch, ids, min(_round_up(int(lengths[ids].max()), multiple), width)))
    return out


def attach(microbatches: List[MicroBatch], **per_row: torch.Tensor) -> None:
    """Adds to each micro-batch its rows (``row_ids``) of each ``[B]`` or ``[B, T', ...]`` tensor of
    ``per_row``, the latter cut to the micro-batch's own width."""
    for mb in microbatches:
        width = mb["mask"].shape[1]
        for name, t in per_row.items():
            mb[name] = t[mb["row_ids"], :width] if t.dim() > 1 else t[mb["row_ids"]]


def gather_rows(parts: Sequence[torch.Tensor], microbatches: Sequence[MicroBatch]) -> torch.Tensor:
    """The micro-batches' ``[b]`` or ``[b, W_i, ...]`` outputs as one ``[B]`` or ``[B, max W_i, ...]`` tensor
    in row order (``row_ids``), zero where a micro-batch was narrower: the inverse of :func:`attach`."""
    n_rows = sum(p.shape[0] for p in parts)
    if parts[0].dim() == 1:
        out = parts[0].new_zeros(n_rows)
        for part, mb in zip(parts, microbatches):
            out[mb["row_ids"]] = part
        return out
    width = max(p.shape[1] for p in parts)
    out = parts[0].new_zeros((n_rows, width, *parts[0].shape[2:]))
    for part, mb in zip(parts, microbatches):
        out[mb["row_ids"], :part.shape[1]] = part
    return out


def widen(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` ``[B, T', ...]`` right-padded with zeros to ``[B, width, ...]`` (a ``[B]`` tensor as it is)."""
    extra = width - t.shape[1] if t.dim() > 1 else 0
    return t if extra == 0 else torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)


def stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[b_i, W_i, ...]`` tensors stacked along rows at their widest width (zero-padded): the masks of
    micro-batches of different widths, for counts that zeros leave unchanged."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([widen(t, width) for t in tensors])


def mini_batches(microbatches: List[MicroBatch], n: int) -> List[List[MicroBatch]]:
    """The micro-batches of each of the ``n`` optimizer steps: mini-batch i holds local rows
    ``[i B / n, (i + 1) B / n)`` (:func:`form_microbatches` never lets a micro-batch straddle two)."""
    per_mini = sum(mb["row_ids"].numel() for mb in microbatches) // n
    groups: List[List[MicroBatch]] = [[] for _ in range(n)]
    for mb in microbatches:
        groups[int(mb["row_ids"][0]) // per_mini].append(mb)
    return groups
