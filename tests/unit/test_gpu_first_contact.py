"""The GPU path's first-contact guards, checked on CPU (the GPU side runs in tests/gpu and the benchmarks).

Each test fails on the code before its fix: tensors built without a device in the step, a broken
Transformer Engine breaking the local spec, gloo children seeing a GPU, FP8 token counts, full-prompt
logits in the prefill, FP8 during decoding, recipes the GPU cannot run, the converter's meta model
allocating on the GPU, and the teacher's offload.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from tests import common
from tests.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "randn", "rand", "randint", "linspace"}
# The step: every tensor it builds must be on the device its collectives and models use.
STEP_MODULES = ["megatron_gndpo/trainer/trainer.py", "megatron_gndpo/trainer/evaluation.py",
                "megatron_gndpo/trainer/megatron_glue.py", "megatron_gndpo/rollout/generator.py",
                "megatron_gndpo/trainer/step.py", "megatron_gndpo/trainer/batches.py",
                "megatron_gndpo/trainer/images.py", "megatron_gndpo/rollout/continuous.py",
                "megatron_gndpo/models/quantization.py", "megatron_gndpo/models/teacher.py",
                "megatron_gndpo/models/vlm.py", *sorted(str(p.relative_to(REPO)) for p in
                                                              (REPO / "megatron_gndpo/algorithms").glob("*.py"))]


@pytest.mark.parametrize("module", STEP_MODULES)
def test_the_step_never_builds_a_tensor_without_a_device(module):
    """``torch.tensor(...)`` without ``device=`` lands on the CPU: beside CUDA tensors it fails in an op,
    under NCCL in an all-reduce. Every factory call in the step names its device."""
    bad = []
    for node in ast.walk(ast.parse((REPO / module).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            bad.append(f"{module}:{node.lineno} torch.{node.func.attr}(...)")
    assert not bad, "tensors built without a device:\n" + "\n".join(bad)


def test_a_broken_transformer_engine_leaves_the_local_spec_working(tmp_path):
    """An installed TE whose import raises something other than ImportError (an OSError for a missing
    cuBLAS symbol) must neither break megatron's local spec nor go unexplained when TE is asked for."""
    fake = tmp_path / "transformer_engine"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libcublasLt.so.13: undefined symbol: cublasLtGroupedMatmul")\n')
    script = textwrap.dedent("""
        import megatron_gndpo
        from megatron_gndpo.config.schema import ModelConfig, PrecisionConfig
        from megatron_gndpo.models import provider
        from megatron.core.models.gpt import gpt_layer_specs  # imports megatron's TE extension module
        from megatron.core.extensions.transformer_engine import HAVE_TE
        assert not HAVE_TE
        provider.layer_spec(ModelConfig(), PrecisionConfig(transformer_impl="local"))
        try:
            provider.use_transformer_engine(PrecisionConfig(transformer_impl="transformer_engine"))
        except ValueError as e:
            print("REFUSED:", e)
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED:" in proc.stdout and "OSError: libcublasLt.so.13: undefined symbol" in proc.stdout


def _cuda_view(_groups):
    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(), _groups.device.type


@pytest.mark.distributed
def test_gloo_children_never_see_a_gpu():
    """On a one-GPU machine two ranks that saw CUDA would both pick NCCL and set_device(rank): a hang."""
    assert run_distributed(_cuda_view, 2) == [("", False, "cpu")] * 2


def test_sequences_are_padded_for_fp8_and_the_real_positions_keep_their_log_probs():
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.batches import pad_sequence_length

    toks = common.tokens(3, 21)
    batch = {"tokens": toks[:, :-1], "labels": toks[:, 1:], "mask": torch.ones(3, 20, dtype=torch.bool),
             "position_ids": torch.arange(20).expand(3, 20)}
    padded = pad_sequence_length(batch, 16, pad_token_id=0)
    assert padded["tokens"].shape == (3, 32) and padded["mask"][:, 20:].sum() == 0 and padded["mask"][:, :20].all()
    assert torch.equal(padded["position_ids"][0], torch.arange(32)) and padded["labels"][:, 20:].eq(0).all()
    assert pad_sequence_length(padded, 16, 0) is padded
    init_parallel(ParallelConfig(), seed=0)
    try:
        model = build_gpt_model(common.model_config(), ParallelConfig(), common.FP32, pre_process=True,
                                post_process=True).eval()
        with torch.no_grad():
            lps = [vocab_parallel_logprobs(model(b["tokens"], b["position_ids"], None), b["labels"])
                   for b in (batch, padded)]
    finally:
        destroy_parallel()
    torch.testing.assert_close(lps[1][:, :20], lps[0], rtol=1e-5, atol=1e-5)


def test_prefill_feeds_the_lm_head_the_last_position_only():
    """The prefill must not materialise [prompt_len, B, V/TP] logits (40 GB at 512 x 256 x 152k)."""
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.rollout.generator import SamplingParams, generate

    groups = init_parallel(ParallelConfig(), seed=0)
    try:
        model = build_gpt_model(common.model_config(), ParallelConfig(), common.FP32, pre_process=True,
                                post_process=True)
        positions = []
        model.output_layer.register_forward_hook(lambda m, args, out: positions.append(out[0].shape[0]))
        prompts = [list(range(5, 17)), list(range(3, 12))]
        out = generate(model, prompts, torch.arange(2), SamplingParams(max_new_tokens=4), groups=groups,
                       vocab_size=1000, seed=3, max_sequence_length=64)
    finally:
        destroy_parallel()
    assert out.response_lengths.tolist() == [4, 4]
    assert set(positions) == {1}, positions


def test_decoding_turns_fp8_off_and_restores_it():
    from megatron_gndpo.rollout.generator import fp8_off

    class Layer(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    class Config:
        fp8 = "hybrid"

    shared, own = Config(), Config()
    model = torch.nn.Sequential(Layer(shared), Layer(shared), Layer(own))
    with fp8_off(model):
        assert shared.fp8 is None and own.fp8 is None
    assert shared.fp8 == "hybrid" and own.fp8 == "hybrid"


def test_recipes_the_gpu_cannot_run_are_refused(monkeypatch):
    from megatron_gndpo.models import provider

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    mxfp8 = PrecisionConfig(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match="mxfp8.*Blackwell.*NVIDIA H100 80GB HBM3 is 9.0"):
        provider.check_fp8_recipe(mxfp8)
    provider.check_fp8_recipe(PrecisionConfig(transformer_impl="transformer_engine", fp8="e4m3"))
    assert provider.params_dtype(PrecisionConfig()) == torch.bfloat16  # 'auto' on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert provider.params_dtype(PrecisionConfig()) == torch.float32
    assert provider.params_dtype(PrecisionConfig(params_dtype="bfloat16")) == torch.bfloat16


def test_the_converter_builds_its_meta_model_with_cpu_initialization(monkeypatch):
    """On a GPU host megatron allocates weights on the GPU unless told to initialise on the CPU, whatever
    the enclosing meta-device context says."""
    from megatron_gndpo.checkpoint import megatron_io
    from megatron_gndpo.models import provider

    seen = []
    real = provider.build_gpt_model

    def recording(*args, **kwargs):
        seen.append(kwargs.get("cpu_initialization"))
        return real(*args, **kwargs)

    monkeypatch.setattr(provider, "build_gpt_model", recording)
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    try:
        sharded = megatron_io._meta_sharded_state_dict(ModelConfig(), tp=2)
    finally:
        destroy_parallel()
    assert seen == [True]
    assert any(getattr(v, "data", None) is not None and v.data.device.type == "meta" for v in sharded.values())


def test_an_offloaded_teacher_scores_alike_and_returns_to_its_host_copies():
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.teacher import OffloadedWeights, freeze

    init_parallel(ParallelConfig(), seed=0)
    try:
        model = freeze(build_gpt_model(common.model_config(), ParallelConfig(), common.FP32, pre_process=True,
                                       post_process=True, cpu_initialization=True))
        toks = common.tokens(2, 9)
        mb = common.microbatch(toks)
        with torch.no_grad():
            before = model(mb["tokens"], mb["position_ids"], None)
            offload = OffloadedWeights(model, torch.device("cpu"))
            with offload.on_device() as on_device:
                during = on_device(mb["tokens"], mb["position_ids"], None)
    finally:
        destroy_parallel()
    torch.testing.assert_close(during, before)
    params = dict(model.named_parameters())
    assert all(params[n].data_ptr() == offload.host[n].data_ptr() for n in params)
