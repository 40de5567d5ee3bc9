"""Every algorithm the config offers trains end to end at every layout: each estimator with its defaults,
KDRL's outcome mix, each divergence kind (teacher top-k and full vocabulary), teacher.temperature and
gopd's reference policy. Two steps at (TP, PP, DP) = (2,1,1), (1,2,1), (1,1,2) give the losses and
weights of the single-process run; the divergences and vopd's KL inside a TP=2 step equal a float64
reference on both models' gathered logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed
from tests.trainer_setup import make_initial_checkpoints, run_config

pytestmark = pytest.mark.distributed


def _parity(response: str, ground_truth: str):
    """A reward a random tiny student earns about half the time (its first character an even digit), so
    that GRPO's and KDRL's outcome advantages are not all zero."""
    hit = float(response[:1] in "02468" and response[:1] != "")
    return {"reward": hit, "acc": hit, "format": 1.0}


def _register_parity():
    from megatron_gndpo.rewards import REWARDS

    if "test_parity" not in REWARDS:  # this module is imported again in every spawned rank
        REWARDS.register("test_parity")(_parity)


_register_parity()

ESTIMATORS = {
    "gndpo": [],
    "opd": ["algorithm.estimator=opd"],
    "grpo": ["algorithm.estimator=grpo"],
    "vopd_topk": ["algorithm.estimator=vopd", "algorithm.divergence.top_k=4"],
    "vopd_full": ["algorithm.estimator=vopd"],
    "gopd": ["algorithm.estimator=gopd", "algorithm.estimator_kwargs={lam: 1.25}"],
    "uniopd": ["algorithm.estimator=uniopd"],
    "kdrl": ["algorithm.outcome_weight=0.5"],
}
DIVERGENCES = {
    "rkl_full": ["algorithm.divergence.kind=rkl", "algorithm.divergence.weight=0.5"],
    "rkl_topk": ["algorithm.divergence.kind=rkl", "algorithm.divergence.top_k=4"],
    "fkl_full": ["algorithm.divergence.kind=fkl"],
    "fkl_topk": ["algorithm.divergence.kind=fkl", "algorithm.divergence.top_k=4"],
    "jsd_full": ["algorithm.divergence.kind=jsd", "algorithm.divergence.beta=0.3"],
    "jsd_topk": ["algorithm.divergence.kind=jsd", "algorithm.divergence.top_k=4"],
    "k1": ["algorithm.divergence.kind=k1"],
    "k2": ["algorithm.divergence.kind=k2"],
    "k3": ["algorithm.divergence.kind=k3"],
    "teacher_temperature": ["teacher.temperature=0.7", "algorithm.divergence.kind=rkl",
                            "algorithm.estimator=opd"],
}
CONFIGS = {**ESTIMATORS, **DIVERGENCES}
# full-vocabulary comparisons recompute the teacher's logits in the student's micro-batch: one stage only
NEEDS_ONE_STAGE = {"vopd_full", "rkl_full", "fkl_full", "jsd_full", "teacher_temperature"}
COMPARED = ("actor/policy_loss", "actor/grad_norm", "actor/divergence", "score/mean", "score/std", "adv/max",
            "adv/min", "reward", "estimator/reward_mean")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("algorithms")
    run_distributed(make_initial_checkpoints, 1, args=(str(tmp),))
    return tmp


def _config(tmp, name, tp, pp, extra=(), cp=1):
    return run_config(Path(tmp), CONFIGS[name] + [f"parallel.tensor_model_parallel_size={tp}",
                                                  f"parallel.pipeline_model_parallel_size={pp}",
                                                  f"parallel.context_parallel_size={cp}",
                                                  f"trainer.output_dir={tmp}/{name}_{tp}{pp}{cp}",
                                                  "data.reward=test_parity", *extra],
                      student_checkpoint=f"{tmp}/student", teacher={"checkpoint": f"{tmp}/teacher"})


def _trainer(cfg):
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
    return Trainer(cfg)


def _train(groups, tmp, names, tp, pp, cp=1):
    """Two steps of each config: the logging rank's metrics and the global weights."""
    from megatron_gndpo.models.weights import gather_global_weights

    out = {}
    for name in names:
        trainer = _trainer(_config(tmp, name, tp, pp, cp=cp))
        metrics = [trainer.train_step() for _ in range(2)]
        out[name] = {"metrics": metrics if trainer.is_logging_rank else None,
                     "weights": gather_global_weights(trainer.student.module)}
        trainer.close(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def single_process(workdir):
    return run_distributed(_train, 1, args=(str(workdir), list(CONFIGS), 1, 1))[0]


@pytest.mark.parametrize("group,tp,pp,dp,cp", [(group, *layout) for group in ("estimators", "divergences")
                                                for layout in ((2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2))]
                         + [("estimators", 1, 2, 1, 2)])  # context parallelism on a pipeline: 4 ranks
def test_every_algorithm_trains_alike_at_every_layout(workdir, single_process, tp, pp, dp, cp, group):
    """Losses and statistics to rel 1e-4, weights to 1e-4 = a tenth of one Adam step of lr 1e-3 (float32:
    Adam divides each gradient by its own magnitude, so an element whose gradient is rounding noise can
    move by ~2e-5 between layouts; a wrong term moves whole tensors by ~lr)."""
    names = [n for n in (ESTIMATORS if group == "estimators" else DIVERGENCES) if pp == 1 or n not in NEEDS_ONE_STAGE]
    out = run_distributed(_train, tp * pp * dp * cp, tp=tp, pp=pp, args=(str(workdir), names, tp, pp, cp))
    for name in names:
        ref = single_process[name]
        got = next(o[name]["metrics"] for o in out if o[name]["metrics"] is not None)
        for step, (r, g) in enumerate(zip(ref["metrics"], got)):
            assert math.isfinite(g["actor/policy_loss"]) and g["actor/grad_norm"] > 0, (name, step)
            for key in COMPARED:
                assert (key in g) == (key in r), (name, key)
                if key in r:
                    assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (name, step, key)
        for key, w in ref["weights"].items():
            torch.testing.assert_close(out[0][name]["weights"][key], w, rtol=0, atol=1e-4,
                                       msg=lambda m, name=name, key=key: f"{name}: {key}\n{m}")


def test_each_algorithm_changes_what_it_should(single_process):
    """The terms are live: a divergence adds ``actor/divergence`` (non-negative for the KLs), KDRL logs the
    rewards it mixes in, and every variant trains other weights than plain GNDPO."""
    for name in DIVERGENCES:
        m = single_process[name]["metrics"][0]
        assert "actor/divergence" in m, name
        if not name.startswith("k1"):
            assert m["actor/divergence"] >= 0, name
    assert "estimator/reward_mean" in single_process["kdrl"]["metrics"][0]
    base = single_process["gndpo"]["weights"]
    for name, r in single_process.items():
        if name != "gndpo":
            assert any(not torch.equal(w, base[k]) for k, w in r["weights"].items()), name


def _gopd_vs_opd(groups, tmp):
    out = {}
    for name, overrides in (("gopd", ["algorithm.estimator=gopd"]),
                            ("opd", ["algorithm.estimator=opd", "algorithm.estimator_kwargs={score_clip: 1.0e9}"])):
        cfg = run_config(Path(tmp), overrides + [f"trainer.output_dir={tmp}/lam1_{name}"],
                         student_checkpoint=f"{tmp}/student", teacher={"checkpoint": f"{tmp}/teacher"})
        trainer = _trainer(cfg)
        out[name] = [trainer.train_step() for _ in range(2)]
        trainer.close(destroy_process_group=False)
    return out


def test_gopd_with_lam_1_is_unclipped_opd(workdir):
    """A = lam (lp_T - lp_ref) - (lp_old - lp_ref) is lp_T - lp_old at lam = 1, whatever the reference."""
    out = run_distributed(_gopd_vs_opd, 1, args=(str(workdir),))[0]
    for g, o in zip(out["gopd"], out["opd"]):
        for key in ("actor/policy_loss", "actor/grad_norm", "adv/max", "adv/min", "reward"):
            assert g[key] == pytest.approx(o[key], rel=1e-5, abs=1e-6), key


def _reference_policy(groups, tmp):
    """gopd's reference: the given checkpoint (here the student after one step), else the student's
    initial weights, also when they are a random initialisation."""
    from megatron_gndpo.models.weights import gather_global_weights

    tmp = Path(tmp)
    first = _trainer(run_config(tmp, ["algorithm.estimator=opd", f"trainer.output_dir={tmp}/ref_src"],
                                student_checkpoint=f"{tmp}/student", teacher={"checkpoint": f"{tmp}/teacher"}))
    first.train_step()
    saved = first.save()
    trained = gather_global_weights(first.student.module)
    first.close(destroy_process_group=False)
    out = {"trained": trained}
    for name, sections in (("given", dict(student_checkpoint=f"{tmp}/student",
                                          teacher={"checkpoint": f"{tmp}/teacher"})),
                           ("random_init", dict(teacher={"checkpoint": f"{tmp}/teacher"}))):
        extra = [f"algorithm.reference_checkpoint={saved}"] if name == "given" else []
        trainer = _trainer(run_config(tmp, ["algorithm.estimator=gopd", f"trainer.output_dir={tmp}/ref_{name}",
                                            *extra], **sections))
        out[name] = {"reference": gather_global_weights(trainer.reference.model),
                     "student": gather_global_weights(trainer.student.module)}
        trainer.train_step()
        out[name]["reference_after"] = gather_global_weights(trainer.reference.model)
        trainer.close(destroy_process_group=False)
    return out


def test_gopd_reference_is_the_given_checkpoint_or_the_initial_student(workdir):
    out = run_distributed(_reference_policy, 1, args=(str(workdir),))[0]
    given, init = out["given"], out["random_init"]
    for key in given["student"]:
        torch.testing.assert_close(given["reference"][key], out["trained"][key], rtol=0, atol=0)
        torch.testing.assert_close(init["reference"][key], init["student"][key], rtol=0, atol=0)
        # frozen: a training step moves the student, never the reference
        torch.testing.assert_close(init["reference_after"][key], init["reference"][key], rtol=0, atol=0)
    assert any(not torch.equal(given["reference"][k], given["student"][k]) for k in given["student"])


def _gathered(t, group):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, -1)


