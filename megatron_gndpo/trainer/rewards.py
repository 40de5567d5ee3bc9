"""Outcome rewards of a batch of responses: decoded, then scored by the run's reward function against
each row's ground truth."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

REWARD_KEYS = ("reward", "acc", "format")


def reward_responses(tokenizer, reward_fn, responses: Sequence[Sequence[int]], truths: Sequence[str],
                     device: torch.device) -> Dict[str, torch.Tensor]:
    """``{"reward", "acc", "format"}``, each ``[B]`` float32 on ``device``."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scored = [reward_fn(text, truth) for text, truth in zip(texts, truths)]
    return {k: torch.tensor([s[k] for s in scored], dtype=torch.float32, device=device) for k in REWARD_KEYS}
