"""Process start-up from torchrun's environment (or a lone process) and the process groups.

``init_parallel`` is the only place that touches megatron's ``parallel_state``; everything
downstream receives the :class:`ProcessGroups` it returns.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.config.schema import ParallelConfig


@dataclass(frozen=True)
class ProcessGroups:
    """The groups a step talks over. For one process all sizes are 1."""

    tp: ProcessGroup
    """Tensor-parallel group: vocab-parallel max/sum all-reduces."""
    pp: ProcessGroup
    """Pipeline group: p2p activations between stages."""
    dp: ProcessGroup
    """Data-parallel group: gradient all-reduce, global GNDPO statistics, metric reduction."""
    dp_cp: ProcessGroup
    """Data x context parallel: the group over which the global token statistics are all-reduced."""
    mp: ProcessGroup
    """Model-parallel (TP x PP) group: grad-norm reduction."""
    device: torch.device
    """Where this rank's tensors live: its GPU under NCCL, the CPU under gloo. Decided once, here, from
    the backend the groups talk over, so that every tensor a step builds or all-reduces is on the
    device its collectives need (NCCL cannot reduce CPU tensors; gloo cannot reduce CUDA ones)."""

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> ProcessGroups:
    """Join (or create) the default process group and build megatron's model-parallel groups.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them; without
    them this is a world of one on a free local port. nccl on CUDA, gloo otherwise (with the CPU
    patches of :mod:`megatron_gndpo.distributed.cpu_backend`).
    """
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        from megatron_gndpo.distributed import cpu_backend

        cpu_backend.apply()
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp})"
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if parallel.use_distributed_optimizer and not use_cuda:
        raise ValueError("parallel.use_distributed_optimizer needs CUDA (megatron's ZeRO buffers are CUDA-only)")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    seed_everything(seed, tensor_parallel)
    return ProcessGroups(
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        dp_cp=parallel_state.get_data_parallel_group(with_context_parallel=True),
        mp=parallel_state.get_model_parallel_group(),
        device=device,
    )


def seed_everything(seed: int, tensor_parallel=None) -> None:
    """Same seed on every rank: weight init on the CPU is then identical for every layout, and
    megatron's tracker derives the per-TP-rank dropout streams from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if tensor_parallel is None:
        from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tear megatron's groups down (and the default group unless told otherwise)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def is_rank0(group: Optional[ProcessGroup] = None) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0