def _comparisons(groups, tmp):
    """Inside a TP=2 trainer: vopd's token KL and every distribution divergence from the comparison the
    step uses, next to a float64 reference on the gathered logits of both models."""
    from megatron_gndpo.trainer.batches import sequences_from_prompts, split_rows
    from megatron_gndpo.trainer.megatron_glue import model_forward

    tmp = Path(tmp)
    out = {}
    for top_k in (None, 4):
        extra = ["teacher.temperature=0.7", "rollout.temperature=1.3", f"trainer.output_dir={tmp}/compare_{top_k}"]
        extra += [f"algorithm.divergence.top_k={top_k}"] if top_k else []
        trainer = _trainer(_config(tmp, "vopd_full", 2, 1, extra))
        g = trainer.groups
        ids = torch.randint(0, 15, (4, 9), generator=torch.Generator().manual_seed(0))
        mb = split_rows(sequences_from_prompts(ids.tolist(), 0, g.device), 4)[0]
        mb.update({k: v for k, v in trainer.teacher.score([mb]).items()})
        with torch.no_grad():
            student = model_forward(trainer.student.module, mb)
            got = {kind: trainer.loss.comparison.divergence(student, mb, kind, 0.3) for kind in ("rkl", "fkl", "jsd")}
            got["token_kl"] = trainer.scoring_extras[0](student, mb)["token_kl"]
            teacher = model_forward(trainer.teacher.model, mb)
        vocab = trainer.shared_vocab_size
        out[top_k] = {"got": got, "student": _gathered(student, g.tp)[..., :vocab].double(),
                      "teacher": _gathered(teacher, g.tp)[..., :vocab].double()}
        trainer.close(destroy_process_group=False)
    return out


