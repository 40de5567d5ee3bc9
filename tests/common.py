"""Small models and batches shared by the tests."""

from __future__ import annotations

import torch

from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig

# vocab 1000 pads to 1024 at TP in {1, 2, 4}; 4 heads / 2 KV groups split over TP 2 and 4? (TP4 needs 4 groups)
STUDENT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64)
TEACHER = dict(STUDENT, hidden_size=96, num_hidden_layers=2, intermediate_size=192)
FP32 = PrecisionConfig(params_dtype="float32", transformer_impl="local")


def model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**STUDENT, **overrides})


def parallel(tp: int, pp: int = 1, cp: int = 1) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)


def tokens(batch: int, seq: int, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def microbatch(toks: torch.Tensor) -> dict:
    b, t = toks.shape
    return {"tokens": toks, "position_ids": torch.arange(t).expand(b, t).contiguous()}


def gather_vocab(logits_shard: torch.Tensor, groups, vocab: int) -> torch.Tensor:
    """Test-only: the full-vocabulary logits, to compare layouts."""
    import torch.distributed as dist

    parts = [torch.empty_like(logits_shard) for _ in range(groups.tp_size)]
    dist.all_gather(parts, logits_shard.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1)[..., :vocab]
