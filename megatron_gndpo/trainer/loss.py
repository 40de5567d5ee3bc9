"""The loss the student's update minimises, per micro-batch: a sum of terms, each this micro-batch's
share of a step-wide mean (divided by a normaliser global over the mini-batch and data parallelism,
``algorithms/reduce.py``), so that megatron's plain sum over micro-batches and DP ranks is the global
loss however the batch is split."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch.distributed import ProcessGroup

from megatron_gndpo.algorithms.losses import SAMPLED_DIVERGENCES, divergence_loss
from megatron_gndpo.algorithms.reduce import aggregate, global_normalizer
from megatron_gndpo.config.schema import AlgorithmConfig
from megatron_gndpo.trainer.batches import stack_rows
from megatron_gndpo.trainer.distill import TeacherComparison
from megatron_gndpo.trainer.megatron_glue import LogitsReadout, LossFn

MicroBatch = Dict[str, torch.Tensor]


class UpdateLoss:
    """Terms: ``policy_loss`` (``algorithm.policy_loss`` on the micro-batches' ``advantages`` and
    ``old_logprobs``) and, with ``algorithm.divergence.kind``, ``divergence``: its weight times the
    per-token divergence to the teacher on the policy loss's footing (k1-k3 from the sampled token's
    log-probs, rkl / fkl / jsd through ``comparison``). Metrics, summed by the update over micro-batches
    and DP ranks into global means: each term, the policy loss's own (``clip_frac``, ...) and the
    student's entropy, as ``actor/<name>``."""

    def __init__(self, algorithm: AlgorithmConfig, policy_loss: Callable, readout: LogitsReadout,
                 dp_group: ProcessGroup, comparison: TeacherComparison):
        self.algorithm, self.policy_loss, self.readout, self.dp_group = algorithm, policy_loss, readout, dp_group
        self.comparison = comparison

    def for_minibatch(self, minibatch: List[MicroBatch]) -> LossFn:
        """Collective over the data-parallel group: the normalisers of ``minibatch``, then its loss function."""
        alg = self.algorithm
        mask = stack_rows([mb["mask"] for mb in minibatch])
        normalizer = global_normalizer(mask, alg.loss_agg, self.dp_group)
        n_tokens = global_normalizer(mask, "token-mean", self.dp_group)

        def loss_fn(logits_shard: torch.Tensor, mb: MicroBatch):
            logprobs = self.readout.logprobs(logits_shard, mb["labels"])
            policy, metrics = self.policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                               normalizer=normalizer, agg=alg.loss_agg, clip_low=alg.clip_low,
                                               clip_high=alg.clip_high)
            terms = {"policy_loss": policy}
            if alg.divergence.kind:
                terms["divergence"] = divergence_loss(self._divergence(logprobs, logits_shard, mb), mb["mask"],
                                                      weight=alg.divergence.weight, normalizer=normalizer,
                                                      agg=alg.loss_agg)
            with torch.no_grad():
                metrics["entropy"] = aggregate(self.readout.entropy(logits_shard.detach()), mb["mask"], "token-mean",
                                               n_tokens)
            metrics.update({name: term.detach() for name, term in terms.items()})
            return sum(terms.values()), {f"actor/{k}": v for k, v in metrics.items()}

        return loss_fn

    def _divergence(self, logprobs: torch.Tensor, logits_shard: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        div = self.algorithm.divergence
        if div.kind in SAMPLED_DIVERGENCES:
            return SAMPLED_DIVERGENCES[div.kind](logprobs, mb["teacher_logprobs"])
        return self.comparison.divergence(logits_shard, mb, div.kind, div.beta)
