"""Context parallelism (``parallel.context_parallel_size``): each micro-batch's sequence split over the CP
ranks of a model replica, so that a 16k-token response's activations and attention are shared by CP ranks.

Layout: megatron-core's, which its rotary embedding and Transformer Engine's attention assume. A sequence
of T positions (a multiple of 2 CP) is cut into 2 CP equal chunks and CP rank r holds chunks r and
2 CP - 1 - r, in that order: under a causal mask the early chunks are cheap and the late ones dear, so
every rank gets one of each and the same work (:func:`local_positions`).

Where it applies: inside the model only. The CP ranks of a replica hold the same rows, as its TP ranks do
(rows are split over data parallelism alone); a micro-batch enters the model as this rank's positions
(:func:`local_view`), and what is read off its logits per token (log-probs, the divergence to the teacher,
the entropy, top-k ids) is gathered back to whole rows at once (:func:`gather_sequence`). Everything after
that -- losses, GNDPO's statistics, metrics, dumps -- sees whole rows, identical on the CP ranks of a
replica, and reduces over data parallelism only. The gathered tensors are ``[b, T]`` floats, nothing next
to the ``[b, T/CP, h]`` activations CP shares out.

Gradients: every CP rank computes the same loss from the gathered tensors, so each needs only the gradient
of its own positions (the gather's backward keeps this rank's slice); megatron's DDP sums the parameter
gradients over data x context parallelism, which adds the ranks' positions up to the whole sequence's
gradient (our losses are pre-normalised sums; see ``trainer/megatron_glue.py``).

The rollout decodes one token at a time, which has no sequence to split: it runs with context parallelism
switched off in the model (:func:`context_parallel_off`), every CP rank sampling its replica's rows.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.collectives import group_rank, group_size


def local_positions(length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """``[length / cp_size]`` positions CP rank ``cp_rank`` holds: chunks ``cp_rank`` and
    ``2 cp_size - 1 - cp_rank`` of ``2 cp_size`` chunks of ``length / (2 cp_size)``."""
    if length % (2 * cp_size):
        raise ValueError(f"context parallelism over {cp_size} ranks needs a sequence length divisible by "
                         f"2 x {cp_size}, got {length}")
    chunk = length // (2 * cp_size)
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def gathered_positions(length: int, cp_size: int, device=None) -> torch.Tensor:
    """``[length]``: the position of each element of the CP ranks' local sequences laid end to end in rank
    order (what an all-gather over the CP group holds)."""
    return torch.cat([local_positions(length, cp_size, r, device) for r in range(cp_size)])


def split_sequence(t: torch.Tensor, group: Optional[ProcessGroup], dim: int = 1) -> torch.Tensor:
    """This rank's positions of ``t`` along ``dim`` (the sequence, length T); ``t`` itself without CP."""
    n = group_size(group)
    if n == 1:
        return t
    return t.index_select(dim, local_positions(t.shape[dim], n, group_rank(group), t.device))


def gather_sequence(t: torch.Tensor, group: Optional[ProcessGroup], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_sequence`: the CP ranks' local ``t`` (sequence along ``dim``) as whole
    sequences in position order, the same on every rank of ``group``. Differentiable: the backward keeps
    this rank's positions of the gradient, which is right because every CP rank computes the same thing
    from the gathered tensor (megatron's all-gather with ``tensor_parallel_output_grad=False``)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    n = group_size(group)
    if n == 1:
        return t
    gathered = gather_from_sequence_parallel_region(t.movedim(dim, 0).contiguous(),
                                                    tensor_parallel_output_grad=False, group=group)
    order = torch.argsort(gathered_positions(gathered.shape[0], n, t.device))
    return gathered.index_select(0, order).movedim(0, dim)


def local_view(batch: Dict[str, torch.Tensor], group: Optional[ProcessGroup]) -> Dict[str, torch.Tensor]:
    """``batch`` with every per-token tensor (``[b, T, ...]``: tokens, positions, labels, masks and what
    was attached per token) cut to this rank's positions; per-row ``[b]`` tensors as they are. The
    micro-batch a CP rank's model and readers see."""
    if group_size(group) == 1:
        return batch
    return {k: split_sequence(v, group) if v.dim() > 1 else v for k, v in batch.items()}


def gather_tokens(per_token: Dict[str, torch.Tensor], group: Optional[ProcessGroup]) -> Dict[str, torch.Tensor]:
    """:func:`gather_sequence` of every ``[b, T/CP, ...]`` tensor read off a CP rank's logits."""
    return {k: gather_sequence(v, group) for k, v in per_token.items()}


@contextlib.contextmanager
def context_parallel_off(gpt) -> Iterator[None]:
    """While inside, ``gpt`` (a GPTModel stage) runs whole sequences on each rank, as with CP 1: its
    rotary embedding covers every position instead of this rank's chunks and its core attentions exchange
    nothing over the CP group. For KV-cached decoding, where every CP rank samples the same rows.

    Transformer Engine's attention takes its CP group through ``set_context_parallel_group`` (None: off);
    the project's SDPA attention reads ``cp_group`` at each forward; megatron-core sizes the rotary table
    by ``config.context_parallel_size`` and slices it by ``rotary_pos_emb.cp_group``, and caches the table
    by its length alone (``lru_cache`` on ``forward``), so the cache is emptied on the way in and out."""
    config, rotary = gpt.config, getattr(gpt, "rotary_pos_emb", None)
    cp = config.context_parallel_size
    if cp == 1:
        yield
        return
    attentions = [layer.self_attention.core_attention for layer in gpt.decoder.layers]
    saved = [(a.cp_group, getattr(a, "cp_global_ranks", None), getattr(a, "cp_stream", None)) for a in attentions]
    rotary_group = rotary.cp_group if rotary is not None else None
    for a in attentions:
        _set_attention_cp(a, None, None, None)
    if rotary is not None:
        rotary.cp_group = None
    config.context_parallel_size = 1
    _clear_rotary_cache(rotary)
    try:
        yield
    finally:
        config.context_parallel_size = cp
        if rotary is not None:
            rotary.cp_group = rotary_group
        _clear_rotary_cache(rotary)
        for a, (group, ranks, stream) in zip(attentions, saved):
            _set_attention_cp(a, group, ranks, stream)


def _clear_rotary_cache(rotary) -> None:
    if rotary is not None and hasattr(type(rotary).forward, "cache_clear"):
        type(rotary).forward.cache_clear()


def _set_attention_cp(attention, group, ranks, stream) -> None:
    if hasattr(attention, "set_context_parallel_group"):  # Transformer Engine
        attention.set_context_parallel_group(group, ranks, stream, attention.cp_comm_type)
    else:
        attention.cp_group = group
