"""What a plan is made for: the layout of the GPUs (:class:`Layout`) and the shape and numerics of one
training step (:class:`Workload`), read from the command line or from a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_gndpo.config.schema import RunConfig


@dataclass(frozen=True)
class Layout:
    """TP x PP x CP x DP = the number of GPUs."""

    tp: int
    pp: int
    dp: int
    cp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"


@dataclass(frozen=True)
class Workload:
    """One training step: every row is taken at full length (``max_prompt`` + ``max_response``), the
    bound a run must fit in."""

    prompts_per_step: int = 32
    """Prompts per step over all data-parallel ranks."""
    samples: int = 16
    """Responses per prompt; a step has ``prompts_per_step x samples`` rows."""
    max_prompt: int = 256
    """Prompt tokens per row."""
    max_response: int = 256
    """Response tokens per row."""
    micro_batch_size: int = 4
    """Rows per forward / backward pass on one rank."""
    max_tokens_per_microbatch: Optional[int] = None
    """Micro-batches formed by a token budget instead (the trainer's key of that name, packed or not): a
    pass then holds at most this many tokens, whatever ``micro_batch_size`` says."""
    mini_batches: int = 1
    """Optimizer steps per rollout."""
    param_bytes: int = 2
    """Bytes per weight and activation value: 2 (bf16, GPUs), 4 (float32, the CPU runs)."""
    distributed_optimizer: bool = True
    """megatron's ZeRO-1: fp32 main weights and Adam moments split over DP."""
    sequence_parallel: bool = False
    """Norm and residual activations split over TP as well."""
    recompute: bool = False
    """Full activation recomputation: a layer keeps only its input between forward and backward."""
    transformer_impl: Literal["transformer_engine", "local"] = "transformer_engine"
    """The layers' implementation: Transformer Engine's fused ones (GPUs) or megatron's local spec
    (the CPU runs); they keep different activations."""
    teacher: Literal["bf16", "fp8", "offload"] = "bf16"
    """The teacher's weights on the GPU: in the student's dtype, its decoder linears in FP8 (ModelOpt), or in
    host memory outside the scoring phase."""
    top_k: Optional[int] = None
    """Teacher top-k log-probs kept per token for a top-k KL (None: only the sampled token's)."""

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples

    @property
    def sequence(self) -> int:
        return self.max_prompt + self.max_response

    @property
    def microbatch_rows(self) -> float:
        """Full-length rows' worth of tokens in one pass: ``micro_batch_size``, or with a token budget
        ``budget / sequence`` -- the budget is the bound whether its rows are padded or packed (packed
        rows fill it with shorter responses; at full length they hold as many rows as padded ones)."""
        if self.max_tokens_per_microbatch is None:
            return self.micro_batch_size
        return self.max_tokens_per_microbatch / self.sequence

    def __post_init__(self):
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < self.sequence:
            raise ValueError(f"max_tokens_per_microbatch ({self.max_tokens_per_microbatch}) must hold a full-length "
                             f"row, max_prompt + max_response = {self.sequence} tokens")


def workload_from_config(cfg: RunConfig) -> Workload:
    """The step a run config describes ('auto' precision is planned as bf16: the GPU case)."""
    return Workload(
        prompts_per_step=cfg.trainer.prompts_per_step, samples=cfg.rollout.n_samples,
        max_prompt=cfg.data.max_prompt_length, max_response=cfg.rollout.max_new_tokens,
        micro_batch_size=cfg.trainer.micro_batch_size, max_tokens_per_microbatch=cfg.trainer.max_tokens_per_microbatch,
        mini_batches=cfg.trainer.mini_batches,
        param_bytes=4 if cfg.precision.params_dtype == "float32" else 2,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        sequence_parallel=cfg.parallel.sequence_parallel,
        transformer_impl="local" if cfg.precision.transformer_impl == "local" else "transformer_engine",
        teacher="offload" if cfg.teacher.offload else ("fp8" if cfg.teacher.quantize else "bf16"))
