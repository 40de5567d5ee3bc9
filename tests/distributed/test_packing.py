"""Token-budget and packed micro-batches give today's step. One trainer per layout (TP, PP, DP) =
(1,1,1), (2,1,1), (1,2,1), (1,1,2) (the last three one after the other in one two-process world, to
spawn less; (1,1,1) with both local core attentions, SDPA and megatron's) runs step 1 three ways --
fixed-size padded micro-batches (today), token-budget ones, packed rows -- from the same weights (the
optimizer's update is held back and each mini-batch's gradients recorded instead): same gradients, losses
and statistics (float32). Scoring through the fused LM head + log-prob (logits never whole) equals the
model's logits read by ``vocab_parallel_logprobs``, padded and packed, on every layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed
from tests.trainer_setup import run_config, write_prompts

pytestmark = pytest.mark.distributed

COMPARED = ("actor/policy_loss", "actor/entropy", "score/mean", "score/std", "adv/max", "adv/min",
            "rollout/logprob_diff_max", "estimator/valid_tokens")
WAYS = {  # max_position_embeddings 16: rows of at most 8 + 4 - 1 = 11 positions
    "padded": {"max_tokens_per_microbatch": None, "pack_sequences": False},
    "budget": {"max_tokens_per_microbatch": 24, "pack_sequences": False},
    "packed": {"max_tokens_per_microbatch": 24, "pack_sequences": True},
}


def _layouts(groups, tmp, layouts):
    return [_one_step_each_way(tmp, tp, pp, attention) for tp, pp, attention in layouts]


def _one_step_each_way(tmp, tp, pp, attention):
    import dataclasses

    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.step import train_step
    from megatron_gndpo.trainer.trainer import Trainer

    write_prompts(Path(tmp) / "train.parquet")
    cfg = run_config(Path(tmp), [f"parallel.tensor_model_parallel_size={tp}",
                                 f"parallel.pipeline_model_parallel_size={pp}", f"trainer.output_dir={tmp}/run",
                                 f"precision.local_attention={attention}"])
    destroy_parallel(destroy_process_group=False)
    trainer = Trainer(cfg)  # random weights: the three ways start from the same ones
    student, order = trainer.student, trainer.order.state_dict()
    grads = []

    def record_gradients():  # instead of the optimizer's step: weights stay, the next way starts from them
        grads.append({name: p.main_grad.clone() for name, p in student.model.named_parameters()})
        return True, 0.0, None

    student.optimizer.step = record_gradients
    out = {}
    for way, fields in WAYS.items():
        trainer.cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **fields))
        trainer.order.load_state_dict(order)
        grads.clear()
        metrics = train_step(trainer, 1)
        out[way] = {"metrics": metrics if trainer.is_logging_rank else None, "grads": list(grads)}
    out["fused_error"] = _fused_scoring_error(trainer)
    trainer.close(destroy_process_group=False)
    return out


def _fused_scoring_error(trainer):
    """Largest |fused - unfused| log-prob of both models over padded and packed micro-batches of prompts
    of 3..11 tokens (last stage; None elsewhere)."""
    from megatron_gndpo.trainer.batches import form_microbatches, sequences_from_prompts
    from megatron_gndpo.trainer.megatron_glue import forward_logprobs, forward_outputs

    readout = trainer.student.readout
    ids = [[(7 * i + j) % 13 + 1 for j in range(3 + i % 9)] for i in range(6)]
    batch = sequences_from_prompts(ids, 0, trainer.groups.device)
    error = None  # every stage runs every forward (a pipeline's stages talk); the last one compares
    for pack in (False, True):
        mbs = form_microbatches(batch, mini_batches=1, micro_batch_size=2, max_tokens=16 if pack else None,
                                pack=pack, multiple=1, pad_token_id=0)
        for model in (trainer.teacher.model, trainer.student.module):
            fused = forward_logprobs(model, mbs, readout, "lp")
            plain = forward_outputs(model, mbs, lambda logits, mb: {"lp": readout.logprobs(logits, mb["labels"])})
            if fused:
                error = max(error or 0.0, float((fused["lp"] - plain["lp"]).abs().max()))
    return error


@pytest.mark.parametrize("world,layouts", [
    (1, [(1, 1, "sdpa"), (1, 1, "megatron")]),  # both local core attentions take the packed mask
    (2, [(2, 1, "sdpa"), (1, 2, "sdpa"), (1, 1, "sdpa")]),
], ids=["111", "211-121-112"])
def test_budget_and_packed_steps_equal_the_padded_step(tmp_path, world, layouts):
    """Tolerances: gradients atol 1e-6 (their scale is ~1e-2), metrics rel 1e-5 / abs 1e-6: only the float32
    summation order differs (micro-batch grouping, attention and matmuls over other widths)."""
    per_rank = run_distributed(_layouts, world, args=(str(tmp_path), layouts), timeout_s=300)
    for i, layout in enumerate(layouts):
        out = [rank[i] for rank in per_rank]
        logged = next(o for o in out if o["padded"]["metrics"] is not None)
        ref = logged["padded"]["metrics"]
        assert max(o["fused_error"] for o in out if o["fused_error"] is not None) < 1e-5, layout
        for way in ("budget", "packed"):
            for key in COMPARED:
                assert logged[way]["metrics"][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (layout, way, key)
            for rank in out:
                assert len(rank[way]["grads"]) == len(rank["padded"]["grads"]) == 2  # trainer.mini_batches
                for got, want in zip(rank[way]["grads"], rank["padded"]["grads"]):
                    assert any(g.abs().max() > 0 for g in want.values())
                    for key, g in want.items():
                        torch.testing.assert_close(got[key], g, rtol=0, atol=1e-6, msg=(layout, way, key))
