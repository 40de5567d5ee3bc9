"""One training step, top to bottom (:func:`train_step`), one timer per phase:

    prompts -> rollout (student, current weights) -> the teacher scores the sampled tokens
    (-> gopd's reference policy scores them) -> the student's old log-probs -> rewards
    -> advantages (statistics global over DP)
    -> mini-batches of micro-batches through megatron's pipeline schedule -> clip, optimizer, LR
    -> metrics

Log-probs live on the last pipeline stage (where the logits are), so advantages, losses and their
metrics are computed there; everything a loss is divided by is global to the step. Every producer
keys its metrics as they are logged (``section/name``) and the step merges them without renaming:
the estimator ``score/*`` and ``estimator/*``, the update ``actor/*``, the rollout's rows
``response/*``, ``prompt/*``, ``rollout/*``, ``adv/*``, ``reward``, ``acc``, ``format``, the timers
``time/*``, throughput ``perf/*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import torch

from megatron_gndpo.algorithms.advantages import call_estimator, with_outcome_advantage
from megatron_gndpo.config.schema import AlgorithmConfig
from megatron_gndpo.rollout.continuous import rollout_engine
from megatron_gndpo.trainer.batches import (
    StepPrompts,
    attach,
    form_microbatches,
    mini_batches,
    training_batch,
    widen,
)
from megatron_gndpo.trainer.dumps import ROLLOUTS, dump_path, dump_rollout
from megatron_gndpo.trainer.images import attach_images, sampler_images
from megatron_gndpo.trainer.metrics import (
    PhaseTimer,
    advantage_metrics,
    logprob_diff_metrics,
    memory_metrics,
    rollout_metrics,
)
from megatron_gndpo.trainer.rewards import reward_responses

if TYPE_CHECKING:
    from megatron_gndpo.trainer.trainer import Trainer


def train_step(t: Trainer, step: int) -> Dict[str, float]:
    """Step ``step`` (from 1) of ``t``'s run; its metrics, complete on the last pipeline stage."""
    cfg, g, run = t.cfg, t.groups, t.run
    timer = PhaseTimer()
    with timer("step"):
        with timer("prompts"):  # every rank draws the same global list and keeps its rows
            prompts = t.prompts.next_step()
        with timer("rollout"):  # the student's current weights sample; the sampling noise is keyed by row
            sample = rollout_engine(cfg.rollout.continuous_batching, cfg.rollout.decode_slots)
            rollout = sample(t.student.module, prompts.ids, prompts.rows, run.sampling, groups=g,
                             vocab_size=run.vocab_size, seed=cfg.seed * 1_000_003 + step - 1,
                             max_sequence_length=cfg.model.max_position_embeddings, **sampler_images(prompts.images))
            batch = training_batch(rollout, step=step, multiple=run.sequence_multiple,
                                   pad_token_id=run.sampling.pad_token_id, group=g.dp)
            tc = cfg.trainer  # fixed row counts, or a token budget (padded or packed); rows named by row_ids
            microbatches = form_microbatches(batch, mini_batches=tc.mini_batches, micro_batch_size=tc.micro_batch_size,
                                             max_tokens=tc.max_tokens_per_microbatch, pack=tc.pack_sequences,
                                             multiple=run.sequence_multiple, pad_token_id=run.sampling.pad_token_id)
            attach_images(microbatches, prompts.images, g)  # first stage: every scoring and the update see them
        with timer("teacher"):  # the student's exact tokens, at teacher.temperature (+ its top-k, when asked)
            scores = t.teacher.score(microbatches)
        if t.reference is not None:
            with timer("reference"):  # gopd's reference policy
                scores.update(t.reference.score(microbatches))
        attach(microbatches, **scores)  # the student's phases compare against them
        with timer("old_logprobs"):  # the student's own, the PPO / GSPO "old" policy (+ vopd's KL)
            scores.update(t.student.score(microbatches, *t.scoring_extras))
            scores = {k: widen(v, batch["mask"].shape[1]) for k, v in scores.items()}  # [B, T] like the batch
        with timer("rewards"):
            rewards = reward_responses(run.tokenizer, run.reward_fn, rollout.responses(), prompts.truths, g.device)
        with timer("advantages"):
            metrics: Dict[str, float] = {}
            if g.is_last_stage:
                advantages, metrics = _advantages(cfg.algorithm, scores, batch["mask"], rewards, prompts, g.dp)
                attach(microbatches, old_logprobs=scores["old_logprobs"], advantages=advantages)
        with timer("train"):  # one optimizer step per mini-batch
            updates = [t.student.update(minibatch, t.loss.for_minibatch(minibatch))
                       for minibatch in mini_batches(microbatches, cfg.trainer.mini_batches)]
            metrics.update(_mean(updates))
            metrics["actor/skipped_steps"] = float(t.student.skipped_steps)
        with timer("metrics"):
            metrics.update(rollout_metrics(rollout, rewards, g.dp))
            metrics.update(memory_metrics(g.device))
            if g.is_last_stage:
                n = rollout.tokens.shape[1] - 1  # the batch before its FP8 padding
                metrics.update(advantage_metrics(advantages, batch["mask"], g.dp))
                metrics.update(logprob_diff_metrics(rollout.logprobs[:, 1:], scores["old_logprobs"][:, :n],
                                                    batch["mask"][:, :n], g.dp))
                if cfg.trainer.dump_rollouts and g.writes_rows:
                    dump_rollout(dump_path(cfg.trainer.output_dir, ROLLOUTS, step), run.tokenizer, prompts, rollout,
                                 rewards, scores["teacher_logprobs"], scores["old_logprobs"], batch["mask"], g.dp)
    metrics.update(timer.metrics())
    metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / timer.seconds["step"]
    return metrics


def _advantages(algorithm: AlgorithmConfig, scores: Dict[str, torch.Tensor], mask: torch.Tensor,
                rewards: Dict[str, torch.Tensor], prompts: StepPrompts, group) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``algorithm.estimator`` on what the step scored, plus KDRL's outcome mix
    (A = A_distill + w * A_grpo) with ``algorithm.outcome_weight``."""
    inputs = {**scores, "response_mask": mask, "rewards": rewards["reward"], "correct": rewards["acc"] > 0.5,
              "prompt_index": prompts.prompt_index}
    advantages, metrics = call_estimator(algorithm.estimator, inputs, group=group, **algorithm.estimator_kwargs)
    if algorithm.outcome_weight:
        outcome, outcome_metrics = call_estimator("grpo", inputs, group=group)
        advantages = with_outcome_advantage(advantages, outcome, algorithm.outcome_weight)
        metrics.update(outcome_metrics)
    return advantages, metrics


def _mean(per_minibatch: List[Dict[str, float]]) -> Dict[str, float]:
    """The mean over the step's mini-batches of each of their metrics."""
    n = len(per_minibatch)
    return {k: sum(m[k] / n for m in per_minibatch) for k in per_minibatch[0]}
