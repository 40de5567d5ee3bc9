"""SDPAttention against megatron's DotProductAttention: the module alone, whole models, KV-cached decoding."""

import dataclasses

import pytest
import torch

from megatron_gndpo.config.schema import ParallelConfig
from megatron_gndpo.models.provider import build_transformer_config
from tests import common

# 8 query heads in 2 KV groups: GQA with 4 query heads per group
GQA = {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128}
# Where megatron puts its modules in this process (the GPU when there is one); inputs follow. float32
# kernels on a GPU accumulate in another order than on the CPU, hence the wider tolerance there.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = 1e-5 if DEVICE.type == "cpu" else 1e-4


@pytest.fixture(scope="module")
def megatron_groups():
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    yield
    destroy_parallel()


def _config(**overrides):
    config = build_transformer_config(common.model_config(**GQA), ParallelConfig(), common.FP32)
    return dataclasses.replace(config, **overrides)


def _core_kwargs(config, mask_type="causal", **kwargs):
    """What megatron's SelfAttention passes to its core attention."""
    from megatron.core.transformer.enums import AttnMaskType

    return {"config": config, "layer_number": 1, "attn_mask_type": AttnMaskType[mask_type], "attention_type": "self",
            **kwargs}


def _cores(config, **kwargs):
    """(megatron's DotProductAttention, SDPAttention) built alike, in eval mode."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_gndpo.models.attention import SDPAttention

    kwargs = _core_kwargs(config, **kwargs)
    return DotProductAttention(**kwargs).to(DEVICE).eval(), SDPAttention(**kwargs).to(DEVICE).eval()


def _qkv(seq, dtype=torch.float32):
    """query [seq, 2, 8, 16], key / value [seq, 2, 2, 16]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 2, 8, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(seq, 2, 2, 16, generator=g, dtype=dtype) for _ in range(2))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32), (torch.float64, 1e-12)])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_causal_gqa_matches_dot_product_attention(megatron_groups, dtype, tol, seq):
    reference, sdpa = _cores(_config())
    q, k, v = _qkv(seq, dtype=dtype)
    out = sdpa(q, k, v, None)
    assert out.shape == (seq, 2, 128) and out.dtype == dtype
    torch.testing.assert_close(out, reference(q, k, v, None), rtol=tol, atol=tol)


def test_softmax_scale_and_query_key_layer_scaling_match(megatron_groups):
    q, k, v = _qkv(9)
    for config, scale in ((_config(), 0.3), (_config(apply_query_key_layer_scaling=True), None)):
        reference, sdpa = _cores(config, layer_number=3, softmax_scale=scale)
        torch.testing.assert_close(sdpa(q, k, v, None), reference(q, k, v, None), rtol=F32, atol=F32)


@pytest.mark.parametrize("mask_type", ["padding", "causal"])
def test_explicit_boolean_mask_is_used_as_megatron_uses_it(megatron_groups, mask_type):
    reference, sdpa = _cores(_config(), mask_type=mask_type)
    q, k, v = _qkv(12)
    mask = (torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) < 0.4).to(DEVICE)  # True = masked
    mask[..., 0] = False
    torch.testing.assert_close(sdpa(q, k, v, mask), reference(q, k, v, mask), rtol=F32, atol=F32)
    mask[0, 0, 3] = True  # a padding row: every key masked
    assert torch.isfinite(sdpa(q, k, v, mask)).all()


def test_kv_cached_queries_see_the_keys_up_to_their_position(megatron_groups):
    from megatron.core.transformer.enums import AttnMaskType

    reference, sdpa = _cores(_config())
    q, k, v = _qkv(20)
    full = sdpa(q, k, v, None)
    # megatron passes no_mask for a cached step; one query needs none, so megatron's module agrees there
    step = {"attn_mask_type": AttnMaskType.no_mask}
    torch.testing.assert_close(sdpa(q[11:12], k[:12], v[:12], None, **step), full[11:12], rtol=F32, atol=F32)
    torch.testing.assert_close(sdpa(q[11:12], k[:12], v[:12], None, **step),
                               reference(q[11:12], k[:12], v[:12], None, **step), rtol=F32, atol=F32)
    # several cached queries: the causal triangle aligned bottom-right (megatron's module asserts sq == sk)
    torch.testing.assert_close(sdpa(q[12:17], k[:17], v[:17], None, **step), full[12:17], rtol=F32, atol=F32)


