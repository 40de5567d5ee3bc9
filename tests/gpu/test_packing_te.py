"""Packed rows through Transformer Engine's THD path (``PackedSeqParams``) against the same rows padded
(GPU + TE only).

Not yet run on a GPU machine. The CPU side of the same logic -- packing, ``unpack``, the block-diagonal
causal mask of the local spec, token-budget grouping -- is tested in tests/distributed/test_packing.py
and tests/unit/test_microbatching.py.
"""

import pytest
import torch

from megatron_gndpo.config.schema import ParallelConfig, PrecisionConfig
from tests import common

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def parallel_state():
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the THD path runs on Transformer Engine only")
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    yield
    destroy_parallel()


def test_thd_packed_rows_match_padded_rows(parallel_state):
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.batches import form_microbatches, gather_rows, sequences_from_prompts
    from megatron_gndpo.trainer.megatron_glue import model_forward, uses_transformer_engine

    cfg = common.model_config(hidden_size=256, intermediate_size=512, num_key_value_heads=2)
    precision = PrecisionConfig(params_dtype="bfloat16", transformer_impl="transformer_engine")
    model = build_gpt_model(cfg, ParallelConfig(), precision, pre_process=True, post_process=True).cuda().eval()
    assert uses_transformer_engine(model)
    toks = common.tokens(8, 65)
    lengths = [65, 9, 40, 17, 3, 64, 30, 12]
    batch = sequences_from_prompts([toks[i, :n].tolist() for i, n in enumerate(lengths)], 0, torch.device("cuda"))
    out = {}
    with torch.no_grad():
        for pack in (False, True):
            mbs = form_microbatches(batch, mini_batches=1, micro_batch_size=8, max_tokens=128 if pack else None,
                                    pack=pack, multiple=16, pad_token_id=0)
            assert all(("cu_seqlens" in mb) == pack for mb in mbs)
            out[pack] = gather_rows([vocab_parallel_logprobs(model_forward(model, mb).float(), mb["labels"])
                                     for mb in mbs], mbs)
    mask = batch["mask"][:, :out[True].shape[1]]
    err = (out[True] - out[False][:, :mask.shape[1]])[mask].abs().max().item()
    print(f"max |log-prob| packed (THD) vs padded: {err:.4f}")
    assert err < 2e-2  # bf16; the two layouts run different attention kernels
