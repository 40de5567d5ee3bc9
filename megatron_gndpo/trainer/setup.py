"""A run's setup: the checks before any compute, what they open (tokenizer, prompts, metrics), and the
two models.

Each check runs through ``preflight.agree``, decided together so that every rank stops on the same
error: the batch layout and the names in the config; rank 0 claims the run's directories (a lock
against a second run, and no fresh run over an earlier run's checkpoints); every rank checks that it
can write them; the initial checkpoints' architectures and tokenizers (vision-language ones with images); every
prompt's length; that the teacher sees the student's image layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, List, Optional, Tuple

import torch.distributed as dist

from megatron_gndpo.algorithms.advantages import get_advantage_estimator
from megatron_gndpo.algorithms.losses import POLICY_LOSSES
from megatron_gndpo.checkpoint.dist_ckpt import TOKENIZER_DIR, CheckpointManager, check_architecture
from megatron_gndpo.checkpoint.metadata import resolve_checkpoint
from megatron_gndpo.checkpoint.vision import is_vision_language
from megatron_gndpo.algorithms.losses import DISTRIBUTION_DIVERGENCES
from megatron_gndpo.config.schema import AlgorithmConfig, DataConfig, RunConfig, TeacherConfig, check_same_vocabulary
from megatron_gndpo.data.prompts import PromptDataset
from megatron_gndpo.data.tokenizer import check_checkpoint_tokenizers, load_tokenizer
from megatron_gndpo.data.vision import VisionProcessor, load_vision_processor
from megatron_gndpo.distributed.init import ProcessGroups, layout_groups
from megatron_gndpo.models.student import Student
from megatron_gndpo.models.teacher import Teacher, TeacherOnOwnLayout
from megatron_gndpo.rewards import get_reward
from megatron_gndpo.rollout.generator import SamplingParams
from megatron_gndpo.trainer.batches import (
    MicroBatch,
    form_microbatches,
    pad_sequence_length,
    sequences_from_prompts,
    split_rows,
)
from megatron_gndpo.trainer.evaluation import sampling_params
from megatron_gndpo.trainer.images import check_same_image_layout
from megatron_gndpo.trainer.megatron_glue import LogitsReadout
from megatron_gndpo.trainer.metrics import MetricsWriter
from megatron_gndpo.trainer.preflight import RunClaim, agree, claim_run, probe_writable
from megatron_gndpo.trainer.rank_logging import rank0_logger

log0 = rank0_logger(__name__)


@dataclasses.dataclass
class RunSetup:
    """What the checks decided and opened, the same on every rank (``metrics``: the logging rank's)."""

    checkpoints: CheckpointManager
    claim: RunClaim
    policy_loss: Callable
    reward_fn: Callable
    tokenizer: Any
    vocab_size: int
    """The vocabulary student and teacher share: every vocab-parallel op on either model's logits masks
    the ids at or beyond it."""
    train_data: PromptDataset
    val_data: Optional[PromptDataset]
    sampling: SamplingParams
    sequence_multiple: int
    """What every micro-batch's sequence length is a multiple of (:func:`sequence_multiple`)."""
    calibration: Optional[Tuple[List[MicroBatch], List[MicroBatch]]]
    """``teacher.quantize``: this rank's calibration and held-out prompt micro-batches."""
    metrics: Optional[MetricsWriter]


def sequence_multiple(*, fp8: bool, context_parallel: int) -> int:
    """Transformer Engine's FP8 GEMMs need token counts that are multiples of 16 (``pad_sequence_length``);
    context parallelism cuts each sequence into 2 CP equal chunks, and with FP8 each rank's T / CP tokens
    must still be a multiple of 16."""
    base = 16 if fp8 else 1
    return base if context_parallel == 1 else math.lcm(base * context_parallel, 2 * context_parallel)


def prepare_run(cfg: RunConfig, groups: ProcessGroups, *, resume: bool) -> RunSetup:
    """Collective: every check before compute, in order, and what they open."""
    tc = cfg.trainer
    policy_loss, reward_fn = agree("checking the config", lambda: _check_layout_and_names(cfg, groups))
    checkpoints = CheckpointManager(tc.checkpoint_dir,
                                    layout={"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size,
                                            "cp": groups.cp_size},
                                    ranks={"tp": groups.tp_rank, "pp": groups.pp_rank, "dp": groups.dp_rank,
                                           "cp": groups.cp_rank})
    claim = claim_run(tc, checkpoints, resume=resume)
    agree("checking the run's directories", lambda: (probe_writable(tc.output_dir, "trainer.output_dir"),
                                                     probe_writable(tc.checkpoint_dir, "trainer.save_dir")))
    agree("checking the initial checkpoints", lambda: _check_initial_checkpoints(cfg))
    tokenizer, vocab_size = agree("checking data.tokenizer against the checkpoints", lambda: _tokenizer(cfg))
    processor = agree("loading the checkpoints' vision processors", lambda: _vision_processor(cfg, tokenizer)) \
        if cfg.data.images == "process" else None
    train_data, val_data = agree("opening data.train_files and data.val_files",
                                 lambda: _open_datasets(cfg.data, tokenizer, processor))
    if processor is not None:
        agree("checking that the teacher sees the student's image layout",
              lambda: _check_teacher_layout(cfg, processor, train_data))
    sampling = sampling_params(cfg.rollout, tokenizer)
    multiple = sequence_multiple(fp8=bool(cfg.precision.fp8 or cfg.teacher.precision.fp8),
                                 context_parallel=cfg.parallel.context_parallel_size)
    calibration = agree("choosing the teacher's calibration prompts (teacher.calibration_prompts)",
                        lambda: _calibration(cfg, groups, train_data, sampling.pad_token_id, multiple)) \
        if cfg.teacher.quantize else None
    # config.yaml is written now, before the models are built, so that a run that fails there has it
    metrics = agree("opening the metrics in trainer.output_dir", lambda: _open_metrics(cfg, claim.start_step))
    return RunSetup(checkpoints, claim, policy_loss, reward_fn, tokenizer, vocab_size, train_data, val_data, sampling,
                    multiple, calibration, metrics)


def build_models(cfg: RunConfig, groups: ProcessGroups,
                 run: RunSetup) -> Tuple[Student, Teacher | TeacherOnOwnLayout, Optional[Teacher]]:
    """Collective: the student (with its optimizer and schedule), the teacher (on the student's groups, or
    on its own with ``teacher.parallel``) and, for gopd, the frozen reference policy, loaded. All read
    their logits over their TP group and the shared vocabulary; the student and the reference at the
    rollout temperature, the teacher at ``teacher.temperature`` (default the same)."""
    readout = LogitsReadout(groups.tp, cfg.rollout.temperature, run.vocab_size)
    student = Student(cfg, groups, readout, total_optimizer_steps=cfg.trainer.steps * cfg.trainer.mini_batches)
    own = layout_groups(cfg.teacher_parallel, groups.device) if cfg.teacher_on_own_layout else groups
    teacher = Teacher(cfg.teacher, cfg.teacher_parallel, own,
                      LogitsReadout(own.tp, cfg.teacher.temperature or cfg.rollout.temperature, run.vocab_size),
                      calibration=run.calibration, top_k=_teacher_top_k(cfg.algorithm))
    if cfg.teacher_on_own_layout:  # it scores rows sent to it, in micro-batches of its own
        tc = cfg.trainer
        teacher = TeacherOnOwnLayout(teacher, groups, functools.partial(
            form_microbatches, mini_batches=1, micro_batch_size=tc.micro_batch_size,
            max_tokens=tc.max_tokens_per_microbatch, pack=tc.pack_sequences, multiple=run.sequence_multiple,
            pad_token_id=run.sampling.pad_token_id))
    reference = _reference(cfg, groups, readout, student) if cfg.algorithm.estimator == "gopd" else None
    return student, teacher, reference


def _teacher_top_k(algorithm: AlgorithmConfig) -> Optional[int]:
    """How many top ids the teacher keeps per token: ``divergence.top_k`` when a divergence term over the
    distributions or vopd's KL reads them; None (none kept) otherwise."""
    div = algorithm.divergence
    reads = div.kind in DISTRIBUTION_DIVERGENCES or algorithm.estimator == "vopd"
    return div.top_k if reads else None


def _reference(cfg: RunConfig, groups: ProcessGroups, readout: LogitsReadout, student: Student) -> Teacher:
    """gopd's reference policy: ``algorithm.reference_checkpoint``, else the student's initial weights
    (its checkpoint, or a copy of its random initialisation), frozen and inference only like the teacher."""
    spec = TeacherConfig(model=cfg.model, precision=cfg.precision, offload=cfg.teacher.offload,
                         checkpoint=cfg.algorithm.reference_checkpoint or cfg.student_checkpoint)
    reference = Teacher(spec, cfg.parallel, groups, readout, role="ref")
    if not spec.checkpoint:
        reference.model.load_state_dict(student.module.state_dict())
    return reference


def is_logging_rank() -> bool:
    """The last global rank writes the metrics: it holds the losses, which live on the last pipeline stage."""
    return dist.get_rank() == dist.get_world_size() - 1


def _check_layout_and_names(cfg: RunConfig, groups: ProcessGroups):
    """The batch divides over the layout, and the estimator, policy loss and reward exist."""
    tc = cfg.trainer
    if tc.prompts_per_step % (groups.dp_size * tc.mini_batches):
        raise ValueError(f"trainer.prompts_per_step ({tc.prompts_per_step}) must be divisible by the "
                         f"data-parallel size ({groups.dp_size}) x trainer.mini_batches ({tc.mini_batches}), so "
                         "that every rank holds whole prompt groups of every mini-batch")
    rows_per_rank = tc.prompts_per_step * cfg.rollout.n_samples // groups.dp_size
    if rows_per_rank % (tc.micro_batch_size * tc.mini_batches):
        raise ValueError(
            f"responses per data-parallel rank ({rows_per_rank} = prompts_per_step x n_samples / DP) "
            f"must be divisible by trainer.micro_batch_size ({tc.micro_batch_size}) x "
            f"trainer.mini_batches ({tc.mini_batches})")
    get_advantage_estimator(cfg.algorithm.estimator)
    return POLICY_LOSSES.get(cfg.algorithm.policy_loss), get_reward(cfg.data.reward)


def _check_initial_checkpoints(cfg: RunConfig) -> None:
    """Each configured checkpoint exists and holds the configured architecture (loading would find out
    later, after the models are built, on every rank at once). With ``data.images=process`` student and
    teacher are vision-language checkpoints (their ``model`` is their language model's), and a
    vision-language checkpoint needs ``data.images=process``."""
    for path, model, role in ((cfg.student_checkpoint, cfg.model, "student"),
                              (cfg.teacher.checkpoint, cfg.teacher.model, "teacher"),
                              (cfg.algorithm.reference_checkpoint, cfg.model, "reference")):
        if path:
            check_architecture(path, model, role)
    images = cfg.data.images == "process"
    for path, field in ((cfg.student_checkpoint, "student_checkpoint"), (cfg.teacher.checkpoint, "teacher.checkpoint"),
                        (cfg.algorithm.reference_checkpoint, "algorithm.reference_checkpoint")):
        vision_language = bool(path) and is_vision_language(path)
        if images and not vision_language and field != "algorithm.reference_checkpoint":
            raise ValueError(f"data.images=process needs a vision-language {field} (an InternVL or Qwen2.5-VL "
                             f"checkpoint converted with `megatron-gndpo convert hf-to-megatron`), got "
                             f"{path or 'none'}: a text model has no vision tower to see the images")
        if vision_language and not images:
            # the paths that take images are the ones data.images=process opens; rows without images stay text
            raise ValueError(f"{field} {path} is a vision-language checkpoint: set data.images=process (rows "
                             f"without images stay text-only), not {cfg.data.images!r}")


def _vision_processor(cfg: RunConfig, tokenizer) -> VisionProcessor:
    """The student checkpoint's vision processor (its ``tokenizer/`` directory), which lays the images out."""
    return load_vision_processor(str(resolve_checkpoint(cfg.student_checkpoint) / TOKENIZER_DIR), tokenizer)


def _check_teacher_layout(cfg: RunConfig, processor: VisionProcessor, train_data: PromptDataset) -> None:
    """The teacher's processor (its checkpoint's ``tokenizer/``) writes the student's image-token layout and
    pixels for the first training prompt with images: the teacher scores the student's tokens with the
    student's pixels (``check_same_image_layout``)."""
    row = next((r for r in train_data.rows if r.images), None)
    if row is None:
        return
    teacher_dir = str(resolve_checkpoint(cfg.teacher.checkpoint) / TOKENIZER_DIR)
    teacher = load_vision_processor(teacher_dir, load_tokenizer(teacher_dir))
    check_same_image_layout(processor, teacher, row.messages, row.images, where=f"{row.path}: row {row.file_row}")


def _tokenizer(cfg: RunConfig):
    """data.tokenizer, the same as the checkpoints' own, and the vocabulary both models share."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_checkpoint_tokenizers(tokenizer, cfg.data.tokenizer, {
        "student_checkpoint": cfg.student_checkpoint, "teacher.checkpoint": cfg.teacher.checkpoint,
        "algorithm.reference_checkpoint": cfg.algorithm.reference_checkpoint})
    return tokenizer, check_same_vocabulary(len(tokenizer), cfg.model, cfg.teacher.model)


def _open_datasets(data: DataConfig, tokenizer, processor: Optional[VisionProcessor]):
    """Training and validation prompts, every prompt measured against data.max_prompt_length (image
    tokens included: ``processor`` lays the images out)."""
    def open_files(files: List[str], field: str) -> PromptDataset:
        dataset = PromptDataset(files, tokenizer, max_prompt_length=data.max_prompt_length, images=data.images,
                                overlong=data.overlong_prompts, processor=processor)
        if dataset.dropped:
            log0.warning("%s: left out %d of %d prompts longer than data.max_prompt_length (%d) "
                         "(data.overlong_prompts=drop)", field, dataset.dropped, dataset.dropped + len(dataset),
                         data.max_prompt_length)
        return dataset

    return (open_files(data.train_files, "data.train_files"),
            open_files(data.val_files, "data.val_files") if data.val_files else None)


def _calibration(cfg: RunConfig, groups: ProcessGroups, train_data: PromptDataset, pad_token_id: int,
                 multiple: int) -> Tuple[List[MicroBatch], List[MicroBatch]]:
    """This rank's share of the first and of the second half of the first ``teacher.calibration_prompts``
    training prompts, as micro-batches: ModelOpt calibrates on the first half, the log-prob error is
    measured on the second."""
    n, mbs = cfg.teacher.calibration_prompts, cfg.trainer.micro_batch_size
    if n > len(train_data) or (n // 2) % (groups.dp_size * mbs):
        raise ValueError(f"teacher.calibration_prompts ({n}) must be at most the training prompts "
                         f"({len(train_data)}), and half of it a multiple of the data-parallel size "
                         f"({groups.dp_size}) x trainer.micro_batch_size ({mbs})")
    share = n // 2 // groups.dp_size

    def rank_rows(first: int) -> List[MicroBatch]:
        start = first + groups.dp_rank * share
        batch = sequences_from_prompts([train_data.prompt_ids(i) for i in range(start, start + share)], pad_token_id,
                                       groups.device)
        return split_rows(pad_sequence_length(batch, multiple, pad_token_id), mbs)

    return rank_rows(0), rank_rows(n // 2)


def _open_metrics(cfg: RunConfig, start_step: int) -> Optional[MetricsWriter]:
    if not is_logging_rank():
        return None
    tc = cfg.trainer
    return MetricsWriter(tc.output_dir, total_steps=tc.steps, start_step=start_step, tensorboard=tc.tensorboard,
                         wandb_project=tc.wandb_project, progress=tc.progress, config=dataclasses.asdict(cfg),
                         title=cfg.algorithm.estimator.upper())
