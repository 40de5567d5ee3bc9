"""ModelOpt FP8 post-training quantisation of the teacher (``teacher.quantize``): the numerics are
E4M3 with per-tensor scales, checked against a float64 re-implementation; the trainer calibrates it,
reports its log-prob error and trains with it, identically at every layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import common
from tests.harness import run_distributed
from tests.trainer_setup import make_initial_checkpoints, run_config

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
pytestmark = pytest.mark.distributed

E4M3_MAX = 448.0


def _e4m3(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Fake-quantised ``t`` in float64: scaled so that ``amax`` maps to E4M3's largest value, rounded
    to E4M3, scaled back."""
    scale = amax.double() / E4M3_MAX
    return (t.double() / scale).float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double() * scale


def _one_linear(groups):
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.quantization import quantize_teacher
    from megatron_gndpo.models.teacher import freeze

    cfg = common.model_config(**common.TEACHER)
    model = freeze(build_gpt_model(cfg, common.parallel(1), common.FP32, pre_process=True, post_process=True))
    weight = model.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
    mb = common.microbatch(common.tokens(4, 32))
    model = quantize_teacher(model, "fp8", lambda m: m(mb["tokens"], mb["position_ids"], None))
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    seen = {}
    hook = fc1.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach(), y=out[0].detach()))
    with torch.no_grad():
        model(mb["tokens"], mb["position_ids"], None)
    hook.remove()
    x, y = seen["x"], seen["y"].double()
    expected = _e4m3(x, fc1.input_quantizer.amax) @ _e4m3(weight, fc1.weight_quantizer.amax).T
    return {"error": (y - expected).abs().max().item(),
            "vs_unquantised": (y - x.double() @ weight.double().T).abs().max().item(),
            "fc1_dtype": fc1.weight.dtype, "lm_head_dtype": model.output_layer.weight.dtype,
            "embedding_dtype": model.embedding.word_embeddings.weight.dtype}


def test_fp8_teacher_layers_compute_e4m3_per_tensor():
    got = run_distributed(_one_linear, 1)[0]
    assert got["fc1_dtype"] == torch.float8_e4m3fn  # compressed: the weight is stored in FP8
    assert got["lm_head_dtype"] == got["embedding_dtype"] == torch.float32
    assert got["vs_unquantised"] > 1e-3  # quantisation is visible...
    assert got["error"] < 1e-5  # ...and is exactly E4M3 with per-tensor max-calibrated scales


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    run_distributed(make_initial_checkpoints, 1, args=(str(tmp),))
    return tmp


def _quantized_trainer(groups, tmp, pp):
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    tmp = Path(tmp)
    cfg = run_config(tmp, ["teacher.quantize=fp8", "teacher.calibration_prompts=16",
                           f"parallel.pipeline_model_parallel_size={pp}", f"trainer.output_dir={tmp}/run_{pp}"],
                     student_checkpoint=str(tmp / "student"), teacher={"checkpoint": str(tmp / "teacher")})
    destroy_parallel(destroy_process_group=False)
    trainer = Trainer(cfg)
    fp8 = {name: p.dtype == torch.float8_e4m3fn for name, p in trainer.teacher.model.named_parameters()}
    metrics = trainer.train_step()
    return {"quant": trainer.teacher.quant_metrics, "fp8": fp8, "loss": metrics.get("actor/policy_loss"),
            "logging": trainer.is_logging_rank}


def test_trainer_calibrates_and_reports_the_same_teacher_at_every_layout(workdir):
    """One process vs PP=2 x DP=2 (each DP rank calibrates on its own prompts; ModelOpt syncs the
    scales): the same held-out log-prob error, and a training step with the FP8 teacher."""
    ref = run_distributed(_quantized_trainer, 1, args=(str(workdir), 1))[0]
    out = run_distributed(_quantized_trainer, 4, pp=2, args=(str(workdir), 2))
    q = ref["quant"]
    assert q["teacher_quant/logprob_tokens"] > 0
    assert 0 < q["teacher_quant/logprob_abs_mean"] <= q["teacher_quant/logprob_abs_max"] < 1.0
    linear = {n: is_fp8 for n, is_fp8 in ref["fp8"].items() if ".linear_" in n and n.endswith(".weight")}
    assert linear and all(linear.values())
    assert not ref["fp8"]["output_layer.weight"] and not ref["fp8"]["embedding.word_embeddings.weight"]
    last = next(o for o in out if o["logging"])
    for key, value in q.items():
        assert last["quant"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert torch.isfinite(torch.tensor(last["loss"])) and last["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
    assert all(all(v for n, v in o["fp8"].items() if ".linear_" in n and n.endswith(".weight")) for o in out)
