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

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.context_parallel import gather_tokens, local_view
from megatron_gndpo.ops.vocab_parallel import (
    fused_linear_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from megatron_gndpo.trainer.batches import gather_rows
from megatron_gndpo.trainer.images import IMAGE_KEYS

# (logits_shard [b, T, V/tp], micro-batch) -> tensors to keep, each [b, T, ...]
CollectFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
# (per-token tensors [b, T, ...], micro-batch) -> (scalar loss, metrics)
ReduceFn = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor]], "tuple[torch.Tensor, Dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class TokenLoss:
    """A micro-batch's loss in two parts: ``read`` takes what the loss needs per token off the logits shard
    (log-probs, divergences, entropies: ``[b, T, ...]``, differentiable), ``reduce`` turns those tensors and
    the micro-batch into the scalar loss and its metrics. Split so that context parallelism sits between
    them: the model and ``read`` see this rank's positions of the sequence, ``reduce`` whole rows (what
    ``read`` returned, gathered over CP; ``distributed/context_parallel.py``)."""

    read: CollectFn
    reduce: ReduceFn


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

    def fused_logprobs(self, hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`logprobs` of the logits ``hidden @ weight_shard^T``, never whole: the LM head is applied
        ``[chunk, V/tp]`` at a time (``fused_linear_logprobs``)."""
        return fused_linear_logprobs(hidden, weight_shard, labels, group=self.group, temperature=self.temperature,
                                     vocab_size=self.vocab_size)

    def entropy(self, logits_shard: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_entropy(logits_shard, group=self.group, temperature=self.temperature,
                                      vocab_size=self.vocab_size)


def model_forward(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits shard ``[b, T, V/tp]`` on the last stage, hidden states on the others. A vision-language
    model's micro-batch brings its images on the first stage (``trainer/images.py``).

    A packed micro-batch (``cu_seqlens``, see ``trainer/batches.py::pack_rows``) runs as one row: through
    megatron-core's THD path under Transformer Engine (``PackedSeqParams``), else with an explicit
    block-diagonal causal mask and rotary embeddings at each token's own position; its logits are read
    back per row (``unpack``) so that every consumer sees the row-major ``[b, W, V/tp]`` of a padded one."""
    if "cu_seqlens" not in batch:
        images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
        return model(batch["tokens"], batch["position_ids"], None, **images)
    gpt = getattr(model, "module", model)
    if uses_transformer_engine(gpt):
        output = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=thd_params(batch["cu_seqlens"]))
    else:
        if gpt.config.sequence_parallel:  # precision.transformer_impl='auto' that found no Transformer Engine
            raise ValueError("trainer.pack_sequences=true with parallel.sequence_parallel needs Transformer Engine "
                             "(megatron-core's THD path); this model runs the local spec")
        with rotary_at_positions(gpt, batch["position_ids"]):
            output = model(batch["tokens"], batch["position_ids"], packed_causal_mask(batch["cu_seqlens"]))
    if not gpt.post_process:
        return output
    return output.reshape(-1, output.shape[-1])[batch["unpack"]]


def uses_transformer_engine(gpt) -> bool:
    """Whether ``gpt``'s layers run Transformer Engine's attention (the spec the provider chose)."""
    return type(gpt.decoder.layers[0].self_attention.core_attention).__name__.startswith("TE")


