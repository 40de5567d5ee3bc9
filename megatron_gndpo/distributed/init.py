"""Process start-up from torchrun's environment (or a lone process) and the process groups.

``init_parallel`` is the only place that sets up megatron's ``parallel_state`` (and, with
``layout_groups``, the only places that read it); everything downstream receives the
:class:`ProcessGroups` they return.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Any, Optional

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
    """Data-parallel group: the replicas, which hold different rows; global GNDPO statistics and metrics
    reduce over it (megatron's DDP reduces the gradients over data x context parallelism itself)."""
    cp: ProcessGroup
    """Context-parallel group: ranks that hold the same rows, each a share of every micro-batch's sequence
    inside the model (``distributed/context_parallel.py``)."""
    mp: ProcessGroup
    """Model-parallel (TP x PP) group: grad-norm reduction."""
    device: torch.device
    """Where this rank's tensors live: its GPU under NCCL, the CPU under gloo. Decided once, here, from
    the backend the groups talk over, so that every tensor a step builds or all-reduces is on the
    device its collectives need (NCCL cannot reduce CPU tensors; gloo cannot reduce CUDA ones)."""
    megatron: Optional[Any] = None
    """These groups as megatron-core's models and schedules take them (a ``ProcessGroupCollection``,
    their ``pg_collection``) when they are not megatron's global ``parallel_state`` ones: a second
    layout of the world (:func:`layout_groups`, the teacher's ``teacher.parallel``). None: the groups
    :func:`init_parallel` gave ``parallel_state``, which megatron-core reads by default."""

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
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp)

    @property
    def writes_rows(self) -> bool:
        """Whether this rank writes its replica's rows (dumps): of the ranks that hold the same rows and
        outputs (TP and CP ranks of the last stage), the first."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0

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


def free_port() -> int:
    """A local TCP port free now (another process may take it before it is bound)."""
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
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp})"
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
        context_parallel_size=cp,
    )
    seed_everything(seed, tensor_parallel)
    return ProcessGroups(
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        cp=parallel_state.get_context_parallel_group(),
        mp=parallel_state.get_model_parallel_group(),
        device=device,
    )


def layout_groups(parallel: ParallelConfig, device: torch.device) -> ProcessGroups:
    """Collective over the world (after :func:`init_parallel`): the groups of a second TP x PP layout of the
    same world, for a model that runs beside the student on its own layout (the teacher). Megatron's
    default rank order (TP fastest, then DP, then PP: ``rank = tp_rank + TP (dp_rank + DP pp_rank)``),
    built with megatron-core's ``HyperCommGrid`` without touching ``parallel_state``, whose groups stay
    the student's. ``.megatron`` holds them as the ``ProcessGroupCollection`` that the model's modules and
    the pipeline schedule are given.

    Context parallelism is 1 (``RunConfig`` refuses a teacher layout with CP): the CP group, which megatron's rotary
    embedding and schedules read the size of, is ``parallel_state``'s, the group of this rank alone, the
    same for every layout. ``embd`` joins the first and last stage of each pipeline (tied embeddings are
    made equal over it at construction); ``pos_embd`` is None (RoPE has no position embedding)."""
    from megatron.core import parallel_state
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by teacher.parallel.tensor_model_parallel_size ({tp}) "
                         f"x teacher.parallel.pipeline_model_parallel_size ({pp})")
    cp = parallel_state.get_context_parallel_group()
    if cp.size() != 1:
        raise ValueError(f"teacher.parallel needs context parallelism 1, got {cp.size()}")
    grid = HyperCommGrid([tp, world // (tp * pp), pp], ["tp", "dp", "pp"])
    groups = {name: grid.create_pg(name) for name in ("tp", "dp", "pp")}
    groups["mp"] = grid.create_pg(["tp", "pp"])
    # every rank makes every new_group call; the first and last rank of each pipeline share the embedding
    ends = [[ranks[0], ranks[-1]] for ranks in grid.get_rank_enum("pp")] if pp > 1 else None
    embd = dist.new_subgroups_by_enumeration(ends)[0] if ends else None
    # with CP 1, DP x CP is DP and TP x CP is TP
    collection = ProcessGroupCollection(tp=groups["tp"], pp=groups["pp"], mp=groups["mp"], dp=groups["dp"],
                                        dp_cp=groups["dp"], cp=cp, tp_cp=groups["tp"], embd=embd, pos_embd=None)
    return ProcessGroups(tp=groups["tp"], pp=groups["pp"], dp=groups["dp"], cp=cp, mp=groups["mp"],
                         device=device, megatron=collection)


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
