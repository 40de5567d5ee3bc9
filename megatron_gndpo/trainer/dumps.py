"""Rollouts and validation generations as JSONL, one line per response (``trainer.dump_rollouts``,
``trainer.dump_validation``): ``output_dir/rollouts/step_N.jsonl`` and
``output_dir/validation/step_N.jsonl``, to read what the student wrote and how the teacher scored it.

Each data-parallel rank holds a share of the rows; the share is gathered over the data-parallel group
to its first rank, which writes the file (replaced atomically: a redone step replaces its file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.rollout.generator import Rollout
from megatron_gndpo.trainer.batches import StepPrompts

ROLLOUTS = "rollouts"
VALIDATION = "validation"


def dump_path(output_dir: str, kind: str, step: int) -> Path:
    return Path(output_dir) / kind / f"step_{step}.jsonl"


def response_records(tokenizer, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     rows: Sequence[int], scores: Dict[str, Sequence[float]], **columns: Sequence) -> List[dict]:
    """One record per row: its ``row`` id, prompt and response text, each of ``scores`` (reward, acc,
    format: a number per row) and of ``columns`` (a JSON value per row)."""
    texts = zip(tokenizer.batch_decode(prompts), tokenizer.batch_decode(responses, skip_special_tokens=True))
    return [{"row": int(row), "prompt": prompt, "response": response,
             **{k: float(v[i]) for k, v in scores.items()}, **{k: v[i] for k, v in columns.items()}}
            for i, (row, (prompt, response)) in enumerate(zip(rows, texts))]


def log_ratio_summary(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> List[Optional[Dict[str, float]]]:
    """Per row: mean, min and max of the per-token score ``lp_teacher - lp_old`` over its response
    tokens (None for an empty response)."""
    ratio, m = (teacher_logprobs.double() - old_logprobs.double()), mask.bool()
    out: List[Optional[Dict[str, float]]] = []
    for r, keep in zip(ratio, m):
        x = r[keep]
        out.append({"mean": x.mean().item(), "min": x.min().item(), "max": x.max().item()} if x.numel() else None)
    return out


def write_gathered(path: Path, records: List[dict], group: ProcessGroup) -> None:
    """Collective over ``group``: every rank's ``records``, ordered by row, written as JSONL by the
    group's first rank."""
    writer = dist.get_global_rank(group, 0)
    gathered: Optional[List[List[dict]]] = [[] for _ in range(dist.get_world_size(group))] \
        if dist.get_rank() == writer else None
    dist.gather_object(records, gathered, dst=writer, group=group)
    if gathered is None:
        return
    lines = sorted((r for part in gathered for r in part), key=lambda r: r["row"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tmp.replace(path)


def dump_rollout(path: Path, tokenizer, prompts: StepPrompts, rollout: Rollout, rewards: Dict[str, torch.Tensor],
                 teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                 group: ProcessGroup) -> None:
    """Collective over ``group`` (data parallel, last pipeline stage): the step's responses with their
    rewards and per-token score summary (``log_ratio``: mean / min / max of ``lp_teacher - lp_old``)."""
    records = response_records(tokenizer, prompts.ids, rollout.responses(), prompts.rows.tolist(), rewards,
                               data_source=prompts.data_sources, ground_truth=prompts.truths,
                               log_ratio=log_ratio_summary(teacher_logprobs, old_logprobs, mask))
    write_gathered(path, records, group)
