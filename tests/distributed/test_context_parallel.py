"""Context parallelism (distributed/context_parallel.py, SDPAttention's all-gather of K / V): the sequence
split over CP ranks computes what the whole sequence on one rank computes.

The trainer-level check (every algorithm's two GNDPO steps at CP=2 equal the single process) is in
test_algorithms.py's layout matrix; the rollout's (CP off while decoding) in test_continuous_batching.py.
"""

import inspect

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.models.student import build_student, unwrap
from megatron_gndpo.models.weights import gather_global_weights, load_global_weights
from megatron_gndpo.trainer.megatron_glue import LogitsReadout, forward_logprobs, run_schedule
from tests import common
from tests.distributed.test_parallel_models import _ce_loss
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

# (tp, pp, cp) on 4 ranks, DP the rest; the sequence (16) is a multiple of 2 x CP for each
LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2), (1, 1, 4)]
GLOBAL_BATCH, SEQ, MICRO = 8, 16, 2


def _split_and_gather(groups):
    """megatron-core's own split of a batch for this CP rank; the project's split, gather and the gather's
    gradient, at CP 2 and 4."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_gndpo.distributed.context_parallel import gather_sequence, local_view

    out = {}
    for cp in (2, 4):
        groups = relayout(1, cp=cp)
        x = torch.arange(3 * SEQ, dtype=torch.float64).reshape(3, SEQ)
        ours = local_view({"tokens": x, "row": torch.arange(3)}, groups.cp)
        # megatron-core 0.19 dispatches on packing (cu_seqlens) and hybrid CP; 0.16 takes the batch alone
        newer = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
        theirs = get_batch_on_this_cp_rank({"tokens": x.clone(), "cu_seqlens": None}, is_hybrid_cp=False,
                                           cp_group=groups.cp) if newer else \
            get_batch_on_this_cp_rank({"tokens": x.clone()}, cp_group=groups.cp)
        local = ours["tokens"].clone().requires_grad_(True)
        whole = gather_sequence(local, groups.cp)
        weights = torch.arange(whole.numel(), dtype=torch.float64).reshape(whole.shape)
        (whole * weights).sum().backward()
        out[cp] = {"split_equal": torch.equal(ours["tokens"], theirs["tokens"]), "row": ours["row"],
                   "gathered": whole.detach(), "x": x, "grad": local.grad, "weights": local_view({"w": weights},
                                                                                               groups.cp)["w"]}
    return out


def test_split_is_megatrons_and_gather_inverts_it():
    for rank, per_cp in enumerate(run_distributed(_split_and_gather, 4)):
        for cp, o in per_cp.items():
            where = f"rank {rank}, CP {cp}"
            assert o["split_equal"], where  # the chunks megatron's rotary embedding and TE expect
            assert torch.equal(o["row"], torch.arange(3)), where  # per-row tensors are not split
            assert torch.equal(o["gathered"], o["x"]), where
            # every CP rank computes the same thing from the gathered tensor: its gradient is its positions' own
            assert torch.equal(o["grad"], o["weights"]), where


def _microbatches(groups, data):
    per_dp = GLOBAL_BATCH // groups.dp_size
    mine = data[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp].to(groups.device)
    mbs = []
    for i in range(0, per_dp, MICRO):
        mb = common.microbatch(mine[i:i + MICRO, :-1])
        mb["labels"] = mine[i:i + MICRO, 1:]
        mb["row_ids"] = torch.arange(i, i + MICRO, device=groups.device)
        mbs.append(mb)
    return mbs


def _per_layout(groups, layouts=LAYOUTS, precision=common.FP32):
    """Per layout: the global loss and gradients of one backward, and the fused-LM-head scoring path's
    log-probs of every row (gathered over DP), from the same weights."""
    cfg = common.model_config()
    data = common.tokens(GLOBAL_BATCH, SEQ + 1, seed=3)
    out, weights = {}, None
    for tp, pp, cp in layouts:
        groups = relayout(tp, pp, cp=cp)
        model = build_student(cfg, common.parallel(tp, pp, cp), precision,
                              pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        if weights is None:
            weights = gather_global_weights(unwrap(model))
        else:
            load_global_weights(unwrap(model), weights)
        mbs = _microbatches(groups, data)
        readout = LogitsReadout(groups.tp, 1.0, cfg.vocab_size)
        scored = forward_logprobs(unwrap(model), mbs, readout, "lp")
        model.zero_grad_buffer()
        metrics = run_schedule(model, mbs, loss=_ce_loss(GLOBAL_BATCH * SEQ), forward_only=False)
        loss = torch.stack([m["ce_sum"] for m in metrics]).sum() if metrics else torch.zeros(())
        lp = scored.get("lp", torch.zeros(GLOBAL_BATCH // groups.dp_size, SEQ, device=groups.device))
        if groups.is_last_stage:
            dist.all_reduce(loss, group=groups.dp)
        last = dist.get_global_rank(groups.pp, groups.pp_size - 1)
        dist.broadcast(loss, src=last, group=groups.pp)
        dist.broadcast(lp, src=last, group=groups.pp)
        parts = [torch.empty_like(lp) for _ in range(groups.dp_size)]
        dist.all_gather(parts, lp, group=groups.dp)
        for p in unwrap(model).parameters():
            p.data.copy_(p.main_grad)
        out[(tp, pp, cp)] = (loss.item() / (GLOBAL_BATCH * SEQ), torch.cat(parts).cpu(),
                             {k: v.cpu() for k, v in gather_global_weights(unwrap(model)).items()})
    return out


def test_context_parallel_layouts_match_one_rank():
    """Losses, scoring log-probs and gradients of CP 2 and 4, alone and with TP 2 or PP 2, equal one rank's
    (float32: the attention sums the same keys in another order)."""
    results = run_distributed(_per_layout, 4, timeout_s=240)
    ref_loss, ref_lp, ref_grads = results[0][(1, 1, 1)]
    assert ref_loss > 0 and ref_lp.shape == (GLOBAL_BATCH, SEQ) and (ref_lp < 0).all()
    for rank, per_layout in enumerate(results):
        for layout, (loss, lp, grads) in per_layout.items():
            where = f"rank {rank} layout (tp, pp, cp)={layout}"
            assert abs(loss - ref_loss) < 1e-5, f"{where}: loss {loss} vs {ref_loss}"
            torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5, msg=lambda m: f"{where} log-probs: {m}")
            for key in ref_grads:
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{where} grad {key}: {m}")
