"""Greedy evaluation on held-out prompts, shared by the trainer's validation and the demo scripts."""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch
import torch.distributed as dist

from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.rollout.generator import SamplingParams, generate


@torch.no_grad()
def greedy_eval(model, dataset, tokenizer, reward_fn, sampling: SamplingParams, *, groups: ProcessGroups,
                vocab_size: int, max_sequence_length: int, limit: int) -> Dict[str, float]:
    """Mean reward and accuracy of greedy responses to the first ``limit`` prompts of ``dataset``,
    split over data-parallel ranks and summed back."""
    n = min(limit, len(dataset))
    mine = list(range(groups.dp_rank, n, groups.dp_size))
    sums = torch.zeros(3, dtype=torch.float64, device=groups.device)
    if mine:
        rollout = generate(model, [dataset.prompt_ids(i) for i in mine], torch.tensor(mine, device=groups.device),
                           dataclasses.replace(sampling, temperature=0.0), groups=groups, vocab_size=vocab_size,
                           seed=0, max_sequence_length=max_sequence_length)
        texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        scored = [reward_fn(t, dataset.rows[i].ground_truth) for t, i in zip(texts, mine)]
        sums += torch.tensor([len(mine), sum(s["reward"] for s in scored), sum(s["acc"] for s in scored)],
                             dtype=torch.float64, device=groups.device)
    if groups.dp_size > 1:
        dist.all_reduce(sums, group=groups.dp_cp)
    total, reward, acc = sums.tolist()
    return {"val/reward": reward / total, "val/acc": acc / total}
