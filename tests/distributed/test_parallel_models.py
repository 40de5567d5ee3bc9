"""Foundation invariants: every TP x PP x DP layout computes the same model."""

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.models.provider import build_gpt_model
from megatron_gndpo.models.student import build_optimizer, build_student, unwrap
from megatron_gndpo.models.teacher import build_teacher
from megatron_gndpo.models.weights import gather_global_weights, load_global_weights
from megatron_gndpo.trainer.megatron_glue import TokenLoss, run_schedule
from tests import common
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed


def _logits_per_tp(groups):
    cfg = common.model_config()
    toks = common.tokens(2, 16)
    out, weights = {}, None
    for tp in (1, 2, 4):
        groups = relayout(tp)
        model = build_gpt_model(cfg, common.parallel(tp), common.FP32, pre_process=True, post_process=True)
        if weights is None:
            weights = gather_global_weights(model)
        else:
            load_global_weights(model, weights)
        with torch.no_grad():
            shard = model(toks, common.microbatch(toks)["position_ids"], None)
        out[tp] = common.gather_vocab(shard, groups, cfg.vocab_size)
    return out


def test_tensor_parallel_logits_match_single_rank():
    results = run_distributed(_logits_per_tp, 4)
    for rank, per_tp in enumerate(results):
        ref = per_tp[1]
        assert ref.shape == (2, 16, 1000)
        for tp in (2, 4):
            torch.testing.assert_close(per_tp[tp], ref, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"rank {rank}, TP={tp} vs TP=1: {m}")


# (tp, pp) layouts on 4 ranks; DP takes the rest: (1,1)->DP4, (2,1)->DP2, (1,2)->DP2, (2,2)->DP1, (4,1)->DP1
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
GLOBAL_BATCH, SEQ, MICRO = 8, 12, 2


def _ce_loss(global_tokens):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def read(logits_shard, batch):
        return {"ce": vocab_parallel_cross_entropy(logits_shard.float(), batch["labels"])}  # [b, T]

    return TokenLoss(read, lambda tokens, batch: (tokens["ce"].sum() / global_tokens,
                                                   {"ce_sum": tokens["ce"].detach().sum()}))


def _grads_per_layout(groups):
    cfg = common.model_config()
    data = common.tokens(GLOBAL_BATCH, SEQ + 1, seed=3)
    out, weights = {}, None
    for tp, pp in LAYOUTS:
        groups = relayout(tp, pp)
        model = build_student(cfg, common.parallel(tp, pp), common.FP32,
                              pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        if weights is None:
            weights = gather_global_weights(unwrap(model))
        else:
            load_global_weights(unwrap(model), weights)
        per_dp = GLOBAL_BATCH // groups.dp_size
        mine = data[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]
        mbs = []
        for i in range(0, per_dp, MICRO):
            mb = common.microbatch(mine[i:i + MICRO, :-1])
            mb["labels"] = mine[i:i + MICRO, 1:]
            mbs.append(mb)
        model.zero_grad_buffer()
        metrics = run_schedule(model, mbs, loss=_ce_loss(GLOBAL_BATCH * SEQ), forward_only=False)
        loss = torch.stack([m["ce_sum"] for m in metrics]).sum() if metrics else torch.zeros(())
        if groups.is_last_stage:
            dist.all_reduce(loss, group=groups.dp)
        # the summed loss lives on the last stage; share it with the whole pipeline
        dist.broadcast(loss, src=dist.get_global_rank(groups.pp, groups.pp_size - 1), group=groups.pp)
        for p in unwrap(model).parameters():
            p.data.copy_(p.main_grad)
        out[(tp, pp)] = (loss.item() / (GLOBAL_BATCH * SEQ), gather_global_weights(unwrap(model)))
    return out


def test_pipeline_and_data_parallel_match_single_rank_loss_and_grads():
    results = run_distributed(_grads_per_layout, 4, timeout_s=240)
    ref_loss, ref_grads = results[0][(1, 1)]
    assert ref_loss > 0
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for rank, per_layout in enumerate(results):
        for layout, (loss, grads) in per_layout.items():
            assert abs(loss - ref_loss) < 1e-5, f"rank {rank} layout (tp, pp)={layout}: loss {loss} vs {ref_loss}"
            assert grads.keys() == ref_grads.keys()
            for key in ref_grads:
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"rank {rank} layout (tp, pp)={layout} grad {key}: {m}")


def _teacher_after_student_step(groups):
    from megatron_gndpo.config.schema import OptimConfig, TeacherConfig

    cfg, tcfg = common.model_config(), TeacherConfig(model=common.model_config(**common.TEACHER), precision=common.FP32)
    par = common.parallel(groups.tp_size, groups.pp_size)
    student = build_student(cfg, par, common.FP32, pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
    teacher = build_teacher(tcfg, par, pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
    optimizer = build_optimizer(OptimConfig(lr=1e-2), common.FP32, par, student)
    before = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    toks = common.tokens(2, 9, seed=5)
    mb = common.microbatch(toks[:, :-1])
    mb["labels"] = toks[:, 1:]
    scores = run_schedule(teacher, [mb], collect_fn=lambda logits, b: {"max": logits.max().detach()}, forward_only=True)
    student.zero_grad_buffer()
    optimizer.zero_grad()
    run_schedule(student, [mb], loss=_ce_loss(toks[:, 1:].numel()), forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {
        "updated": updated,
        "grad_norm": grad_norm,
        "scored": len(scores),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_grads": any(p.grad is not None or hasattr(p, "main_grad") for p in teacher.parameters()),
        "teacher_in_optimizer": any(id(p) in optimizer_params for p in teacher.parameters()),
        "teacher_training": teacher.training,
        "teacher_changed": [k for k, v in teacher.state_dict().items()
                            if torch.is_tensor(v) and not torch.equal(v, before[k])],
    }


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_teacher_is_frozen_through_a_student_step(tp, pp):
    for rank, r in enumerate(run_distributed(_teacher_after_student_step, 2, tp=tp, pp=pp)):
        assert r["updated"] and r["grad_norm"] > 0, f"rank {rank}: the student did not step: {r}"
        assert not r["teacher_requires_grad"] and not r["teacher_grads"], f"rank {rank}: {r}"
        assert not r["teacher_in_optimizer"] and not r["teacher_training"], f"rank {rank}: {r}"
        assert r["teacher_changed"] == [], f"rank {rank}: teacher weights changed: {r['teacher_changed']}"