def packed_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, 1, L, L]`` boolean, True = masked (megatron's convention): query i sees key j iff both lie in
    one segment ``[cu_seqlens[s], cu_seqlens[s + 1])`` and ``j <= i``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    n = segment.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ~(causal & (segment[:, None] == segment[None, :]))[None, None]


def thd_params(cu_seqlens: torch.Tensor):
    """megatron-core's ``PackedSeqParams`` of one packed row (THD: tokens ``[total, heads, dim]``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


@contextlib.contextmanager
def rotary_at_positions(gpt, position_ids: torch.Tensor):
    """While inside, ``gpt``'s rotary embedding (``[s, 1, 1, d]``, for positions 0..s-1) is read at
    ``position_ids`` ``[1, s]`` instead: megatron-core's GPTModel takes RoPE positions from the sequence
    length alone (``position_ids`` only feed learned absolute embeddings). RoPE scores depend on relative
    positions only, so a sequence shifted inside a packed row attends the same up to rounding; restarting
    its positions at 0 makes the rounding that of its padded row too (the angles ``p * inv_freq`` lose
    float32 precision as ``p`` grows). One row only: the embedding has no batch dimension."""
    if position_ids.shape[0] != 1:
        raise ValueError(f"rotary positions are per token of one packed row, got position_ids "
                         f"{tuple(position_ids.shape)}")
    handle = gpt.rotary_pos_emb.register_forward_hook(lambda module, args, emb: emb[position_ids[0]])
    try:
        yield
    finally:
        handle.remove()


def run_schedule(
    model,
    microbatches: Sequence[Dict[str, torch.Tensor]],
    *,
    loss: Optional[TokenLoss] = None,
    collect_fn: Optional[CollectFn] = None,
    forward_only: bool,
    pg_collection=None,
) -> List[Dict[str, torch.Tensor]]:
    """Run ``microbatches`` (each ``tokens``/``position_ids`` ``[b, T]`` plus loss inputs; shapes may
    differ between micro-batches) through megatron's schedule for this pipeline layout.

    Training: ``loss`` gives a scalar already divided by the step's global normaliser; returns its
    metrics per micro-batch on the last stage ([] elsewhere). Scoring: ``collect_fn`` turns the
    logits of a micro-batch into tensors to keep (e.g. token log-probs); returned likewise.

    With context parallelism the model runs this rank's positions of each micro-batch (``local_view``) and
    what ``loss.read`` or ``collect_fn`` reads off its logits comes back as whole rows (``gather_tokens``).

    ``pg_collection``: the groups ``model`` was built on when they are not ``parallel_state``'s (a teacher
    on its own layout): the schedule and its pipeline p2p run over them (megatron-core takes them as
    ``pg_collection`` and a ``P2PCommunicator``); None: ``parallel_state``'s, the student's.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    if not microbatches:
        raise ValueError("run_schedule needs at least one micro-batch")
    shapes = {tuple(mb["tokens"].shape) for mb in microbatches}
    config = get_model_config(model)
    cp = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
    # Micro-batches of different shapes (token-budget or packed) need megatron's pipeline to send each
    # activation's shape before it (one more small p2p message per send); alike ones keep the fixed shape.
    variable = config.variable_seq_lengths

    def forward_step(data_iterator: Iterable, model_chunk):
        batch = next(data_iterator)
        local = local_view(batch, cp)
        output = model_forward(model_chunk, local)

        def finish(logits_shard: torch.Tensor):
            if loss is not None:
                value, metrics = loss.reduce(gather_tokens(loss.read(logits_shard, local), cp), batch)
                return value, value.new_zeros((), dtype=torch.int), metrics
            kept = gather_tokens(collect_fn(logits_shard, local), cp)
            # Scoring keeps tensors, not a loss: return a dummy loss so the schedule's bookkeeping holds.
            return logits_shard.new_zeros(()), logits_shard.new_zeros((), dtype=torch.int), kept

        return output, finish

    config.variable_seq_lengths = variable or len(shapes) > 1
    schedule, groups = get_forward_backward_func(), {}
    if pg_collection is not None:
        schedule = get_forward_backward_func(pp_size=pg_collection.pp.size())
        groups = dict(pg_collection=pg_collection, p2p_communicator=P2PCommunicator(pg_collection.pp, config))
    try:
        return schedule(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=max(s[1] for s in shapes),  # whole sequences: megatron divides by the CP size
            micro_batch_size=max(s[0] for s in shapes),
            forward_only=forward_only,
            **groups,
        )
    finally:
        config.variable_seq_lengths = variable


@torch.no_grad()
def forward_outputs(model, microbatches: Sequence[Dict[str, torch.Tensor]], collect_fn: CollectFn,
                    pg_collection=None) -> Dict[str, torch.Tensor]:
    """Forward-only pass of ``microbatches``; what ``collect_fn`` keeps of each (``[b, W, ...]``), put back
    in row order (``row_ids``, :func:`~megatron_gndpo.trainer.batches.gather_rows`: ``[B, max W, ...]``)
    on the last pipeline stage, {} on the others. ``pg_collection``: as in :func:`run_schedule`."""
    out = run_schedule(model, microbatches, collect_fn=collect_fn, forward_only=True, pg_collection=pg_collection)
    return {k: gather_rows([o[k] for o in out], microbatches) for k in out[0]} if out else {}


@contextlib.contextmanager
def lm_head_bypassed(gpt):
    """While inside, ``gpt`` (last stage) returns its final hidden states ``[b, s, h]`` where it returned
    logits (its output layer passes its input through); yields the output weight shard ``[V/tp, h]`` the
    layer would have applied (the embedding's when tied), None on other stages. megatron-core 0.16 and
    0.19 both call ``output_layer(hidden, weight=..., runtime_gather_output=...)`` and return its first
    output transposed to batch-first, which is all this relies on."""
    if not gpt.post_process:
        yield None
        return
    layer = gpt.output_layer
    layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
    try:
        yield gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight
    finally:
        del layer.forward


@torch.no_grad()
def forward_logprobs(model, microbatches: Sequence[Dict[str, torch.Tensor]], readout: LogitsReadout,
                     key: str, pg_collection=None) -> Dict[str, torch.Tensor]:
    """``{key: [B, T]}``: the log-probs of the micro-batches' labels under ``model`` on the last stage ({}
    elsewhere), like :func:`forward_outputs` with ``readout.logprobs``, but the ``[b, T, V/tp]`` logits are
    never whole: the final hidden states meet the LM head chunk by chunk (:meth:`LogitsReadout.fused_logprobs`).
    With sequence parallelism the output layer would first gather the sequence: the logits path serves it.
    ``pg_collection``: as in :func:`run_schedule`."""
    gpt = getattr(model, "module", model)
    if gpt.config.sequence_parallel:
        return forward_outputs(model, microbatches, lambda logits, mb: {key: readout.logprobs(logits, mb["labels"])},
                               pg_collection)
    with lm_head_bypassed(gpt) as weight:
        return forward_outputs(model, microbatches,
                               lambda hidden, mb: {key: readout.fused_logprobs(hidden, weight, mb["labels"])},
                               pg_collection)
