"""Outcome rewards: a registry of ``fn(response_text, ground_truth) -> {"reward", "acc", "format"}``."""

from megatron_gndpo.rewards.rules import REWARDS, get_reward

__all__ = ["REWARDS", "get_reward"]
