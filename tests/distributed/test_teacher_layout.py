"""The teacher on its own TP x PP layout (teacher.parallel): its log-probs and top-k cache, sent back to the
student's data-parallel rows, equal a teacher on the student's layout, and a whole GNDPO step is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import common
from tests.harness import run_distributed
from tests.trainer_setup import make_initial_checkpoints, run_config

pytestmark = pytest.mark.distributed

TOP_K = 3
# teacher (tp, pp, packed student micro-batches) on 4 ranks whose student is TP1 x DP4: DP_t = 1, 2, 1
LAYOUTS = [(2, 2, False), (2, 1, True), (4, 1, False)]


def _student_rows(rank: int) -> dict:
    """This student DP rank's rows: a different count and width per rank, responses after 3 prompt tokens."""
    rows, width = 2 + rank % 2, 7 + 2 * rank
    toks = common.tokens(rows, width + 1, seed=10 + rank)
    lengths = torch.tensor([width - r for r in range(rows)])
    t = torch.arange(width)[None, :]
    return {"tokens": toks[:, :-1], "labels": toks[:, 1:], "position_ids": t.expand(rows, width).contiguous(),
            "mask": (t >= 2) & (t < lengths[:, None])}


def _scores_per_layout(groups):
    """Harness function: each layout's scores of this rank's rows, and a whole teacher's on the rank."""
    import torch.distributed as dist

    from megatron_gndpo.config.schema import TeacherConfig
    from megatron_gndpo.distributed.init import layout_groups
    from megatron_gndpo.models.teacher import Teacher, TeacherOnOwnLayout
    from megatron_gndpo.models.weights import gather_global_weights, load_global_weights
    from megatron_gndpo.trainer.batches import form_microbatches
    from megatron_gndpo.trainer.megatron_glue import LogitsReadout

    tcfg = TeacherConfig(model=common.model_config(**common.TEACHER), precision=common.FP32)

    def form(batch, pack=False):
        return form_microbatches(batch, mini_batches=1, micro_batch_size=2, max_tokens=None, pack=pack, multiple=1,
                                 pad_token_id=0)

    def teacher(par, g):
        return Teacher(tcfg, par, g, LogitsReadout(g.tp, 0.9, 1000), top_k=TOP_K)

    batch = _student_rows(dist.get_rank())
    same_layout = teacher(common.parallel(1), groups)  # the student's TP1 x DP4: one whole teacher per rank
    reference = same_layout.score(form(batch))
    weights = gather_global_weights(same_layout.model)
    out = {"reference": reference, "mask": batch["mask"]}
    for tp, pp, pack in LAYOUTS:
        own = layout_groups(common.parallel(tp, pp), groups.device)
        t = teacher(common.parallel(tp, pp), own)
        load_global_weights(t.model, weights)
        out[(tp, pp)] = TeacherOnOwnLayout(t, groups, form).score(form(batch, pack))
    try:
        layout_groups(common.parallel(3), groups.device)
    except ValueError as e:
        out["refused"] = str(e)
    return out


def _both(groups, tmp):
    """Harness function: the checkpoints, then both checks, in one 4-rank world (starting processes is most of
    these tests' time)."""
    make_initial_checkpoints(groups, tmp)
    return {"scores": _scores_per_layout(groups), "steps": _step_both_layouts(groups, tmp)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_both, 4, args=(str(tmp_path_factory.mktemp("teacher_layout")),), timeout_s=240)


def test_teacher_on_its_own_layout_scores_like_the_students_layout(results):
    """Teacher TP2 x PP2, TP2 x DP2 and TP4 on 4 ranks whose student is TP1 x DP4 (rows of different counts
    and widths per rank, packed student micro-batches once): each rank gets back its rows' log-probs, top-k
    ids and top-k log-probs, equal to a whole teacher on the rank itself (float32). A teacher TP that does not
    divide the world is refused on every rank, naming the key."""
    for rank, out in enumerate(r["scores"] for r in results):
        assert out["refused"] == ("world size 4 is not divisible by teacher.parallel.tensor_model_parallel_size (3) x "
                                  "teacher.parallel.pipeline_model_parallel_size (1)")
        ref, mask = out["reference"], out["mask"]
        assert ref["teacher_logprobs"].shape == mask.shape
        for tp, pp, _ in LAYOUTS:
            got = out[(tp, pp)]
            assert got.keys() == ref.keys()
            for key, want in ref.items():
                assert got[key].shape == want.shape, (rank, tp, pp, key)
                if key == "teacher_top_ids":
                    assert torch.equal(got[key][mask], want[mask]), (rank, tp, pp)
                else:
                    torch.testing.assert_close(got[key][mask], want[mask], rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"rank {rank} teacher TP{tp} x PP{pp} {key}: {m}")


COMPARED = ("actor/policy_loss", "actor/grad_norm", "score/mean", "score/std", "adv/max", "reward",
            "estimator/valid_tokens")


def _step_both_layouts(groups, tmp):
    """Harness function: one trainer step with the teacher on the student's layout, then on TP2 x PP2."""
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.models.weights import gather_global_weights
    from megatron_gndpo.trainer.trainer import Trainer

    tmp, out = Path(tmp), {}
    for name, layout in (("same", []), ("own", ["teacher.parallel.tensor_model_parallel_size=2",
                                                "teacher.parallel.pipeline_model_parallel_size=2"])):
        overrides = ["trainer.micro_batch_size=2", "trainer.mini_batches=1", f"trainer.output_dir={tmp}/run_{name}"]
        cfg = run_config(tmp, [*overrides, *layout],
                         student_checkpoint=str(tmp / "student"), teacher={"checkpoint": str(tmp / "teacher")})
        destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
        trainer = Trainer(cfg)
        metrics = trainer.train_step()
        out[name] = (metrics if trainer.is_logging_rank else None, gather_global_weights(trainer.student.module))
        trainer.close(destroy_process_group=False)
    return out


def test_gndpo_step_with_the_teacher_on_its_own_layout(results):
    """One GNDPO step on 4 ranks (student TP1 x DP4), the teacher loaded from its checkpoint on the student's
    layout, then on TP2 x PP2: the same losses, statistics and updated weights."""
    out = [r["steps"] for r in results]
    same, own = (next(o[k][0] for o in out if o[k][0] is not None) for k in ("same", "own"))
    for key in COMPARED:
        assert own[key] == pytest.approx(same[key], rel=1e-5, abs=1e-6), key
    assert same["actor/grad_norm"] > 0
    for key, w in out[0]["same"][1].items():
        torch.testing.assert_close(out[0]["own"][1][key], w, rtol=0, atol=2e-5, msg=key)
