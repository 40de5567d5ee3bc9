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
from megatron_gndpo.trainer.megatron_glue import LogitsReadout, TokenLoss

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

    def for_minibatch(self, minibatch: List[MicroBatch]) -> TokenLoss:
        """Collective over the data-parallel group: the normalisers of ``minibatch``, then its loss: read off
        the logits per token (the student's log-probs, the per-token divergence over the distributions,
        the entropy), then reduced with the rows' advantages, old log-probs and mask."""
        alg = self.algorithm
        mask = stack_rows([mb["mask"] for mb in minibatch])
        normalizer = global_normalizer(mask, alg.loss_agg, self.dp_group)
        n_tokens = global_normalizer(mask, "token-mean", self.dp_group)

        def read(logits_shard: torch.Tensor, mb: MicroBatch) -> Dict[str, torch.Tensor]:
            tokens = {"logprobs": self.readout.logprobs(logits_shard, mb["labels"])}
            if alg.divergence.kind and alg.divergence.kind not in SAMPLED_DIVERGENCES:
                tokens["divergence"] = self.comparison.divergence(logits_shard, mb, alg.divergence.kind,
                                                                  alg.divergence.beta)
            with torch.no_grad():
                tokens["entropy"] = self.readout.entropy(logits_shard.detach())
            return tokens

        def reduce(tokens: Dict[str, torch.Tensor], mb: MicroBatch):
            logprobs = tokens["logprobs"]
            policy, metrics = self.policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                               normalizer=normalizer, agg=alg.loss_agg, clip_low=alg.clip_low,
                                               clip_high=alg.clip_high)
            terms = {"policy_loss": policy}
            if alg.divergence.kind:
                per_token = tokens.get("divergence")
                if per_token is None:  # from the sampled token's log-probs (k1-k3)
                    per_token = SAMPLED_DIVERGENCES[alg.divergence.kind](logprobs, mb["teacher_logprobs"])
                terms["divergence"] = divergence_loss(per_token, mb["mask"], weight=alg.divergence.weight,
                                                      normalizer=normalizer, agg=alg.loss_agg)
            metrics["entropy"] = aggregate(tokens["entropy"], mb["mask"], "token-mean", n_tokens)
            metrics.update({name: term.detach() for name, term in terms.items()})
            return sum(terms.values()), {f"actor/{k}": v for k, v in metrics.items()}

        return TokenLoss(read, reduce)
