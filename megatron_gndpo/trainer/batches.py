"""Which rows a step trains on, and the next-token view the models score and train on.

Rows of a step: ``prompts_per_step x n_samples`` responses, numbered globally and cut into
``mini_batches`` consecutive blocks; data-parallel rank d holds the d-th share of every block (whole
prompt groups), so each optimizer step sees the same rows at every layout. Tensor- and
pipeline-parallel ranks of one replica hold the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.data.prompts import PromptDataset, PromptOrder
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
        return StepPrompts(ids=[self.dataset.prompt_ids(i) for i in picked],
                           truths=[self.dataset.rows[i].ground_truth for i in picked],
                           data_sources=[self.dataset.rows[i].data_source for i in picked],
                           rows=self.rows, prompt_index=prompt_index)


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


def split_rows(batch: MicroBatch, size: int) -> List[MicroBatch]:
    """Consecutive micro-batches of ``size`` rows; ``row_ids`` ``[b]`` are their rows' indices in ``batch``."""
    n = batch["tokens"].shape[0]
    rows = torch.arange(n, device=batch["tokens"].device)
    return [{**{k: v[i:i + size] for k, v in batch.items()}, "row_ids": rows[i:i + size]} for i in range(0, n, size)]


def attach(microbatches: List[MicroBatch], **per_row: torch.Tensor) -> None:
    """Cuts each ``[B, ...]`` tensor of ``per_row`` into the micro-batches' rows and adds it to them."""
    size = microbatches[0]["tokens"].shape[0]
    for name, t in per_row.items():
        for mb, part in zip(microbatches, t.split(size)):
            mb[name] = part


def mini_batches(microbatches: List[MicroBatch], n: int) -> List[List[MicroBatch]]:
    """``n`` consecutive groups of micro-batches, one per optimizer step."""
    per_mini = len(microbatches) // n
    return [microbatches[i * per_mini:(i + 1) * per_mini] for i in range(n)]