def _reference_divergences(student, teacher, top_k, beta=0.3, t_student=1.3, t_teacher=0.7):
    """float64: log-softmaxes at each model's temperature, then the K + 1 buckets when top_k."""
    ls, lt = torch.log_softmax(student / t_student, -1), torch.log_softmax(teacher / t_teacher, -1)
    if top_k:
        ids = teacher.topk(top_k, -1).indices

        def buckets(lp):
            top = lp.gather(-1, ids)
            rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))
            return torch.cat([top, rest.clamp_min(math.log(1e-6))], -1)

        ls, lt = buckets(ls), buckets(lt)
    ps, pt = ls.exp(), lt.exp()
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
    return {"rkl": (ps * (ls - lt)).sum(-1), "fkl": (pt * (lt - ls)).sum(-1),
            "jsd": (beta * pt * (lt - lm) + (1 - beta) * ps * (ls - lm)).sum(-1)}


def test_divergences_and_vopd_kl_equal_float64_on_gathered_logits(workdir):
    out = run_distributed(_comparisons, 2, tp=2, args=(str(workdir),))
    for top_k, r in out[0].items():
        ref = _reference_divergences(r["student"], r["teacher"], top_k)
        for kind in ("rkl", "fkl", "jsd"):
            torch.testing.assert_close(r["got"][kind].double(), ref[kind], rtol=1e-4, atol=1e-5, msg=f"{kind} {top_k}")
        torch.testing.assert_close(r["got"]["token_kl"].double(), ref["rkl"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1][top_k]["got"]["rkl"], r["got"]["rkl"])  # alike on both TP ranks
