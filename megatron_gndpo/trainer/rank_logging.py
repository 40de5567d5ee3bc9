"""Log lines from one rank: what every rank knows alike (a resumed step, a skipped optimizer step) is
said once, by rank 0, and what lives on the last pipeline stage (losses, the teacher's quantisation
error) by the last rank, not N times."""

from __future__ import annotations

import logging

import torch.distributed as dist


class OneRankLogger(logging.LoggerAdapter):
    """``logger``, enabled on global rank ``rank`` only (-1: the last rank; any rank without a process
    group)."""

    def __init__(self, logger: logging.Logger, rank: int = 0):
        super().__init__(logger, {})
        self.rank = rank

    def isEnabledFor(self, level: int) -> bool:
        if dist.is_initialized() and dist.get_rank() != self.rank % dist.get_world_size():
            return False
        return self.logger.isEnabledFor(level)


def rank0_logger(name: str) -> OneRankLogger:
    return OneRankLogger(logging.getLogger(name))


def last_rank_logger(name: str) -> OneRankLogger:
    return OneRankLogger(logging.getLogger(name), rank=-1)
