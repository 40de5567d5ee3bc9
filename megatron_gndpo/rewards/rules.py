"""Rule rewards. Each returns ``reward`` (what the estimator sees), ``acc`` (answer correct, 0/1)
and ``format`` (the response has the expected shape, 0/1)."""

from __future__ import annotations

import re
from typing import Dict

from megatron_gndpo.algorithms.registry import Registry

REWARDS = Registry("reward")
RewardOut = Dict[str, float]


def get_reward(name: str):
    return REWARDS.get(name)


@REWARDS.register("exact_match")
def exact_match(response: str, ground_truth: str) -> RewardOut:
    """reward = acc = [strip(response) == strip(ground_truth)]; format = [response is non-empty]."""
    acc = float(response.strip() == ground_truth.strip())
    return {"reward": acc, "acc": acc, "format": float(bool(response.strip()))}


_GEO3K_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


@REWARDS.register("geo3k")
def geo3k(response: str, ground_truth: str) -> RewardOut:
    """Geometry3K (as the GNDPO reference scores it): reward = 0.9 acc + 0.1 format, with
    acc = grade_answer(boxed answer, ground truth) by mathruler's checker and
    format = [response matches ``<think>...</think> ... \\boxed{...}``]."""
    try:
        from mathruler.grader import extract_boxed_content, grade_answer
    except ImportError as e:
        raise ImportError("the geo3k reward needs mathruler: pip install 'megatron-gndpo[math]'") from e
    fmt = float(bool(_GEO3K_FORMAT.fullmatch(response.strip())))
    acc = float(grade_answer(extract_boxed_content(response), ground_truth))
    return {"reward": 0.9 * acc + 0.1 * fmt, "acc": acc, "format": fmt}