def _gpt(attention, seed=0):
    from megatron.core.models.gpt import GPTModel

    from megatron_gndpo.models.attention import local_layer_spec

    cfg = common.model_config(**GQA, num_hidden_layers=2, qk_layernorm=True)
    torch.manual_seed(seed)
    return cfg, GPTModel(
        config=build_transformer_config(cfg, ParallelConfig(), common.FP32),
        transformer_layer_spec=local_layer_spec(cfg.qk_layernorm, attention),
        vocab_size=cfg.padded_vocab_size(1), max_sequence_length=cfg.max_position_embeddings,
        parallel_output=True, position_embedding_type="rope", rotary_base=cfg.rope_theta,
    ).to(DEVICE)


@pytest.fixture(scope="module")
def models(megatron_groups):
    _, reference = _gpt("megatron")
    cfg, sdpa = _gpt("sdpa", seed=1)
    sdpa.load_state_dict(reference.state_dict())
    return cfg, reference, sdpa


def test_gpt_model_logits_and_gradients_match_megatron_attention(models):
    from megatron_gndpo.models.attention import SDPAttention

    _, reference, sdpa = models
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert sdpa.sharded_state_dict().keys() == reference.sharded_state_dict().keys()  # same checkpoints
    toks = common.tokens(2, 24).to(DEVICE)
    pos = common.microbatch(toks)["position_ids"]
    out = {}
    for name, model in (("reference", reference), ("sdpa", sdpa)):
        model.train().zero_grad()
        logits = model(toks, pos, None)
        logits.logsumexp(-1).sum().backward()
        out[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out["sdpa"][0], out["reference"][0], rtol=F32, atol=F32)
    for n, grad in out["reference"][1].items():
        torch.testing.assert_close(out["sdpa"][1][n], grad, rtol=1e-4, atol=F32, msg=lambda m, n=n: f"{n}: {m}")


def test_kv_cached_decoding_matches_the_full_forward(models):
    from megatron.core.inference.contexts import StaticInferenceContext

    _, reference, sdpa = models
    toks = common.tokens(2, 16, seed=2).to(DEVICE)
    pos = common.microbatch(toks)["position_ids"]
    with torch.no_grad():
        full = sdpa.eval()(toks, pos, None)
        # prefill 6, single tokens to 11, a 3-token cached chunk, single tokens to the end
        runs = (("sdpa", sdpa, [6, 1, 1, 1, 1, 1, 3, 1, 1]), ("megatron", reference, [6] + [1] * 10))
        for name, model, chunks in runs:
            model.eval()
            context, start = StaticInferenceContext(2, 16), 0
            for size in chunks:
                last = model(toks[:, start:start + size], pos[:, start:start + size], None,
                             inference_context=context, runtime_gather_output=True)[:, -1]
                context.sequence_len_offset += size
                start += size
                torch.testing.assert_close(last, full[:, start - 1], rtol=F32, atol=F32,
                                           msg=lambda m, at=f"{name}, position {start - 1}": f"{at}: {m}")


def test_local_layer_spec_choices_and_no_shared_state():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_gndpo.models.attention import SDPAttention, local_layer_spec

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    assert core(local_layer_spec(True, "sdpa")) is SDPAttention
    assert core(local_layer_spec(True, "megatron")) is DotProductAttention
    with pytest.raises(ValueError, match="local attention must be one of .*'flash'"):
        local_layer_spec(False, "flash")


def test_unsupported_settings_are_refused_by_name(megatron_groups):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_gndpo.models.attention import SDPAttention

    for overrides, match in (
        ({"context_parallel_size": 2}, "context_parallel_size=2 was given a context-parallel group of 1 ranks"),
        ({"window_size": (4, 0)}, "sliding-window"),
        ({"softmax_type": "learnable"}, "softmax_type='learnable'"),
    ):
        with pytest.raises(ValueError, match=match):
            SDPAttention(**_core_kwargs(_config(**overrides)))
    with pytest.raises(ValueError, match="attn_mask_type=arbitrary"):
        SDPAttention(**_core_kwargs(_config(), mask_type="arbitrary"))
    sdpa = SDPAttention(**_core_kwargs(_config()))
    q, k, v = _qkv(4)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1, 8, 4, 4, device=DEVICE))
    with pytest.raises(NotImplementedError, match="packed_seq_params"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(TypeError, match="attention_mask must be boolean"):
        sdpa(q, k, v, torch.zeros(2, 1, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="attn_mask_type=padding_causal"):
        sdpa(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal)
    dropout = SDPAttention(**_core_kwargs(_config(), attention_dropout=0.1))
    dropout.eval()(q, k, v, None)  # dropout is off in eval
    with pytest.raises(NotImplementedError, match="attention dropout in training"):
        dropout.train()(q, k, v, None)
