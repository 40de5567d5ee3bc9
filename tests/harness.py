"""Run a function in N real gloo processes with a TP x PP layout and collect what each returns.

Children are spawned (not forked: megatron and gloo keep global state) with a free port and a
deadline, so a desynchronised collective fails the test instead of hanging CI. They are not daemonic:
megatron's checkpoint writer starts a multiprocessing Manager, which daemonic processes may not do;
the harness kills whatever is still alive when it returns.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, tp, pp, seed, args, results):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        from megatron_gndpo.config.schema import ParallelConfig
        from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

        groups = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                               seed=seed, timeout_s=120)
        out = fn(groups, *args)
        destroy_parallel()
        # bytes, not tensors: torch's queue shares tensor storage by file descriptor, which dies with the child
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test
        results.put((rank, False, traceback.format_exc()))


def relayout(tp: int, pp: int = 1, seed: int = 1234):
    """Inside a harness function: rebuild megatron's groups for another layout of the same world."""
    from megatron_gndpo.config.schema import ParallelConfig
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    destroy_parallel(destroy_process_group=False)
    return init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=seed)


@contextlib.contextmanager
def _children_see_gpus(gpus: bool, world_size: int):
    """Spawned children inherit the environment at start. Without ``gpus`` they see no CUDA device, so
    init_parallel picks gloo and the CPU path even on a GPU machine (with CUDA visible, N ranks would
    pick NCCL and ``set_device(rank)`` on a machine with fewer GPUs, and hang)."""
    if gpus and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"this test needs {world_size} GPUs; {torch.cuda.device_count()} visible")
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    args: Sequence[Any] = (),
    timeout_s: float = 150.0,
    gpus: bool = False,
) -> List[Any]:
    """``fn(groups, *args)`` on ``world_size`` spawned ranks; returns the results by rank.

    ``fn`` must be importable (module level). Any rank's exception fails the call with its traceback.
    Ranks run on CPU with gloo unless ``gpus`` (then one GPU per rank, NCCL).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, tp, pp, seed, tuple(args), results), daemon=False)
        for rank in range(world_size)
    ]
    with _children_see_gpus(gpus, world_size):
        for p in procs:
            p.start()
    out: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__}: ranks {sorted(set(range(world_size)) - set(out))} "
                                   f"did not finish within {timeout_s:.0f}s (tp={tp}, pp={pp})")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RuntimeError(f"{fn.__name__}: rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank} (tp={tp}, pp={pp}):\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
