"""Transformer Engine layer specs against megatron's local spec on the same weights (GPU + TE only).

Not yet run on a GPU machine: written to be the first check of the next GPU session (see
docs/benchmarks.md). The CPU side of the same logic -- spec selection, FP8 settings reaching
megatron, the local spec's parity with transformers at every layout -- is tested in tests/unit and
tests/distributed.
"""

import pytest
import torch

from megatron_gndpo.config.schema import ParallelConfig, PrecisionConfig
from tests import common

pytestmark = pytest.mark.gpu


def _logprobs(precision, weights, toks):
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.weights import load_global_weights
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs

    cfg = common.model_config(hidden_size=256, intermediate_size=512, num_key_value_heads=2, qk_layernorm=True)
    model = build_gpt_model(cfg, ParallelConfig(), precision, pre_process=True, post_process=True).cuda().eval()
    if weights is None:
        from megatron_gndpo.models.weights import gather_global_weights

        weights = gather_global_weights(model)
    load_global_weights(model, {k: v.cuda() for k, v in weights.items()})
    with torch.no_grad():
        logits = model(toks[:, :-1], torch.arange(toks.shape[1] - 1, device="cuda").expand(toks.shape[0], -1), None)
        return vocab_parallel_logprobs(logits.float(), toks[:, 1:]), weights


@pytest.fixture(scope="module")
def parallel_state():
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    yield
    destroy_parallel()


def test_te_bf16_and_fp8_match_the_local_spec(parallel_state):
    toks = common.tokens(4, 129).cuda()
    local, weights = _logprobs(PrecisionConfig(params_dtype="bfloat16", transformer_impl="local"), None, toks)
    te, _ = _logprobs(PrecisionConfig(params_dtype="bfloat16", transformer_impl="transformer_engine"), weights, toks)
    fp8, _ = _logprobs(PrecisionConfig(params_dtype="bfloat16", transformer_impl="transformer_engine", fp8="hybrid",
                                       fp8_amax_history_len=16), weights, toks)
    bf16_err = (te - local).abs().mean().item()
    fp8_err = (fp8 - local).abs().mean().item()
    print(f"mean |log-prob error| vs local spec: TE bf16 {bf16_err:.4f}, TE fp8 {fp8_err:.4f}")
    assert bf16_err < 2e-2
    assert fp8_err < 1e-1
