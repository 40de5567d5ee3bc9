"""The algorithm's config contract, checked when the config loads (every rank, before any compute)."""

import pytest

from megatron_gndpo.config.loader import load_config

ESTIMATORS = ("gndpo", "opd", "grpo", "vopd", "gopd", "uniopd")


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_loads_with_its_defaults(name):
    assert load_config(None, [f"algorithm.estimator={name}"]).algorithm.estimator_kwargs == {}


def test_estimator_kwargs_are_typed_after_the_estimators_defaults():
    cfg = load_config(None, ["algorithm.estimator=gopd", "algorithm.estimator_kwargs={lam: 1}"])
    assert cfg.algorithm.estimator_kwargs == {"lam": 1.0} and type(cfg.algorithm.estimator_kwargs["lam"]) is float
    # YAML 1.1 reads 1.0e9 (no exponent sign) as a string
    cfg = load_config(None, ["algorithm.estimator_kwargs={score_clip: 1.0e9}"])
    assert cfg.algorithm.estimator_kwargs == {"score_clip": 1.0e9}
    cfg = load_config(None, ["algorithm.estimator=uniopd", "algorithm.estimator_kwargs={scope: group}"])
    assert cfg.algorithm.estimator_kwargs == {"scope": "group"}


@pytest.mark.parametrize("overrides,message", [
    (["algorithm.estimator_kwargs={scor_clip: 3}"],
     "algorithm.estimator_kwargs.scor_clip: estimator 'gndpo' takes no 'scor_clip'; its options (with defaults): "
     "score_clip=5.0, eps=1e-08"),
    (["algorithm.estimator=grpo", "algorithm.estimator_kwargs={score_clip: 5}"],
     "estimator 'grpo' takes no 'score_clip'; its options (with defaults): eps=1e-06"),
    (["algorithm.estimator_kwargs={group: null}"], "estimator 'gndpo' takes no 'group'"),
    (["algorithm.estimator_kwargs={score_clip: high}"],
     "algorithm.estimator_kwargs.score_clip (estimator 'gndpo') must be float, got 'high'"),
    (["algorithm.estimator=uniopd", "algorithm.estimator_kwargs={scope: 1}"], "must be str, got 1"),
    (["algorithm.estimator=ppo"], "unknown advantage estimator 'ppo'; known: gndpo, gopd, grpo, opd, uniopd, vopd"),
    (["algorithm.policy_loss=grpo"], "unknown policy loss 'grpo'; known: gspo, ppo"),
    (["algorithm.estimator=grpo", "algorithm.outcome_weight=0.5"], "algorithm.estimator='grpo' is that advantage"),
    (["algorithm.outcome_weight=-1"], "algorithm.outcome_weight must be >= 0"),
    (["algorithm.reference_checkpoint=/x"], "algorithm.reference_checkpoint is gopd's reference policy"),
    (["algorithm.divergence.kind=kl"], "config key algorithm.divergence.kind must be one of"),
    (["algorithm.divergence.kind=k3", "algorithm.divergence.top_k=8"], "is taken on the sampled token only"),
    (["algorithm.divergence.kind=rkl", "algorithm.divergence.beta=0.3"], "applies to kind='jsd' only"),
    (["algorithm.divergence.kind=jsd", "algorithm.divergence.beta=1.5"], "beta must be in [0, 1]"),
    (["algorithm.divergence.top_k=0"], "top_k must be >= 1"),
    (["teacher.temperature=0"], "teacher.temperature must be > 0"),
])
def test_misspelt_and_impossible_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


PP2 = ["parallel.pipeline_model_parallel_size=2", "model.num_hidden_layers=2", "teacher.model.num_hidden_layers=2"]


@pytest.mark.parametrize("overrides,message", [
    (["algorithm.divergence.kind=rkl", *PP2], "needs parallel.pipeline_model_parallel_size=1 (got 2)"),
    (["algorithm.estimator=vopd", *PP2], "algorithm.estimator='vopd' (its per-token KL) over the full vocabulary"),
    (["algorithm.divergence.kind=fkl", "teacher.offload=true"], "teacher.offload would copy its weights"),
    (["algorithm.divergence.kind=jsd", "model.vocab_size=1000", "teacher.model.vocab_size=1200"],
     "split differently at TP=1; set algorithm.divergence.top_k"),
])
def test_full_vocabulary_comparisons_need_one_stage_and_alike_shards(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    # the teacher's top-k ids are global and kept on the last stage: every one of these layouts runs
    load_config(None, [*overrides, "algorithm.divergence.top_k=16"])


def test_sampled_token_divergences_and_top_k_need_nothing_more():
    for kind in ("k1", "k2", "k3"):
        load_config(None, [f"algorithm.divergence.kind={kind}", *PP2])
