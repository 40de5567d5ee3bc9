"""One training step, top to bottom (:func:`train_step`), one timer per phase:

    prompts -> rollout (student, current weights) -> the teacher scores the sampled tokens
    -> the student's old log-probs -> rewards -> advantages (statistics global over DP)
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

from typing import TYPE_CHECKING, Dict, List

from megatron_gndpo.algorithms.advantages import call_estimator
from megatron_gndpo.rollout.generator import generate
from megatron_gndpo.trainer.batches import attach, mini_batches, split_rows, training_batch
from megatron_gndpo.trainer.dumps import ROLLOUTS, dump_path, dump_rollout
from megatron_gndpo.trainer.metrics import PhaseTimer, advantage_metrics, logprob_diff_metrics, rollout_metrics
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
            rollout = generate(t.student.module, prompts.ids, prompts.rows, run.sampling, groups=g,
                               vocab_size=run.vocab_size, seed=cfg.seed * 1_000_003 + step - 1,
                               max_sequence_length=cfg.model.max_position_embeddings)
            batch = training_batch(rollout, step=step, multiple=run.sequence_multiple,
                                   pad_token_id=run.sampling.pad_token_id, group=g.dp_cp)
            microbatches = split_rows(batch, cfg.trainer.micro_batch_size)
        with timer("teacher"):  # the student's exact tokens, at the rollout temperature
            teacher_lp = t.teacher.score(microbatches)
        with timer("old_logprobs"):  # the student's own, the PPO / GSPO "old" policy
            old_lp = t.student.score(microbatches)
        with timer("rewards"):
            rewards = reward_responses(run.tokenizer, run.reward_fn, rollout.responses(), prompts.truths, g.device)
        with timer("advantages"):
            metrics: Dict[str, float] = {}
            if g.is_last_stage:
                advantages, metrics = call_estimator(
                    cfg.algorithm.estimator,
                    {"teacher_logprobs": teacher_lp, "old_logprobs": old_lp, "response_mask": batch["mask"],
                     "rewards": rewards["reward"], "correct": rewards["acc"] > 0.5,
                     "prompt_index": prompts.prompt_index},
                    group=g.dp_cp, **cfg.algorithm.estimator_kwargs)
                attach(microbatches, teacher_logprobs=teacher_lp, old_logprobs=old_lp, advantages=advantages)
        with timer("train"):  # one optimizer step per mini-batch
            updates = [t.student.update(minibatch, t.loss.for_minibatch(minibatch))
                       for minibatch in mini_batches(microbatches, cfg.trainer.mini_batches)]
            metrics.update(_mean(updates))
            metrics["actor/skipped_steps"] = float(t.student.skipped_steps)
        with timer("metrics"):
            metrics.update(rollout_metrics(rollout, rewards, g.dp_cp))
            if g.is_last_stage:
                n = rollout.tokens.shape[1] - 1  # the batch before its FP8 padding
                metrics.update(advantage_metrics(advantages, batch["mask"], g.dp_cp))
                metrics.update(logprob_diff_metrics(rollout.logprobs[:, 1:], old_lp[:, :n], batch["mask"][:, :n],
                                                    g.dp_cp))
                if cfg.trainer.dump_rollouts and g.tp_rank == 0:
                    dump_rollout(dump_path(cfg.trainer.output_dir, ROLLOUTS, step), run.tokenizer, prompts, rollout,
                                 rewards, teacher_lp, old_lp, batch["mask"], g.dp_cp)
    metrics.update(timer.metrics())
    metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / timer.seconds["step"]
    return metrics


def _mean(per_minibatch: List[Dict[str, float]]) -> Dict[str, float]:
    """The mean over the step's mini-batches of each of their metrics."""
    n = len(per_minibatch)
    return {k: sum(m[k] / n for m in per_minibatch) for k in per_minibatch[0]}
