"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron's local layer spec.

megatron-core's local ``DotProductAttention`` materialises the ``[b, np, sq, sk]`` scores (``baddbmm``),
copies K/V once per query head of a group (``repeat_interleave``) and runs an unfused masked softmax,
so a GPU without Transformer Engine pays for the slowest attention there is. :class:`SDPAttention`
computes the same function through SDPA, which picks flash / memory-efficient kernels on CUDA and a
fused kernel on CPU, and is a drop-in ``core_attention`` submodule: :func:`local_layer_spec` builds
megatron's local spec with it. Neither module has weights, so checkpoints are the same for both (and a
plain ``torch.nn.Module`` is enough: megatron's sharded state dict of a weightless child is empty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_gndpo.distributed.collectives import group_rank, group_size
from megatron_gndpo.distributed.context_parallel import gathered_positions, local_positions

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

LOCAL_ATTENTION = ("megatron", "sdpa")

# AttnMaskType names. megatron's DotProductAttention does no masking at all for the other types (its
# softmax only builds a causal mask), which would silently drop what the type promises.
_MASK_TYPES = ("causal", "padding", "no_mask")

# cuDNN attention, SDPA's first choice on Hopper, builds a graph for every new shape (~40 ms on an H100);
# a KV-cached step's key length grows by one per token, so it would pay that on every token.
_KV_CACHED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SDPAttention(torch.nn.Module):
    """``softmax(softmax_scale * q k^T, masked) v`` per head with SDPA; megatron's ``DotProductAttention``
    contract (constructor and forward arguments, shapes) so that it can replace it in a layer spec.

    Shapes: ``query`` ``[sq, b, np, hn]``, ``key`` / ``value`` ``[sk, b, ng, hn]`` with the heads of this
    tensor-parallel rank (``np`` a multiple of ``ng``: GQA, passed to SDPA as ``enable_gqa`` instead of
    repeating K/V); returns ``[sq, b, np * hn]``.

    Masking (key ``j`` is visible to query ``i``):

    - an explicit ``attention_mask`` (bool, True = masked, broadcastable to ``[b, np, sq, sk]``) is used as
      given, whatever the mask type, as megatron's unfused softmax does. A query row with every key masked
      (padding) attends to every key instead, so it stays finite on every SDPA backend (megatron's -10000
      fill gives it the mean of the values; either way no loss reads it).
    - otherwise, in a layer built ``causal``: ``j <= i + sk - sq``. The queries are the last ``sq`` of ``sk``
      positions: ``sq == sk`` is SDPA's ``is_causal`` (training, scoring, a prompt's prefill) and ``sq < sk``
      is a KV-cached step, which needs no mask when ``sq == 1``.
    - otherwise nothing is masked.

    The forward's ``attn_mask_type`` is, as in ``DotProductAttention``, not what decides: megatron passes
    ``no_mask`` for every KV-cached step, and the shapes already say that (``sk > sq``); where megatron's
    module asserts ``sq == sk`` (a cached step of several tokens), this one masks bottom-right.

    ``softmax_scale`` defaults to ``1 / sqrt(hn)``. ``apply_query_key_layer_scaling`` divides the scores by
    the layer number before an fp32 softmax that multiplies them back, a guard against fp16 overflow in
    ``baddbmm``; the product is 1, and SDPA accumulates in fp32 anyway, so neither it nor
    ``attention_softmax_in_fp32`` changes what is computed here.

    Context parallelism (``cp_group`` of more than one rank; ``distributed/context_parallel.py``): the queries
    are this rank's positions of the sequence, chunks r and 2 CP - 1 - r; K and V are all-gathered over the
    CP group (Transformer Engine's ``all_gather`` scheme; the gather's backward sums every rank's gradient
    of each rank's K / V) and the causal mask is taken on global positions, ``pos(j) <= pos(i)``. Whole
    sequences only: a KV-cached step runs with CP switched off (``cp_group`` None), an explicit mask is refused.

    Refused, by an error that names the setting: sliding-window attention, softmax offsets
    (attention sinks), mask types other than causal / padding / no_mask, attention dropout while training (megatron
    draws it from the tensor-parallel RNG tracker; SDPA's kernels draw their own), ``attention_bias`` and
    packed sequences (``packed_seq_params``, THD).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        """The arguments megatron's attention layers pass to ``DotProductAttention`` (the same in
        megatron-core 0.16 and 0.19); ``attention_type`` and ``cp_comm_type`` are unused there as here."""
        # megatron-core is imported here, not with this module: the provider imports this module, and
        # megatron_gndpo/__init__.py must guard Transformer Engine before megatron-core is first imported.
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        super().__init__()
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"SDPAttention does not support sliding-window attention (window_size="
                             f"{config.window_size} in layer {layer_number})")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention does not support softmax_type={config.softmax_type!r} "
                             "(a softmax offset); use megatron's DotProductAttention")
        _check_mask_type(attn_mask_type)
        self.attn_mask_type = attn_mask_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        if pg_collection.cp.size() != config.context_parallel_size:
            raise ValueError(f"SDPAttention configured for context_parallel_size={config.context_parallel_size} "
                             f"was given a context-parallel group of {pg_collection.cp.size()} ranks")
        # None when there is nothing to exchange; context_parallel_off sets it to None for decoding
        self.cp_group = pg_collection.cp if pg_collection.cp.size() > 1 else None
        # This rank's np * hn, as DotProductAttention counts it: the output view then fails loudly on
        # inputs with another number of heads.
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads,
                                                pg_collection.tp.size())
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``[sq, b, np, hn]`` query, ``[sk, b, ng, hn]`` key / value -> ``[sq, b, np * hn]``."""
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences (packed_seq_params, THD)")
        if self.training and self.dropout_p > 0:
            raise NotImplementedError(f"SDPAttention does not support attention dropout in training "
                                      f"(attention_dropout={self.dropout_p})")
        if attn_mask_type is not None:
            _check_mask_type(attn_mask_type)
        sq, b = query.shape[:2]
        if self.cp_group is not None:
            key, value, keep, is_causal = self._gather_context(key, value, attention_mask)
        else:
            keep, is_causal = self._mask(sq, key.size(0), attention_mask, query.device)
        sk = key.size(0)
        # [s, b, heads, hn] -> [b, heads, s, hn]: views, SDPA only needs the head dimension contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with sdpa_kernel(_KV_CACHED_BACKENDS) if sq < sk else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=is_causal, scale=self.softmax_scale,
                # Only when the head counts differ: on CUDA GQA rules out the memory-efficient kernel.
                enable_gqa=k.size(1) != q.size(1),
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _mask(self, sq: int, sk: int, attention_mask: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """SDPA's ``attn_mask`` (True = keep) and ``is_causal`` for ``sq`` queries and ``sk`` keys."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(f"attention_mask must be boolean (True = masked), got {attention_mask.dtype}")
            keep = ~attention_mask
            return keep | ~keep.any(dim=-1, keepdim=True), False
        if self.attn_mask_type.name != "causal":
            return None, False
        if sq > sk:
            raise ValueError(f"causal attention with more queries ({sq}) than keys ({sk})")
        if sq == sk:
            return None, sq > 1
        if sq == 1:
            return None, False
        # SDPA's is_causal aligns the triangle top-left; the queries here are the last sq positions.
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq), False

    def _gather_context(self, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
        """Context parallelism: every CP rank's K and V (rank order, ``[T, b, ng, hn]``) and the mask of this
        rank's queries over them, causal on global positions (``distributed/context_parallel.py``)."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if attention_mask is not None:
            raise NotImplementedError("SDPAttention does not take an explicit attention_mask with context "
                                      "parallelism (packed sequences)")
        n, length = group_size(self.cp_group), key.size(0) * group_size(self.cp_group)
        key, value = (gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True, group=self.cp_group)
                      for t in (key, value))
        if self.attn_mask_type.name != "causal":
            return key, value, None, False
        queries = local_positions(length, n, group_rank(self.cp_group), key.device)
        return key, value, gathered_positions(length, n, key.device)[None, :] <= queries[:, None], False

def _check_mask_type(attn_mask_type: AttnMaskType) -> None:
    if attn_mask_type.name not in _MASK_TYPES:
        raise ValueError(f"SDPAttention does not support attn_mask_type={attn_mask_type.name} "
                         f"(supported: {', '.join(_MASK_TYPES)})")


def local_layer_spec(qk_layernorm: bool, attention: str):
    """megatron's local GPT layer spec (RMSNorm); ``attention='sdpa'`` swaps its core attention for
    :class:`SDPAttention`, ``'megatron'`` keeps ``DotProductAttention``. A new spec either way."""
    from megatron.core.models.gpt import gpt_layer_specs

    if attention not in LOCAL_ATTENTION:
        raise ValueError(f"local attention must be one of {LOCAL_ATTENTION}, got {attention!r}")
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if attention == "megatron":
        return spec
    self_attention = spec.submodules.self_attention
    self_attention = dataclasses.replace(
        self_attention, submodules=dataclasses.replace(self_attention.submodules, core_attention=SDPAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=self_attention))
