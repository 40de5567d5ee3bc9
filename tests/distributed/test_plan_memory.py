"""``plan``'s memory estimate against what a CPU run allocates: the student's weights, gradients and
optimizer state after one optimizer step, and the peak of one forward / backward over a micro-batch,
at several TP x PP layouts (float32 weights, the CPU path)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.tensor_memory import TensorBytes
from megatron_gndpo.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig
from tests.harness import run_distributed

ARCH = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=384, max_position_embeddings=512)
FP32 = PrecisionConfig(params_dtype="float32", transformer_impl="local")
MICRO, SEQ = 4, 256


def _measure(groups, arch_fields):
    import gc

    from megatron_gndpo.models.student import build_optimizer, build_student
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.megatron_glue import TokenLoss, run_schedule

    arch = ModelConfig(**arch_fields)
    par = ParallelConfig(tensor_model_parallel_size=groups.tp_size, pipeline_model_parallel_size=groups.pp_size)
    toks = torch.randint(0, arch.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    mb = {"tokens": toks[:, :-1], "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous(),
          "labels": toks[:, 1:]}

    loss = TokenLoss(lambda logits_shard, batch: {"lp": vocab_parallel_logprobs(
        logits_shard, batch["labels"], group=groups.tp, vocab_size=arch.vocab_size)},
        lambda tokens, batch: (-tokens["lp"].sum() / tokens["lp"].numel(), {}))

    with TensorBytes() as states:
        model = build_student(arch, par, FP32, pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        optimizer = build_optimizer(OptimConfig(lr=1e-3), FP32, par, model)
        gc.collect()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        before = states.live
        states.peak = before
        run_schedule(model, [mb], loss=loss, forward_only=False)
        pass_peak = states.peak - before
        optimizer.step()
        gc.collect()
        return {"states": states.live, "pass_peak": pass_peak}


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_memory_estimate_within_15_percent_of_a_cpu_run(world, tp, pp):
    from megatron_gndpo.planning.memory import model_state_bytes, training_pass_bytes
    from megatron_gndpo.planning.workload import Layout, Workload

    arch = ModelConfig(**ARCH)
    layout = Layout(tp=tp, pp=pp, dp=world // (tp * pp))
    work = Workload(prompts_per_step=MICRO, samples=1, max_prompt=SEQ, max_response=0, micro_batch_size=MICRO,
                    param_bytes=4, distributed_optimizer=False, transformer_impl="local")
    states = sum(model_state_bytes(arch, layout, work).values())
    step = sum(training_pass_bytes(arch, layout, work, recompute=False).values())
    measured = run_distributed(_measure, world, tp=tp, pp=pp, args=(ARCH,))
    # the estimate is for the largest rank
    largest = {key: max(m[key] for m in measured) for key in ("states", "pass_peak")}
    assert abs(largest["states"] / states - 1) < 0.15, f"{largest} vs states {states}"
    assert abs(largest["pass_peak"] / step - 1) < 0.15, f"{largest} vs one pass {step}"
