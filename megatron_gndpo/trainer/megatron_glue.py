"""The one place that talks to megatron-core's pipeline schedules and owns its loss rescaling, and how
every model's vocab-sharded logits are read (:class:`LogitsReadout`).

Megatron's ``forward_step_calc_loss`` divides a micro-batch loss by ``num_microbatches`` (2-tuple
return) or by its token count (3-tuple, unless ``calculate_per_token_loss``), and DDP divides
gradients by the DP size unless ``calculate_per_token_loss``. Our losses are already
``masked_sum / global_normaliser`` for the whole step, so that summing them over micro-batches and DP
ranks gives the exact global mean. We therefore run with ``calculate_per_token_loss=True`` (set by
``build_student``) and return a token count of 0: megatron then skips every rescaling
(``finalize_model_grads`` only divides when the all-reduced count is > 0) and the gradients are the
plain sum of our pre-normalised micro-batch losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.distributed import ProcessGroup

from megatron_gndpo.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_gndpo.trainer.images import IMAGE_KEYS

# (logits_shard [b, T, V/tp], micro-batch) -> (scalar loss, metrics)
LossFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], "tuple[torch.Tensor, Dict[str, torch.Tensor]]"]
# (logits_shard [b, T, V/tp], micro-batch) -> tensors to keep, each [b, ...]
CollectFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LogitsReadout:
    """How logits shards are read, the same for teacher and student so that their log-probs compare:
    over the tensor-parallel ``group``, at the rollout ``temperature``, over the ``vocab_size`` ids the
    two models share (ids beyond it, one model's padding or extra rows, get probability 0)."""

    group: Optional[ProcessGroup]
    temperature: float
    vocab_size: int

    def logprobs(self, logits_shard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logprobs(logits_shard, labels, group=self.group, temperature=self.temperature,
                                       vocab_size=self.vocab_size)

    def entropy(self, logits_shard: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_entropy(logits_shard, group=self.group, temperature=self.temperature,
                                      vocab_size=self.vocab_size)


def model_forward(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits shard ``[b, T, V/tp]`` on the last stage, hidden states on the others. A vision-language
    model's micro-batch brings its images on the first stage (``trainer/images.py``)."""
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    return model(batch["tokens"], batch["position_ids"], None, **images)


def run_schedule(
    model,
    microbatches: Sequence[Dict[str, torch.Tensor]],
    *,
    loss_fn: Optional[LossFn] = None,
    collect_fn: Optional[CollectFn] = None,
    forward_only: bool,
) -> List[Dict[str, torch.Tensor]]:
    """Run ``microbatches`` (each ``tokens``/``position_ids`` ``[b, T]`` plus loss inputs, all the same
    shape) through megatron's schedule for this pipeline layout.

    Training: ``loss_fn`` gives a scalar already divided by the step's global normaliser; returns its
    metrics per micro-batch on the last stage ([] elsewhere). Scoring: ``collect_fn`` turns the
    logits of a micro-batch into tensors to keep (e.g. token log-probs); returned likewise.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("run_schedule needs at least one micro-batch")
    shape = tuple(microbatches[0]["tokens"].shape)
    for i, mb in enumerate(microbatches):
        if tuple(mb["tokens"].shape) != shape:
            raise ValueError(f"micro-batch {i} has tokens of shape {tuple(mb['tokens'].shape)}, expected {shape}")
    def forward_step(data_iterator: Iterable, model_chunk):
        batch = next(data_iterator)
        output = model_forward(model_chunk, batch)

        def finish(logits_shard: torch.Tensor):
            if loss_fn is not None:
                loss, metrics = loss_fn(logits_shard, batch)
                return loss, loss.new_zeros((), dtype=torch.int), metrics
            kept = collect_fn(logits_shard, batch)
            # Scoring keeps tensors, not a loss: return a dummy loss so the schedule's bookkeeping holds.
            return logits_shard.new_zeros(()), logits_shard.new_zeros((), dtype=torch.int), kept

        return output, finish

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_outputs(model, microbatches: Sequence[Dict[str, torch.Tensor]], collect_fn: CollectFn,
                    ) -> Dict[str, torch.Tensor]:
    """Forward-only pass of ``microbatches``; what ``collect_fn`` keeps of each, concatenated over the
    micro-batches (``[B, ...]``) on the last pipeline stage, {} on the others."""
    out = run_schedule(model, microbatches, collect_fn=collect_fn, forward_only=True)
    return {k: torch.cat([o[k] for o in out]) for k in out[0]} if out else {}
