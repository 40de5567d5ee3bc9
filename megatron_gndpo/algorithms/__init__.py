from megatron_gndpo.algorithms.advantages import ADVANTAGE_ESTIMATORS, call_estimator, get_advantage_estimator
from megatron_gndpo.algorithms.losses import DIVERGENCES, POLICY_LOSSES

__all__ = ["ADVANTAGE_ESTIMATORS", "DIVERGENCES", "POLICY_LOSSES", "call_estimator", "get_advantage_estimator"]
