"""The GNDPO / OPD trainer. :meth:`Trainer.train_step` is one step, top to bottom:

    prompts -> rollout (student, current weights) -> teacher scores the sampled tokens
    -> student old log-probs -> rewards -> advantages (global statistics over DP)
    -> mini-batches of micro-batches through megatron's pipeline schedule -> clip, optimizer, LR
    -> metrics

Rows of a step: ``prompts_per_step x n_samples`` responses, numbered globally and cut into
``mini_batches`` consecutive blocks; data-parallel rank d holds the d-th share of every block (whole
prompt groups), so each optimizer step sees the same rows at every layout. Tensor- and pipeline-parallel
ranks of one replica hold the same rows. Log-probs live on the last pipeline stage (where the logits are), so advantages
and losses are computed there; everything a loss is divided by is global to the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gndpo.algorithms.advantages import call_estimator, get_advantage_estimator
from megatron_gndpo.algorithms.losses import POLICY_LOSSES
from megatron_gndpo.algorithms.reduce import aggregate, global_normalizer, masked_sum
from megatron_gndpo.checkpoint.dist_ckpt import CheckpointManager, check_architecture, load_model_weights
from megatron_gndpo.config.loader import config_changes
from megatron_gndpo.config.schema import RunConfig, check_same_vocabulary
from megatron_gndpo.data.prompts import PromptDataset, PromptOrder
from megatron_gndpo.data.tokenizer import check_checkpoint_tokenizers, load_tokenizer
from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
from megatron_gndpo.models.quantization import logprob_error, quantize_teacher
from megatron_gndpo.models.student import build_optimizer, build_scheduler, build_student, unwrap
from megatron_gndpo.models.teacher import OffloadedWeights, build_teacher
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_gndpo.rewards import get_reward
from megatron_gndpo.rollout.generator import Rollout, generate
from megatron_gndpo.trainer.megatron_glue import run_schedule
from megatron_gndpo.trainer.evaluation import greedy_eval, sampling_params
from megatron_gndpo.trainer.metrics import MetricsWriter, PhaseTimer
from megatron_gndpo.trainer.preflight import agree, claim_run, describe_write_failure, probe_writable

log = logging.getLogger(__name__)
MicroBatch = Dict[str, torch.Tensor]


class EmptyStepError(ValueError):
    """Every response of a step is empty: there is nothing to learn from."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); ``latest`` still points to the
    previous one. ``details_elsewhere``: another rank failed and reports the details; this rank has
    only learnt that the save failed."""

    def __init__(self, message: str, *, details_elsewhere: bool = False):
        super().__init__(message)
        self.details_elsewhere = details_elsewhere


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if dist.is_initialized() and (group is None or dist.get_world_size(group) > 1):
        dist.all_reduce(t, op=op, group=group)
    return t


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


def split_rows(batch: MicroBatch, size: int) -> List[MicroBatch]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False):
        self.cfg = cfg
        self.groups = g = init_parallel(cfg.parallel, seed=cfg.seed)
        tc = cfg.trainer
        self.rows_per_rank = tc.prompts_per_step * cfg.rollout.n_samples // g.dp_size
        # Checks before any compute, each decided together so that every rank stops on the same error
        # (preflight.py): the batch layout and the names in the config; rank 0 claims the run's directories
        # (a lock against a second run, and no fresh run over an earlier run's checkpoints); every rank
        # checks that it can write them.
        self.policy_loss, self.reward_fn = agree("checking the config", self._check_layout_and_names)
        self.is_rank0 = dist.get_rank() == 0
        self.is_logging_rank = dist.get_rank() == dist.get_world_size() - 1
        self.checkpoints = CheckpointManager(
            tc.checkpoint_dir,
            layout={"tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size},
            ranks={"tp": g.tp_rank, "pp": g.pp_rank, "dp": g.dp_rank},
        )
        self.claim = claim_run(tc, self.checkpoints, resume=resume)
        agree("checking the run's directories", self._probe_directories)
        agree("checking the initial checkpoints", self._check_initial_checkpoints)

        def tokenizer_and_vocabulary():
            tok = load_tokenizer(cfg.data.tokenizer)
            check_checkpoint_tokenizers(tok, cfg.data.tokenizer, {
                "student_checkpoint": cfg.student_checkpoint, "teacher.checkpoint": cfg.teacher.checkpoint})
            return tok, check_same_vocabulary(len(tok), cfg.model, cfg.teacher.model)

        # every vocab-parallel op on either model's logits masks the ids at or beyond shared_vocab_size
        self.tokenizer, self.shared_vocab_size = agree("checking data.tokenizer against the checkpoints",
                                                       tokenizer_and_vocabulary)
        self.train_data, self.val_data = agree("opening data.train_files and data.val_files", self._open_datasets)
        self.order = PromptOrder(len(self.train_data), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.sampling = sampling_params(cfg.rollout, self.tokenizer)
        # config.yaml is written now, before the models are built, so that a run that fails there has it
        self.metrics: Optional[MetricsWriter] = agree("opening the metrics in trainer.output_dir", self._open_metrics)

        # Transformer Engine's FP8 GEMMs need token counts that are multiples of 16 (see pad_sequence_length).
        self.sequence_multiple = 16 if (cfg.precision.fp8 or cfg.teacher.precision.fp8) else 1
        stage = dict(pre_process=g.is_first_stage, post_process=g.is_last_stage)
        self.model = build_student(cfg.model, cfg.parallel, cfg.precision, **stage)
        self.optimizer = build_optimizer(cfg.optim, cfg.precision, cfg.parallel, self.model)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, tc.steps * tc.mini_batches)
        if cfg.student_checkpoint:
            load_model_weights(unwrap(self.model), cfg.student_checkpoint, cfg.model, "student")
            self.optimizer.reload_model_params()  # fp32 main weights follow the loaded bf16 ones
        offload = cfg.teacher.offload and g.device.type == "cuda"
        self.teacher = build_teacher(cfg.teacher, cfg.parallel, cpu_initialization=True if offload else None, **stage)
        if cfg.teacher.checkpoint:
            load_model_weights(self.teacher, cfg.teacher.checkpoint, cfg.teacher.model, "teacher")
        else:
            log.warning("teacher.checkpoint is not set: the teacher has random weights (tests only)")
        if cfg.teacher.quantize:
            self.teacher.to(g.device)  # calibration runs on the GPU; offloading (below) takes it back
            self.teacher_quant_metrics = self._quantize_teacher()
        else:
            self.teacher_quant_metrics = {}
        self.teacher_offload = OffloadedWeights(self.teacher, g.device) if offload else None

        self.step = 0
        self.skipped_steps = 0
        if resume:
            self._resume()
        if self.claim.resume_from is not None:
            self._follow_config_over_checkpoint(self.claim.resume_from)
        if self.metrics is not None and self.teacher_quant_metrics:
            self.metrics.log(self.step, self.teacher_quant_metrics)

    # --- checks before compute ------------------------------------------------------------------------

    def _check_layout_and_names(self):
        """The batch divides over the layout, and the estimator, policy loss and reward exist."""
        tc, g = self.cfg.trainer, self.groups
        if tc.prompts_per_step % (g.dp_size * tc.mini_batches):
            raise ValueError(f"trainer.prompts_per_step ({tc.prompts_per_step}) must be divisible by the "
                             f"data-parallel size ({g.dp_size}) x trainer.mini_batches ({tc.mini_batches}), so "
                             "that every rank holds whole prompt groups of every mini-batch")
        if self.rows_per_rank % (tc.micro_batch_size * tc.mini_batches):
            raise ValueError(
                f"responses per data-parallel rank ({self.rows_per_rank} = prompts_per_step x n_samples / DP) "
                f"must be divisible by trainer.micro_batch_size ({tc.micro_batch_size}) x "
                f"trainer.mini_batches ({tc.mini_batches})")
        get_advantage_estimator(self.cfg.algorithm.estimator)
        return POLICY_LOSSES.get(self.cfg.algorithm.policy_loss), get_reward(self.cfg.data.reward)

    def _probe_directories(self) -> None:
        probe_writable(self.cfg.trainer.output_dir, "trainer.output_dir")
        probe_writable(self.cfg.trainer.checkpoint_dir, "trainer.save_dir")

    def _check_initial_checkpoints(self) -> None:
        """Each configured checkpoint exists and holds the configured architecture (load_model_weights
        would find out later, after the models are built, on every rank at once)."""
        cfg = self.cfg
        for path, model, role in ((cfg.student_checkpoint, cfg.model, "student"),
                                  (cfg.teacher.checkpoint, cfg.teacher.model, "teacher")):
            if path:
                check_architecture(path, model, role)

    def _open_datasets(self):
        """Training and validation prompts, every prompt measured against data.max_prompt_length."""
        data = self.cfg.data

        def open_files(files: List[str], field: str) -> PromptDataset:
            dataset = PromptDataset(files, self.tokenizer, max_prompt_length=data.max_prompt_length,
                                    images=data.images, overlong=data.overlong_prompts)
            if dataset.dropped and self.is_rank0:
                log.warning("%s: left out %d of %d prompts longer than data.max_prompt_length (%d) "
                            "(data.overlong_prompts=drop)", field, dataset.dropped, dataset.dropped + len(dataset),
                            data.max_prompt_length)
            return dataset

        return (open_files(data.train_files, "data.train_files"),
                open_files(data.val_files, "data.val_files") if data.val_files else None)

    def _open_metrics(self) -> Optional[MetricsWriter]:
        if not self.is_logging_rank:
            return None
        tc = self.cfg.trainer
        return MetricsWriter(tc.output_dir, total_steps=tc.steps, start_step=self.claim.start_step,
                             tensorboard=tc.tensorboard, wandb_project=tc.wandb_project, progress=tc.progress,
                             config=dataclasses.asdict(self.cfg), title=self.cfg.algorithm.estimator.upper())

    def _follow_config_over_checkpoint(self, checkpoint: str) -> None:
        """A resumed run trains with its configuration, not the checkpoint's. Loading restores megatron's
        scheduler state (peak and floor LR, warm-up, horizon, decay style) and, in the optimizer's param
        groups, the peak / floor LR and Adam's betas and eps, all over the configuration: a cosine run
        resumed with a larger trainer.steps would keep the old horizon and train at min_lr, silently.
        So the schedule is rebuilt from the configuration at the checkpoint's optimizer step, the param
        groups take the configured values, and rank 0 logs what differs from the checkpoint."""
        optim, tc = self.cfg.optim, self.cfg.trainer
        restored = self.scheduler.state_dict()
        for group in self.optimizer.param_groups:
            group.update(max_lr=optim.lr, min_lr=optim.min_lr, betas=(optim.adam_beta1, optim.adam_beta2),
                         eps=optim.adam_eps)
        self.scheduler = build_scheduler(optim, self.optimizer, tc.steps * tc.mini_batches)
        self.scheduler.step(increment=restored["num_steps"])
        if not self.is_rank0:
            return
        from megatron.core import dist_checkpointing

        saved = dist_checkpointing.load_common_state_dict(checkpoint)["trainer"].get("config")
        changes = config_changes(saved, dataclasses.asdict(self.cfg)) if saved is not None else []
        if changes:
            log.warning("resumed from %s with a configuration that differs from the checkpoint's: %s", checkpoint,
                        "; ".join(changes))
        schedule = self.scheduler.state_dict()
        differs = [f"{k} {restored[k]!r} -> {v!r}" for k, v in schedule.items() if restored[k] != v]
        if differs:
            log.warning("the LR schedule follows the configuration, not the checkpoint (%s): %s over %d optimizer "
                        "steps, now at step %d with lr %.3g", ", ".join(differs), schedule["lr_decay_style"],
                        schedule["lr_decay_steps"], schedule["num_steps"], self.optimizer.param_groups[0]["lr"])

    # --- the step ---------------------------------------------------------------------------------

    def train_step(self) -> Dict[str, float]:
        cfg, g = self.cfg, self.groups
        timer = PhaseTimer()
        with timer("step"):
            # 1. prompts: every rank draws the same global list and keeps its block of rows
            prompt_ids, truths, rows, prompt_index = self._step_rows()

            # 2. rollout with the student's current weights
            with timer("rollout"):
                rollout = generate(unwrap(self.model), prompt_ids, rows, self.sampling, groups=g,
                                   vocab_size=self.shared_vocab_size, seed=self._sampling_seed(),
                                   max_sequence_length=cfg.model.max_position_embeddings)
            batch = pad_sequence_length(sequences_from_rollout(rollout), self.sequence_multiple,
                                        self.sampling.pad_token_id)
            total_response_tokens = float(_all_reduce(batch["mask"].sum().double(), group=g.dp_cp).item())
            if total_response_tokens == 0:
                raise EmptyStepError(f"step {self.step + 1}: every response of the global batch is empty "
                                     "(0 response tokens); check the prompts, EOS ids and rollout.max_new_tokens")
            rewards = self._rewards(rollout, truths)
            microbatches = split_rows(batch, cfg.trainer.micro_batch_size)

            # 3. the teacher scores the student's exact tokens, at the rollout temperature
            with timer("teacher"), self._teacher_on_device():
                teacher_lp = self._score(self.teacher, microbatches)
            # 4. the student's log-probs of its own samples (the PPO/GSPO "old" policy)
            with timer("old_logprobs"):
                old_lp = self._score(unwrap(self.model), microbatches)

            # 5. advantages, with statistics global over data parallelism (last stage: it has the log-probs)
            adv_stats: Dict[str, float] = {}
            if g.is_last_stage:
                advantages, adv_stats = call_estimator(
                    cfg.algorithm.estimator,
                    {"teacher_logprobs": teacher_lp, "old_logprobs": old_lp, "response_mask": batch["mask"],
                     "rewards": rewards["reward"], "correct": rewards["acc"] > 0.5, "prompt_index": prompt_index},
                    group=g.dp_cp, **cfg.algorithm.estimator_kwargs)
                for mb, t_lp, o_lp, a in zip(microbatches, *(x.split(cfg.trainer.micro_batch_size)
                                                           for x in (teacher_lp, old_lp, advantages))):
                    mb.update(teacher_logprobs=t_lp, old_logprobs=o_lp, advantages=a)

            # 6. policy update: one optimizer step per mini-batch
            with timer("train"):
                per_mini = len(microbatches) // cfg.trainer.mini_batches
                train_metrics: Dict[str, float] = {}
                for i in range(cfg.trainer.mini_batches):
                    for k, v in self._optimizer_step(microbatches[i * per_mini:(i + 1) * per_mini]).items():
                        train_metrics[k] = train_metrics.get(k, 0.0) + v / cfg.trainer.mini_batches
        self.step += 1

        # 7. metrics
        out = {**train_metrics, **{f"score/{k[len('score_'):]}" if k.startswith("score_") else f"estimator/{k}": v
                                   for k, v in adv_stats.items()}}
        out.update(self._rollout_metrics(rollout, batch, rewards, advantages if g.is_last_stage else None))
        tokens = float(_all_reduce((rollout.prompt_lengths.sum() + rollout.response_lengths.sum()).double(),
                                   group=g.dp_cp).item())
        for name, sec in timer.seconds.items():
            out[f"time/{name}_s"] = sec
        out["perf/tokens_per_s"] = tokens / timer.seconds["step"]
        out["actor/skipped_steps"] = float(self.skipped_steps)
        return out

    def _step_rows(self):
        """This rank's rows: prompt ids, ground truths, global row ids and prompt slots."""
        g, n = self.groups, self.cfg.rollout.n_samples
        indices = self.order.take(self.cfg.trainer.prompts_per_step)
        # Mini-batch i is the same global rows at every layout: its i-th block, split over DP ranks.
        mini = self.cfg.trainer.mini_batches
        block, share = self.rows_per_rank * g.dp_size // mini, self.rows_per_rank // mini
        rows = torch.cat([torch.arange(i * block + g.dp_rank * share, i * block + (g.dp_rank + 1) * share,
                                       device=g.device) for i in range(mini)])
        prompt_slot = rows // n
        prompt_ids = [self.train_data.prompt_ids(indices[s]) for s in prompt_slot.tolist()]
        truths = [self.train_data.rows[indices[s]].ground_truth for s in prompt_slot.tolist()]
        return prompt_ids, truths, rows, prompt_slot

    def _sampling_seed(self) -> int:
        return self.cfg.seed * 1_000_003 + self.step

    def _rewards(self, rollout: Rollout, truths: Sequence[str]) -> Dict[str, torch.Tensor]:
        texts = self.tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        scored = [self.reward_fn(text, truth) for text, truth in zip(texts, truths)]
        return {k: torch.tensor([s[k] for s in scored], dtype=torch.float32, device=self.groups.device)
                for k in ("reward", "acc", "format")}

    def _quantize_teacher(self) -> Dict[str, float]:
        """ModelOpt post-training quantisation of the teacher (``teacher.quantize``): scales calibrated
        on the first half of the calibration prompts, then the log-prob error against the unquantised
        teacher measured on the second half (last stage: the metrics; {} elsewhere)."""
        cfg, g, mbs = self.cfg, self.groups, self.cfg.trainer.micro_batch_size
        n = cfg.teacher.calibration_prompts
        if n > len(self.train_data) or (n // 2) % (g.dp_size * mbs):
            raise ValueError(f"teacher.calibration_prompts ({n}) must be at most the training prompts "
                             f"({len(self.train_data)}), and half of it a multiple of the data-parallel size "
                             f"({g.dp_size}) x trainer.micro_batch_size ({mbs})")
        share = n // 2 // g.dp_size

        def rank_rows(first: int) -> List[MicroBatch]:
            start = first + g.dp_rank * share
            prompts = [self.train_data.prompt_ids(i) for i in range(start, start + share)]
            batch = sequences_from_prompts(prompts, self.sampling.pad_token_id, g.device)
            return split_rows(pad_sequence_length(batch, self.sequence_multiple, self.sampling.pad_token_id), mbs)

        calibration, held_out = rank_rows(0), rank_rows(n // 2)
        reference = self._score(self.teacher, held_out)
        self.teacher = quantize_teacher(self.teacher, cfg.teacher.quantize,
                                        lambda model: self._score(model, calibration))
        quantized = self._score(self.teacher, held_out)
        if not g.is_last_stage:
            return {}
        mask = torch.cat([mb["mask"] for mb in held_out])
        error = logprob_error(reference, quantized, mask, g.dp_cp)
        log.warning("teacher quantised with ModelOpt (%s): |log-prob error| mean %.3g, max %.3g over %d held-out "
                    "prompt tokens", cfg.teacher.quantize, error["abs_mean"], error["abs_max"], error["tokens"])
        return {f"teacher_quant/logprob_{k}": v for k, v in error.items()}

    def _teacher_on_device(self):
        """With ``teacher.offload`` on GPUs the teacher's weights live in pinned CPU memory outside its
        scoring phase."""
        return self.teacher_offload.on_device() if self.teacher_offload else contextlib.nullcontext()

    @torch.no_grad()
    def _score(self, model, microbatches: List[MicroBatch]) -> Optional[torch.Tensor]:
        """Sampled-token log-probs ``[B, T]`` from vocab shards (last stage; None elsewhere)."""
        g, cfg = self.groups, self.cfg

        def collect(logits_shard, mb):
            return {"logp": vocab_parallel_logprobs(logits_shard, mb["labels"], group=g.tp,
                                                    temperature=cfg.rollout.temperature,
                                                    vocab_size=self.shared_vocab_size)}

        out = run_schedule(model, microbatches, collect_fn=collect, forward_only=True)
        return torch.cat([o["logp"] for o in out]) if g.is_last_stage else None

    def _optimizer_step(self, microbatches: List[MicroBatch]) -> Dict[str, float]:
        """Forward/backward of one mini-batch through megatron's schedule, then clip + step, unless a
        gradient is non-finite anywhere: then the step is skipped (and counted) and training goes on."""
        g, cfg, alg = self.groups, self.cfg, self.cfg.algorithm
        mask = torch.cat([mb["mask"] for mb in microbatches])
        normalizer = global_normalizer(mask, alg.loss_agg, g.dp_cp)
        n_tokens = global_normalizer(mask, "token-mean", g.dp_cp)

        def loss_fn(logits_shard, mb):
            lp = vocab_parallel_logprobs(logits_shard, mb["labels"], group=g.tp, temperature=cfg.rollout.temperature,
                                         vocab_size=self.shared_vocab_size)
            loss, metrics = self.policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                             normalizer=normalizer, agg=alg.loss_agg, clip_low=alg.clip_low,
                                             clip_high=alg.clip_high)
            with torch.no_grad():
                entropy = vocab_parallel_entropy(logits_shard.detach(), group=g.tp,
                                                 temperature=cfg.rollout.temperature,
                                                 vocab_size=self.shared_vocab_size)
                metrics["entropy"] = aggregate(entropy, mb["mask"], "token-mean", n_tokens)
            metrics["policy_loss"] = loss.detach()
            return loss, metrics

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.model.train()
        out = run_schedule(self.model, microbatches, loss_fn=loss_fn, forward_only=False)

        # Every main_grad is a view into one of DDP's flat grad buffers: a few reductions, one sync.
        grad_buffers = [b.grad_data for b in self.model.buffers + self.model.expert_parallel_buffers]
        finite = torch.stack([torch.isfinite(grad).all() for grad in grad_buffers]).all().float()
        finite = _all_reduce(finite, dist.ReduceOp.MIN)
        metrics: Dict[str, float] = {"actor/lr": self.optimizer.param_groups[0]["lr"]}  # the LR this step uses
        if finite.item() == 1.0:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        else:
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients; optimizer step skipped (%d skipped so far)",
                        self.step + 1, self.skipped_steps)
            metrics["actor/grad_norm"] = float("nan")
        if g.is_last_stage:
            keys = sorted(out[0])
            sums = torch.stack([sum(o[k].double() for o in out) for k in keys])
            sums = _all_reduce(sums, group=g.dp_cp)
            metrics.update({f"actor/{k}": float(v) for k, v in zip(keys, sums.tolist())})
        return metrics

    def _rollout_metrics(self, rollout, batch, rewards, advantages) -> Dict[str, float]:
        g = self.groups
        resp = rollout.response_lengths.double()
        local = torch.stack([
            torch.tensor(float(resp.numel()), dtype=torch.float64, device=g.device), resp.sum(),
            rollout.truncated.double().sum(),
            rewards["reward"].double().sum(), rewards["acc"].double().sum(), rewards["format"].double().sum(),
        ])
        s = _all_reduce(local, group=g.dp_cp).tolist()
        longest = _all_reduce(resp.max().reshape(1), dist.ReduceOp.MAX, g.dp_cp).item()
        out = {"response/length_mean": s[1] / s[0], "response/length_max": longest,
               "response/truncated_frac": s[2] / s[0], "reward": s[3] / s[0], "acc": s[4] / s[0],
               "format": s[5] / s[0]}
        if advantages is not None:
            m = batch["mask"]
            a = advantages.double()
            big = torch.finfo(torch.float64).max
            sums = _all_reduce(torch.stack([m.sum().double(), masked_sum(a, m), masked_sum(a * a, m)]), group=g.dp_cp)
            ext = _all_reduce(torch.stack([torch.where(m, a, -big).max(), torch.where(m, -a, -big).max()]),
                              dist.ReduceOp.MAX, g.dp_cp)
            n, tot, sq = sums.tolist()
            mean = tot / n
            out.update({"adv/mean": mean, "adv/std": math.sqrt(max(sq / n - mean * mean, 0.0)),
                        "adv/max": ext[0].item(), "adv/min": -ext[1].item()})
        return out

    # --- validation ---------------------------------------------------------------------------------

    def validate(self) -> Dict[str, float]:
        """Greedy responses to the first ``val_prompts`` held-out prompts: mean reward / accuracy."""
        return greedy_eval(unwrap(self.model), self.val_data, self.tokenizer, self.reward_fn, self.sampling,
                           groups=self.groups, vocab_size=self.shared_vocab_size,
                           max_sequence_length=self.cfg.model.max_position_embeddings,
                           limit=self.cfg.trainer.val_prompts)

    # --- checkpoints and the loop ---------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        # the config, so that a resumed run can say what it changes (_follow_config_over_checkpoint)
        return {"step": self.step, "skipped_steps": self.skipped_steps, "data": self.order.state_dict(),
                "config": dataclasses.asdict(self.cfg)}

    def save(self):
        return self.checkpoints.save(self.step, unwrap(self.model), self.optimizer, self.scheduler,
                                     model_config=self.cfg.model, trainer_state=self._trainer_state(),
                                     tokenizer=self.cfg.data.tokenizer, keep=self.cfg.trainer.keep_checkpoints)

    def _resume(self):
        path = self.checkpoints.resume_point()  # a damaged `latest` falls back, with a warning, to an intact one
        if path is None:
            log.warning("--resume: no checkpoint under %s; starting from scratch", self.checkpoints.root)
            return
        state = self.checkpoints.load(path, unwrap(self.model), self.optimizer, self.scheduler,
                                      model_config=self.cfg.model)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.order.load_state_dict(state["data"])
        log.warning("resumed from %s at step %d", path, self.step)

    def _log(self, metrics: Dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log(self.step, metrics)

    def train(self) -> None:
        tc = self.cfg.trainer
        try:
            if self.val_data is not None and tc.val_interval and self.step == 0:
                self._log(self.validate())
            while self.step < tc.steps:
                metrics = self.train_step()
                if self.val_data is not None and tc.val_interval and (
                        self.step % tc.val_interval == 0 or self.step == tc.steps):
                    metrics.update(self.validate())
                self._log(metrics)
                if (tc.save_interval and self.step % tc.save_interval == 0) or self.step == tc.steps:
                    self._save_checkpoint()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def _save_checkpoint(self) -> None:
        """``save()``, timed. A failed write (disk full, permissions) stops the run with a message that
        names the path and errno and says which checkpoint ``latest`` still points to; megatron reports a
        failure on any rank to every rank, with the details on rank 0 alone."""
        from torch.distributed.checkpoint import CheckpointException

        start = time.perf_counter()
        try:
            path = self.save()
        except (Exception, CheckpointException) as e:
            previous = self.checkpoints.latest()
            kept = f"latest still points to {previous}" if previous else "there is no earlier checkpoint"
            raise CheckpointSaveError(
                f"the step-{self.step} checkpoint could not be written under {self.checkpoints.root}: "
                f"{describe_write_failure(e, self.checkpoints.root, 'trainer.save_dir')}; {kept}",
                details_elsewhere=isinstance(e, CheckpointException) and not e.failures) from e
        if self.is_rank0:
            log.info("checkpoint saved to %s (%.1f s)", path, time.perf_counter() - start)

    def close(self, destroy_process_group: bool = True) -> None:
        self.claim.release()
        destroy_parallel(destroy_process_group)

