"""Typed run configuration: one dataclass per concern, composed into :class:`RunConfig`.

Nothing here imports torch.distributed or megatron; ``models/provider.py`` is the single place that
translates these into megatron-core's ``TransformerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    """A Llama / Qwen2 / Qwen3-family decoder, with Hugging Face field names where they exist."""

    vocab_size: int = 1024
    """True (unpadded) vocabulary size; megatron pads it to a multiple of
    ``make_vocab_size_divisible_by * tensor_model_parallel_size``."""
    hidden_size: int = 64
    """Model width."""
    num_hidden_layers: int = 2
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: Optional[int] = None
    """Key/value heads (query groups, GQA); None means equal to num_attention_heads (MHA)."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    intermediate_size: int = 128
    """SwiGLU hidden width (per gate/up branch)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Optional[Literal["linear", "llama3"]] = None
    """RoPE frequency scaling (Hugging Face ``rope_parameters["rope_type"]``): None is plain RoPE;
    'linear' divides every position by ``rope_scaling_factor`` (position interpolation); 'llama3' is
    Llama-3.1/3.2/3.3's smooth per-frequency scaling with megatron-core's fixed low_freq_factor 1,
    high_freq_factor 4 and original_max_position_embeddings 8192 (what every Llama-3.x uses; other
    values are refused at conversion, megatron-core cannot compute them)."""
    rope_scaling_factor: Optional[float] = None
    """The scaling factor (HF ``factor``, >= 1); set exactly when ``rope_scaling`` is."""
    mrope_section: Optional[List[int]] = None
    """M-RoPE (Qwen2.5-VL's language model): how many rotary frequency pairs the temporal, height and
    width positions each take, summing to ``head_dim / 2`` (HF ``rope_parameters["mrope_section"]``);
    the model then takes 3-D positions. None is 1-D RoPE."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys (Qwen3)."""
    attention_bias: bool = False
    """Bias on the fused QKV projection (Qwen2 / Qwen2.5)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the LM head."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + response) the model is built for."""
    make_vocab_size_divisible_by: int = 128
    """Padding granularity of the vocabulary, per tensor-parallel rank (megatron's convention)."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}) unless head_dim is set",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            _check(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)!r}")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"model.num_key_value_heads ({self.num_key_value_heads})",
        )
        # checked here too, not only by the YAML loader: checkpoint metadata builds ModelConfig directly
        _check(self.rope_scaling in (None, "linear", "llama3"),
               f"model.rope_scaling must be None, 'linear' or 'llama3', got {self.rope_scaling!r}")
        _check((self.rope_scaling is None) == (self.rope_scaling_factor is None),
               f"model.rope_scaling_factor ({self.rope_scaling_factor!r}) must be set exactly when "
               f"model.rope_scaling ({self.rope_scaling!r}) is")
        _check(self.rope_scaling_factor is None or self.rope_scaling_factor >= 1.0,
               f"model.rope_scaling_factor must be >= 1, got {self.rope_scaling_factor!r}")
        if self.mrope_section is not None:
            self.mrope_section = [int(n) for n in self.mrope_section]
            _check(len(self.mrope_section) == 3 and min(self.mrope_section) > 0
                   and 2 * sum(self.mrope_section) == self.head_dim,
                   f"model.mrope_section must be 3 positive sizes summing to head_dim / 2 ({self.head_dim // 2}), "
                   f"got {self.mrope_section!r}")
            _check(self.rope_scaling is None, f"model.mrope_section with model.rope_scaling={self.rope_scaling!r}: "
                   "M-RoPE is supported without frequency scaling only")

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """How one model is split; data parallelism takes the rest of the world."""

    tensor_model_parallel_size: int = 1
    """TP: attention heads, MLP columns and the vocabulary are split over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: layers are split into this many stages, run with megatron-core's 1F1B schedule."""
    context_parallel_size: int = 1
    """CP: each micro-batch's sequence is split over this many ranks (megatron-core's load-balanced chunks;
    docs/context_parallel.md); they hold the same rows, like TP ranks. Attention through Transformer Engine,
    or on the local spec through the project's SDPA attention (K / V all-gathered)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in the TP regions (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """megatron's ZeRO-1 optimizer (CUDA only: its buffers are CUDA throughout)."""

    def __post_init__(self):
        _check(self.tensor_model_parallel_size >= 1,
               f"parallel.tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        _check(self.pipeline_model_parallel_size >= 1,
               f"parallel.pipeline_model_parallel_size must be >= 1, got {self.pipeline_model_parallel_size}")
        _check(self.context_parallel_size >= 1,
               f"parallel.context_parallel_size must be >= 1, got {self.context_parallel_size}")
        _check(not (self.sequence_parallel and self.tensor_model_parallel_size == 1),
               "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")

    def check_model(self, model: ModelConfig, role: str, section: str = "parallel") -> None:
        """Divisibility rules megatron asserts deep inside; checked here to name the field (of ``section``,
        where this layout was set)."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            _check(getattr(model, name) % tp == 0,
                   f"{role}.{name} ({getattr(model, name)}) must be divisible by "
                   f"{section}.tensor_model_parallel_size ({tp})")
        _check(model.num_hidden_layers % pp == 0,
               f"{role}.num_hidden_layers ({model.num_hidden_layers}) must be divisible by "
               f"{section}.pipeline_model_parallel_size ({pp})")


@dataclass
class TeacherLayoutConfig:
    """The teacher's own TP x PP layout over the same world; its data parallelism takes the rest
    (world / (TP x PP) ranks, which may differ from the student's)."""

    tensor_model_parallel_size: int = 1
    """The teacher's TP (its heads, MLP columns and vocabulary split over this many ranks)."""
    pipeline_model_parallel_size: int = 1
    """The teacher's PP (its layers split into this many stages)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            _check(getattr(self, name) >= 1, f"teacher.parallel.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PrecisionConfig:
    """Numerics of the transformer layers; log-probs and losses are always float32."""

    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and activations (bf16 keeps fp32 main weights in the optimizer); 'auto': bfloat16 when
    CUDA is present, float32 on CPU."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: Transformer Engine when TE and CUDA are present ('auto'), or megatron's local layers."""
    local_attention: Literal["megatron", "sdpa"] = "sdpa"
    """Core attention of the local spec: 'sdpa' is torch's scaled_dot_product_attention (flash / memory-
    efficient kernels on GPUs, GQA without repeating K/V), 'megatron' is megatron-core's unfused
    DotProductAttention (baddbmm + fp32 softmax). Same results to float tolerance."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 GEMMs through Transformer Engine (None: off)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine scaling recipe ('mxfp8' needs a Blackwell GPU and is refused elsewhere)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is chosen from the history."""

    def __post_init__(self):
        _check(not (self.fp8 and self.transformer_impl == "local"),
               "precision.fp8 needs precision.transformer_impl 'transformer_engine' or 'auto'")
        _check(self.fp8_amax_history_len >= 1,
               f"precision.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")


@dataclass
class TeacherConfig:
    """The frozen teacher: its own architecture (same tokenizer) and numerics."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden_size=96, num_hidden_layers=3))
    """Teacher architecture; its vocab_size may differ from the student's (both must hold the tokenizer)."""
    precision: Optional[PrecisionConfig] = None
    """None: the student's precision (an FP8 teacher with a BF16 student is allowed)."""
    checkpoint: Optional[str] = None
    """Megatron dist-checkpoint directory with the teacher's weights (None: random init, tests only)."""
    offload: bool = False
    """Keep teacher weights in CPU memory between scoring phases (GPU only)."""
    quantize: Optional[Literal["fp8"]] = None
    """Post-training quantisation with NVIDIA ModelOpt after loading: "fp8" stores the decoder's linear
    weights in FP8 E4M3 with calibrated per-tensor scales (embedding and LM head keep their precision);
    the log-prob error against the unquantised teacher is logged as ``teacher_quant/*``. Needs
    nvidia-modelopt."""
    temperature: Optional[float] = None
    """The temperature the teacher scores at; None: the rollout temperature, as the student is scored.
    The GNDPO reference scores its teacher at 1 whatever the rollout temperature (and its students at
    the rollout temperature); the two coincide at its rollout temperature of 1."""
    calibration_prompts: int = 64
    """With ``quantize``: the first training prompts (file order; split over data-parallel ranks) that
    the teacher scores before and after quantisation: the first half calibrates the scales, the
    second half measures the log-prob error."""
    parallel: Optional[TeacherLayoutConfig] = None
    """The teacher's own TP x PP layout (docs/teacher_layout.md); None, or the student's sizes: the
    student's layout and groups. Another layout builds the teacher on process groups of its own and moves
    the step's token ids to it and its log-probs back (never logits)."""

    def __post_init__(self):
        _check(self.temperature is None or self.temperature > 0,
               f"teacher.temperature must be > 0, got {self.temperature}")
        _check(self.calibration_prompts >= 2 and self.calibration_prompts % 2 == 0,
               f"teacher.calibration_prompts must be an even number >= 2, got {self.calibration_prompts}")


@dataclass
class OptimConfig:
    """AdamW on the student through megatron's optimizer (fp32 main weights under bf16)."""

    lr: float = 1e-6
    """Peak learning rate (GNDPO reference: 1e-6)."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up (reference: constant)."""
    lr_warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay (reference: 0.01)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (reference: 1.0); 0 disables."""

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _check(self.lr_warmup_steps >= 0, f"optim.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _check(self.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass
class RolloutConfig:
    """How the student samples responses (vLLM's parameter names)."""

    engine: Literal["megatron", "vllm"] = "megatron"
    """'megatron': the embedded KV-cached sampler on the training weights (any TP x PP). 'vllm' is
    reserved: its weight sync exists (``rollout/weight_sync.py``), the engine awaits a GPU to be verified."""
    n_samples: int = 16
    """Responses per prompt (reference: 16)."""
    temperature: float = 1.0
    """Sampling temperature; teacher and student log-probs are taken at the same temperature (reference: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    max_new_tokens: int = 256
    """Longest response."""
    continuous_batching: bool = False
    """In-flight batching (``rollout/continuous.py``): a row that finishes hands its decode slot to the next
    pending prompt, so the decode batch stays full until the queue drains. The same tokens as the static
    sampler for the same seed (the sampling noise is keyed on row and position, not on the slot). Needs the
    local layer spec with SDPA core attention; not with data.images=process."""
    decode_slots: Optional[int] = None
    """Rows decoded at a time with ``continuous_batching`` (its KV cache holds this many rows); None: one
    per row of the rank's batch, so no slot is refilled but finished rows leave the decode batch."""

    def __post_init__(self):
        _check(self.engine == "megatron",
               "rollout.engine='vllm' is not available in this release (the vLLM engine has not been verified on "
               "a GPU yet; its weight sync, rollout/weight_sync.py, is ready): use rollout.engine='megatron'")
        _check(self.n_samples >= 1, f"rollout.n_samples must be >= 1, got {self.n_samples}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0 for training rollouts, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"rollout.top_k must be >= 0, got {self.top_k}")
        _check(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.decode_slots is None or self.decode_slots >= 1,
               f"rollout.decode_slots must be >= 1 or null, got {self.decode_slots}")
        _check(self.decode_slots is None or self.continuous_batching,
               f"rollout.decode_slots ({self.decode_slots}) applies to rollout.continuous_batching=true only; the "
               "static sampler decodes every row of the batch at once")


@dataclass
class DivergenceConfig:
    """A distillation loss term added to the policy loss: ``weight * aggregate(D_t)`` over the response
    tokens, with the policy loss's ``loss_agg`` and global normaliser (``algorithms/losses.py``)."""

    kind: Optional[Literal["rkl", "fkl", "jsd", "k1", "k2", "k3"]] = None
    """None: no term. ``rkl`` KL(student || teacher), ``fkl`` KL(teacher || student), ``jsd`` the generalised
    Jensen-Shannon divergence: over the vocabulary (see ``top_k``). ``k1``-``k3``: estimators of
    KL(student || teacher) on the sampled token only."""
    weight: float = 1.0
    """Multiplies the term."""
    top_k: Optional[int] = None
    """How ``rkl`` / ``fkl`` / ``jsd`` (and vopd's per-token KL) compare the two distributions: over the
    teacher's top-k ids plus one tail bucket, from the ids and log-probs the teacher phase keeps per
    response token; None: over the full vocabulary, the teacher's logits shard recomputed inside the
    student's micro-batch (needs one pipeline stage, and both models' vocabulary shards alike)."""
    beta: float = 0.5
    """``jsd``'s mixture weight: M = beta p_teacher + (1 - beta) p_student (0 is fkl, 1 is rkl)."""

    def __post_init__(self):
        _check(self.top_k is None or self.top_k >= 1, f"algorithm.divergence.top_k must be >= 1, got {self.top_k}")
        _check(0.0 <= self.beta <= 1.0, f"algorithm.divergence.beta must be in [0, 1], got {self.beta}")
        _check(not (self.kind in SAMPLED_TOKEN_DIVERGENCES and self.top_k is not None),
               f"algorithm.divergence.kind={self.kind!r} is taken on the sampled token only; top_k "
               f"({self.top_k}) applies to rkl, fkl and jsd")
        _check(not (self.kind != "jsd" and self.beta != 0.5),
               f"algorithm.divergence.beta ({self.beta}) applies to kind='jsd' only (kind is {self.kind!r})")


SAMPLED_TOKEN_DIVERGENCES = ("k1", "k2", "k3")


@dataclass
class AlgorithmConfig:
    """Which advantage estimator and policy loss a step uses (names from the registries), and what is
    added to them."""

    estimator: str = "gndpo"
    """Advantage estimator: gndpo, opd, grpo, vopd, gopd, uniopd (``algorithms/advantages.py``)."""
    estimator_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the estimator, checked against its signature when the config loads; each
    estimator's own defaults otherwise (gndpo / opd: score_clip 5, the reference's)."""
    policy_loss: str = "gspo"
    """Policy loss: ppo or gspo (reference: gspo)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "seq-mean-token-mean"
    """How per-token losses are averaged; the normaliser is global to the step."""
    clip_low: float = 0.2
    """Lower ratio clip."""
    clip_high: float = 0.2
    """Upper ratio clip."""
    outcome_weight: float = 0.0
    """KDRL's mix: A = A_distill + outcome_weight * A_grpo (the rewards z-scored within each prompt's
    samples). 0: distillation only."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """An optional distillation loss term next to the policy loss."""
    reference_checkpoint: Optional[str] = None
    """gopd's reference policy lp_ref (a checkpoint of the student's architecture): None is the student's
    initial weights. Frozen like the teacher and scored in its own phase."""

    def __post_init__(self):
        _check(self.outcome_weight >= 0, f"algorithm.outcome_weight must be >= 0, got {self.outcome_weight}")
        _check(not (self.estimator == "grpo" and self.outcome_weight),
               "algorithm.outcome_weight mixes the GRPO outcome advantage into a distillation estimator; "
               "algorithm.estimator='grpo' is that advantage already")
        _check(not (self.reference_checkpoint and self.estimator != "gopd"),
               f"algorithm.reference_checkpoint is gopd's reference policy; algorithm.estimator is "
               f"{self.estimator!r}")


@dataclass
class DataConfig:
    """Prompts in the verl parquet schema and the reward that grades responses."""

    train_files: List[str] = field(default_factory=list)
    """Parquet files with the training prompts."""
    val_files: List[str] = field(default_factory=list)
    """Parquet files with held-out prompts (greedy validation)."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json with a chat template)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens (chat template included); every prompt is measured when the files are
    opened, and ``max_prompt_length + rollout.max_new_tokens`` must fit the student's and the teacher's
    ``max_position_embeddings``."""
    overlong_prompts: Literal["error", "drop"] = "error"
    """Prompts longer than ``max_prompt_length``: 'error' stops before any compute naming the file, row
    and length; 'drop' leaves them out, counted and logged (verl's ``filter_overlong_prompts``)."""
    reward: str = "exact_match"
    """Reward function from ``rewards.REWARDS``: exact_match, geo3k."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (seeded)."""
    images: Literal["error", "ignore", "process"] = "error"
    """Rows with images (the ``images`` column): 'error' refuses them (a text-only student); 'ignore'
    drops the images and keeps the text; 'process' decodes them when the files are opened (a missing
    or undecodable image is an error naming file, row and column) and expands each ``<image>`` of the
    prompt to the image's tokens with the student checkpoint's processor, which a vision-language
    student needs (docs/multimodal.md)."""

    def __post_init__(self):
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.val_files, str):
            self.val_files = [self.val_files]
        _check(self.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        _check(self.overlong_prompts in ("error", "drop"),
               f"data.overlong_prompts must be 'error' or 'drop', got {self.overlong_prompts!r}")
        _check(self.images in ("error", "ignore", "process"),
               f"data.images must be 'error', 'ignore' or 'process', got {self.images!r}")


@dataclass
class TrainerConfig:
    """Batch shape, schedule, checkpoints and logging of a run."""

    steps: int = 100
    """Rollout steps to train (each: one rollout, ``mini_batches`` optimizer steps)."""
    prompts_per_step: int = 32
    """Prompts per step over all data-parallel ranks (reference: 32; responses = prompts x n_samples)."""
    mini_batches: int = 1
    """Optimizer steps per rollout (reference: 1, fully on-policy)."""
    micro_batch_size: int = 4
    """Responses per forward/backward pass on one rank (unless ``max_tokens_per_microbatch`` is set)."""
    max_tokens_per_microbatch: Optional[int] = None
    """Form the micro-batches of scoring and training by a token budget instead of ``micro_batch_size``:
    each mini-batch's rows, longest first, go into the first micro-batch whose computed tokens (rows x
    its longest row, or the packed length with ``pack_sequences``) stay within it (first-fit decreasing).
    Each micro-batch is padded only to its own longest row. None: ``micro_batch_size`` rows, padded to
    the step's longest. Results do not depend on it (every loss normaliser is global to the step)."""
    pack_sequences: bool = False
    """Scoring and training lay several responses end to end in one row per micro-batch (positions
    restart per response, attention block-diagonal causal), so no padding is computed; the packed row
    holds at most ``max_tokens_per_microbatch`` tokens (default ``micro_batch_size`` x the step's longest
    row). Transformer Engine runs it through megatron-core's THD path, the local spec through an explicit
    attention mask. The rollout is unchanged."""
    freeze_vision_tower: bool = True
    """A vision-language student's vision encoder (InternViT; Qwen2.5-VL's ViT) gets no gradient and no
    optimizer state, as the GNDPO reference trains InternVL; its projector / patch merger and language model
    train either way. False trains the encoder too."""
    output_dir: str = "outputs/run"
    """Metrics (JSONL, TensorBoard) and, unless ``save_dir`` is set, checkpoints go here."""
    save_dir: Optional[str] = None
    """Checkpoint directory (default ``output_dir/checkpoints``)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_checkpoints: Optional[int] = None
    """Keep the newest N step checkpoints: older ones are deleted once a newer one is complete and
    ``latest`` names it (None: keep all)."""
    val_interval: int = 0
    """Greedy validation every N steps, and before the first (0: off)."""
    val_prompts: int = 64
    """How many held-out prompts validation uses."""
    dump_rollouts: bool = False
    """Write every step's responses (prompt, response, reward, per-token score mean / min / max) to
    ``output_dir/rollouts/step_N.jsonl``."""
    dump_validation: bool = False
    """Write every validation's greedy responses (prompt, response, reward) to
    ``output_dir/validation/step_N.jsonl`` (N: the step validated after, 0 before the first)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases (needs ``wandb``)."""
    progress: bool = True
    """Progress on the logging rank: a rich progress bar on a terminal, one plain line per step when
    stdout is not a terminal (a log file, a pipe, a batch job)."""
    overwrite: bool = False
    """A fresh run (no ``--resume``) into a checkpoint directory that already holds checkpoints (a
    ``latest`` or a ``step_*`` directory) is refused, since its saves would replace the earlier run's
    and move ``latest`` back; true lets it replace them."""

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "mini_batches", "micro_batch_size", "val_prompts"):
            _check(getattr(self, name) >= 1, f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_interval", "val_interval"):
            _check(getattr(self, name) >= 0, f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch >= 1,
               f"trainer.max_tokens_per_microbatch must be >= 1 or null, got {self.max_tokens_per_microbatch}")
        _check(self.keep_checkpoints is None or self.keep_checkpoints >= 1,
               f"trainer.keep_checkpoints must be >= 1 or null, got {self.keep_checkpoints}")

    @property
    def checkpoint_dir(self) -> str:
        return self.save_dir or f"{self.output_dir}/checkpoints"


@dataclass
class RunConfig:
    """Everything one run needs; cross-section checks live in ``__post_init__``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student architecture."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP layout of the student (and of the teacher unless ``teacher.parallel`` sets its own)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Student numerics (and the teacher's unless it sets its own)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Student optimizer and LR schedule."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of responses."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantage estimator and policy loss."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and reward."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Batch shape, schedule, checkpoints, logging."""
    student_checkpoint: Optional[str] = None
    """Megatron dist-checkpoint with the student's initial weights (None: random init)."""
    seed: int = 1234
    """Seeds weights init, sampling and data order."""

    def __post_init__(self):
        if self.teacher.precision is None:
            self.teacher.precision = self.precision
        _check(not (self.teacher.quantize and self.teacher.precision.fp8),
               f"teacher.quantize={self.teacher.quantize!r} and an FP8 teacher precision "
               f"(precision.fp8={self.teacher.precision.fp8!r}) are two FP8 schemes; choose one")
        self.parallel.check_model(self.model, "model")
        self.teacher_parallel.check_model(self.teacher.model, "teacher.model",
                                          "teacher.parallel" if self.teacher_on_own_layout else "parallel")
        for role, model in (("model", self.model), ("teacher.model", self.teacher.model)):
            # the rollout and the teacher's scoring see prompt + response, both at most this long
            longest = self.data.max_prompt_length + self.rollout.max_new_tokens
            _check(longest <= model.max_position_embeddings,
                   f"data.max_prompt_length ({self.data.max_prompt_length}) + rollout.max_new_tokens "
                   f"({self.rollout.max_new_tokens}) = {longest} exceeds {role}.max_position_embeddings "
                   f"({model.max_position_embeddings})")
        self._check_packing()
        # its per-slot attention mask is verified with the project's SDPA core attention only; with
        # transformer_impl='auto' the engine checks the built model's core attention before its first forward
        impl, attention = self.precision.transformer_impl, self.precision.local_attention
        _check(not self.rollout.continuous_batching or (impl != "transformer_engine" and attention == "sdpa"),
               f"rollout.continuous_batching needs the local layer spec with SDPA core attention "
               f"(precision.transformer_impl 'local' or 'auto' and precision.local_attention='sdpa'), got "
               f"transformer_impl={impl!r}, local_attention={attention!r}")
        # images enter the rollout through the static sampler's forward (generator.py); a slot's prefill
        # takes token ids only
        _check(not (self.rollout.continuous_batching and self.data.images == "process"),
               "rollout.continuous_batching does not take images (data.images=process): its per-slot prefill "
               "feeds token ids, not merged image embeddings; use the static sampler (continuous_batching=false)")
        # that both checkpoints are vision-language ones is checked when the run opens them (trainer/setup.py);
        # what a vision-language run cannot do yet is refused here
        if self.data.images == "process":
            for unsupported, why in ((self.algorithm.estimator == "gopd", "algorithm.estimator=gopd (its reference "
                                      "policy is built as a text model)"),
                                     (bool(self.teacher.quantize), "teacher.quantize (ModelOpt calibration of the "
                                      "vision-language teacher is not built)"),
                                     (self.teacher.offload, "teacher.offload (the vision tower is not offloaded)")):
                _check(not unsupported, f"data.images=process does not take {why} yet (docs/multimodal.md)")
        self._check_teacher_comparisons()
        self._check_teacher_layout()
        self._check_context_parallel()
        # Teacher and student may differ in vocab_size and padding; that they share one tokenizer is
        # checked with the tokenizer files, at Trainer init (check_same_vocabulary, check_checkpoint_tokenizers).


    @property
    def teacher_on_own_layout(self) -> bool:
        """Whether ``teacher.parallel`` sets a TP x PP other than the student's."""
        own, p = self.teacher.parallel, self.parallel
        return own is not None and (own.tensor_model_parallel_size, own.pipeline_model_parallel_size) != (
            p.tensor_model_parallel_size, p.pipeline_model_parallel_size)

    @property
    def teacher_parallel(self) -> ParallelConfig:
        """The layout the teacher is built with: the student's, or ``teacher.parallel``'s TP x PP (with
        sequence parallelism when the student uses it and the teacher's TP > 1; never a distributed
        optimizer: the teacher has none)."""
        if not self.teacher_on_own_layout:
            return self.parallel
        tp = self.teacher.parallel.tensor_model_parallel_size
        return ParallelConfig(tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=self.teacher.parallel.pipeline_model_parallel_size,
                              sequence_parallel=self.parallel.sequence_parallel and tp > 1)

    def _check_teacher_layout(self) -> None:
        """What a teacher on its own layout does not do yet (docs/teacher_layout.md): everything that runs
        the teacher on the student's micro-batches rather than on the rows it is sent. (That the world
        divides into the teacher's TP x PP is checked when its groups are built, where the world is known.)"""
        if not self.teacher_on_own_layout:
            return
        for unsupported, why in (
                (bool(self.teacher.quantize), "teacher.quantize (ModelOpt calibrates on the student's micro-batches)"),
                (self.data.images == "process", "data.images=process (images are not sent to the teacher's ranks)")):
            _check(not unsupported, f"teacher.parallel (a layout other than the student's) does not take {why}")

    def _check_context_parallel(self) -> None:
        """What context parallelism does not do yet (docs/context_parallel.md): everything that needs the
        sequence of a micro-batch other than as whole rows cut in megatron's chunks."""
        cp = self.parallel.context_parallel_size
        if cp == 1:
            return
        for role, precision in (("precision", self.precision), ("teacher.precision", self.teacher.precision)):
            _check(not (precision.transformer_impl != "transformer_engine" and precision.local_attention == "megatron"),
                   f"parallel.context_parallel_size={cp} needs Transformer Engine's or the project's SDPA attention, "
                   f"but {role}.local_attention='megatron' (megatron-core's DotProductAttention has no context "
                   f"parallelism); set {role}.local_attention='sdpa'")
        for unsupported, why in (
                (self.trainer.pack_sequences, "trainer.pack_sequences (packed rows would need each sequence split "
                 "in chunks of its own); trainer.max_tokens_per_microbatch still applies"),
                (self.data.images == "process", "data.images=process (image embeddings would have to be split "
                 "with the sequence)"),
                (self.teacher_on_own_layout, "teacher.parallel (a layout other than the student's)"),
                (bool(self.teacher.quantize), "teacher.quantize (ModelOpt calibrates whole sequences)")):
            _check(not unsupported, f"parallel.context_parallel_size={cp} does not take {why} yet")

    def _check_packing(self) -> None:
        """What token budgets and packed rows need: one response fits a micro-batch's budget, and packing
        has a way to mask attention (not with images, whose tokens the packed layout does not place; not
        sequence parallelism on the local spec, whose RoPE positions are re-read per packed row)."""
        tc = self.trainer
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens - 1
        _check(tc.max_tokens_per_microbatch is None or tc.max_tokens_per_microbatch >= longest,
               f"trainer.max_tokens_per_microbatch ({tc.max_tokens_per_microbatch}) must hold the longest row, "
               f"data.max_prompt_length + rollout.max_new_tokens - 1 = {longest} tokens")
        if not tc.pack_sequences:
            return
        _check(self.data.images != "process",
               "trainer.pack_sequences=true with data.images=process: packed rows have no place for image "
               "inputs; set trainer.pack_sequences=false (trainer.max_tokens_per_microbatch still applies)")
        for role, precision in (("precision", self.precision), ("teacher.precision", self.teacher.precision)):
            _check(not (self.parallel.sequence_parallel and precision.transformer_impl == "local"),
                   f"trainer.pack_sequences=true with parallel.sequence_parallel needs Transformer Engine "
                   f"(megatron-core's THD path), but {role}.transformer_impl='local': the local spec's packed mask "
                   "and per-sequence RoPE positions run without sequence parallelism")

    def _check_teacher_comparisons(self) -> None:
        """Full-vocabulary comparisons with the teacher (a divergence term or vopd's KL without top_k)
        recompute the teacher's logits shard inside the student's micro-batch: the teacher's last
        stage must be the student's, hold its weights on the device, and split the vocabulary alike."""
        div, alg = self.algorithm.divergence, self.algorithm
        uses = [f"algorithm.divergence.kind={div.kind!r}"] if div.kind and div.kind not in SAMPLED_TOKEN_DIVERGENCES \
            else []
        if alg.estimator == "vopd":
            uses.append("algorithm.estimator='vopd' (its per-token KL)")
        if not uses or div.top_k is not None:
            return
        what = " and ".join(uses)
        _check(not self.teacher_on_own_layout,
               f"{what} over the full vocabulary (algorithm.divergence.top_k=null) recomputes the teacher's logits "
               "inside the student's micro-batch, which a teacher on its own layout (teacher.parallel) cannot; set "
               "algorithm.divergence.top_k (the top-k ids travel back with the log-probs)")
        _check(self.parallel.pipeline_model_parallel_size == 1,
               f"{what} over the full vocabulary (algorithm.divergence.top_k=null) needs "
               f"parallel.pipeline_model_parallel_size=1 (got {self.parallel.pipeline_model_parallel_size}): the "
               "teacher's logits are recomputed inside the student's micro-batch, which a pipeline splits over "
               "stages; set algorithm.divergence.top_k to use the teacher's top-k ids kept on the last stage")
        _check(not self.teacher.offload,
               f"{what} over the full vocabulary recomputes the teacher's logits in every training micro-batch, "
               "so teacher.offload would copy its weights to the device for each; set algorithm.divergence.top_k "
               "or teacher.offload=false")
        tp = self.parallel.tensor_model_parallel_size
        _check(self.model.padded_vocab_size(tp) == self.teacher.model.padded_vocab_size(tp),
               f"{what} over the full vocabulary compares the two models' logits shard by shard, but the student's "
               f"padded vocabulary ({self.model.padded_vocab_size(tp)}) and the teacher's "
               f"({self.teacher.model.padded_vocab_size(tp)}) split differently at TP={tp}; set "
               "algorithm.divergence.top_k (ids are global there)")


def check_same_vocabulary(tokenizer_size: int, student: ModelConfig, teacher: ModelConfig) -> int:
    """The vocabulary the log-ratio is taken over, for a student and a teacher of one tokenizer of
    ``tokenizer_size`` tokens: each embedding must hold every token id (``vocab_size >= tokenizer_size``),
    and beyond that their sizes and paddings may differ (Qwen2.5-1.5B's 151936 rows and Qwen2.5-7B's
    152064 for one 151665-token tokenizer). Returns the shared vocabulary size, the smaller vocab_size:
    every vocab-parallel op on either model's logits masks the columns at or beyond it, so both
    distributions are over the same ids and the student never samples an id the teacher lacks."""
    for role, model in (("model", student), ("teacher.model", teacher)):
        if model.vocab_size < tokenizer_size:
            raise ValueError(f"the tokenizer has {tokenizer_size} tokens but {role}.vocab_size is {model.vocab_size}: "
                             "token ids would index past the embedding")
    return min(student.vocab_size, teacher.vocab_size)
