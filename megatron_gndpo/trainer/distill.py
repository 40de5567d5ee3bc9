"""How the student's phases compare their next-token distribution with the teacher's, per micro-batch:
vopd's per-token KL (old-log-prob phase, no gradient) and the divergence loss term (training).

Two sources of the teacher's distribution, chosen by ``algorithm.divergence.top_k``:

- top-k: the teacher phase kept, per response token, its ``k`` largest logits' ids and their log-probs
  plus a tail bucket (``teacher_top_ids`` / ``teacher_top_logprobs`` in the micro-batch, on the last
  stage); the student's log-probs of the same ids and its own tail come from its logits shard, so the
  two models' vocabulary shards may differ (ids are global);
- full vocabulary: the teacher's logits shard is recomputed for the micro-batch (a teacher forward is
  cheap next to the student's backward, and nothing ``[B, T, V]`` is kept for the step). Only with one
  pipeline stage and alike vocabulary shards, which the config checks when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron_gndpo.algorithms.losses import DISTRIBUTION_DIVERGENCES
from megatron_gndpo.models.teacher import Teacher
from megatron_gndpo.ops.vocab_parallel import topk_tail_divergence, vocab_parallel_kl
from megatron_gndpo.trainer.megatron_glue import LogitsReadout

MicroBatch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class TeacherComparison:
    """``student`` reads the student's logits (rollout temperature, shared vocabulary); the teacher's
    distribution is at its own ``teacher.readout.temperature`` in both sources."""

    teacher: Teacher
    student: LogitsReadout
    top_k: Optional[int]

    def divergence(self, student_logits: torch.Tensor, mb: MicroBatch, kind: str, beta: float = 0.5) -> torch.Tensor:
        """Per-token ``kind`` (rkl, fkl, jsd) between student and teacher ``[b, T]``, differentiable w.r.t.
        ``student_logits`` ``[b, T, V/tp]``."""
        r, op_kind = self.student, DISTRIBUTION_DIVERGENCES[kind]
        if self.top_k is not None:
            return topk_tail_divergence(student_logits, mb["teacher_top_ids"], mb["teacher_top_logprobs"],
                                        kind=op_kind, beta=beta, group=r.group, temperature=r.temperature,
                                        vocab_size=r.vocab_size)
        teacher_logits = self.teacher.logits(mb)
        t_teacher = self.teacher.readout.temperature
        if t_teacher != r.temperature:  # softmax(x_T (T_s / T_T) / T_s) = softmax(x_T / T_T)
            teacher_logits = teacher_logits.float() * (r.temperature / t_teacher)
        return vocab_parallel_kl(student_logits, teacher_logits, kind=op_kind, beta=beta, group=r.group,
                                 temperature=r.temperature, vocab_size=r.vocab_size)

    def token_kl(self, student_logits: torch.Tensor, mb: MicroBatch) -> Dict[str, torch.Tensor]:
        """vopd's baseline ``token_kl`` = KL(student || teacher) per token, for :meth:`Student.score`."""
        return {"token_kl": self.divergence(student_logits, mb, "rkl")}
