"""Ops on vocab-sharded logits (see :mod:`megatron_gndpo.ops.vocab_parallel`)."""

from megatron_gndpo.ops.vocab_parallel import (
    fused_linear_logprobs,
    mask_padded_vocab,
    real_vocab_columns,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_softmax,
    vocab_parallel_topk,
)

__all__ = [
    "fused_linear_logprobs",
    "mask_padded_vocab",
    "real_vocab_columns",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_logprobs",
    "vocab_parallel_softmax",
    "vocab_parallel_topk",
]
