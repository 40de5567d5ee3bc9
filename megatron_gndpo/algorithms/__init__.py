"""Advantage estimators, policy losses and divergences, chosen by name from the config."""

from megatron_gndpo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    call_estimator,
    check_estimator_kwargs,
    get_advantage_estimator,
)
from megatron_gndpo.algorithms.losses import DISTRIBUTION_DIVERGENCES, POLICY_LOSSES, SAMPLED_DIVERGENCES
from megatron_gndpo.config.schema import AlgorithmConfig


def check_algorithm(algorithm: AlgorithmConfig) -> None:
    """The estimator and the policy loss exist, and the estimator takes ``estimator_kwargs`` (typed here
    after its defaults)."""
    get_advantage_estimator(algorithm.estimator)
    POLICY_LOSSES.get(algorithm.policy_loss)
    algorithm.estimator_kwargs = check_estimator_kwargs(algorithm.estimator, algorithm.estimator_kwargs)


__all__ = ["ADVANTAGE_ESTIMATORS", "DISTRIBUTION_DIVERGENCES", "POLICY_LOSSES", "SAMPLED_DIVERGENCES",
           "call_estimator", "check_algorithm", "check_estimator_kwargs", "get_advantage_estimator"]
