"""Run a function in N real gloo processes with a TP x PP layout and collect what each returns.

Children are spawned (not forked: megatron and gloo keep global state) and a desynchronised collective
fails the test at its deadline instead of hanging CI. Spawning a rank costs ~5 s of imports, paid by
~150 worlds per suite run, so the CPU worlds are a pool: a world of N ranks stays up between calls
(one per world size) and runs the next function after tearing megatron's groups down. A call that
fails, times out or leaves its rank in a state the next call should not inherit retires the world;
the next call spawns a fresh one. The harness resets the environment, working directory, torch's
defaults and every process group between calls; what else a function changes in its process it must
undo itself: patch modules with ``mock.patch.object`` (restored on return) and close trainers whose
output directory another world may claim. Children are not daemonic: megatron's checkpoint writer
starts a multiprocessing Manager, which daemonic processes may not do.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import os
import queue
import time
import traceback
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.multiprocessing as mp

from megatron_gndpo.distributed.init import free_port

# a rank that binds a port another process took between free_port() and the bind (concurrent test runs)
_PORT_TAKEN = ("EADDRINUSE", "Address already in use")


def _destroy_subgroups() -> None:
    """megatron's destroy_model_parallel forgets its groups but torch keeps them registered, and each
    gloo group holds its own threads (~50 per megatron layout): without this a pooled rank gains ~50
    threads per call, which load the machine (torch has no public list of the groups: _world is it)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)


def _run_task(fn, layout, seed, args):
    from megatron_gndpo.config.schema import ParallelConfig
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    tp, pp, cp = layout
    groups = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          context_parallel_size=cp), seed=seed, timeout_s=120)
    out = fn(groups, *args)
    # the default group stays for the next call; a function that destroyed it (a trainer's close(),
    # the converter) gets a new one on the next call's port
    destroy_parallel(destroy_process_group=False)
    _destroy_subgroups()
    # bytes, not tensors: torch's queue shares tensor storage by file descriptor, which dies with the child
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def _worker(rank, world_size, tasks, results):
    import torch

    base_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    base_cwd = os.getcwd()
    while True:
        task = tasks.get()
        if task is None:
            return
        port, fn, layout, seed, args = task
        # what one call may change and the next must not see: the environment, the working directory,
        # torch's global defaults
        os.environ.clear()
        os.environ.update(base_env, MASTER_PORT=str(port))
        os.chdir(base_cwd)
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        try:
            results.put((rank, True, _run_task(fn, layout, seed, args)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc()))
            return
        gc.collect()


def relayout(tp: int, pp: int = 1, seed: int = 1234, cp: int = 1):
    """Inside a harness function: rebuild megatron's groups for another layout of the same world."""
    from megatron_gndpo.config.schema import ParallelConfig
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    destroy_parallel(destroy_process_group=False)
    return init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        context_parallel_size=cp), seed=seed)


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


class _World:
    """``world_size`` spawned ranks waiting for functions to run."""

    def __init__(self, world_size: int, gpus: bool):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_worker, args=(rank, world_size, self.tasks[rank], self.results),
                                  daemon=False) for rank in range(world_size)]
        with _children_see_gpus(gpus, world_size):
            for p in self.procs:
                p.start()

    def run(self, fn, layout, seed, args, timeout_s) -> List[Any]:
        port = free_port()
        for q in self.tasks:
            q.put((port, fn, layout, seed, tuple(args)))
        out: dict = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__}: ranks {sorted(set(range(self.world_size)) - set(out))} "
                                   f"did not finish within {timeout_s:.0f}s (tp, pp, cp = {layout})")
            try:
                rank, ok, payload = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if p.exitcode is not None and i not in out]
                if dead:
                    code = self.procs[dead[0]].exitcode
                    raise RuntimeError(f"{fn.__name__}: rank {dead[0]} died with exit code {code}")
                continue
            if not ok:
                raise _RankFailed(f"{fn.__name__} failed on rank {rank} (tp, pp, cp = {layout}):\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class _RankFailed(RuntimeError):
    pass


_POOL: Dict[int, _World] = {}
atexit.register(lambda: [_POOL.pop(n).close() for n in list(_POOL)])


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    args: Sequence[Any] = (),
    timeout_s: float = 150.0,
    gpus: bool = False,
) -> List[Any]:
    """``fn(groups, *args)`` on ``world_size`` spawned ranks of a TP x PP x CP layout; returns the results by rank.

    ``fn`` must be importable (module level). Any rank's exception fails the call with its traceback.
    Ranks run on CPU with gloo, in a pooled world, unless ``gpus`` (then a fresh world with one GPU per
    rank, NCCL).
    """
    retries = 2
    while True:
        world = _POOL.pop(world_size, None) if not gpus else None
        world = world or _World(world_size, gpus)
        try:
            out = world.run(fn, (tp, pp, cp), seed, args, timeout_s)
        except _RankFailed as e:
            world.close()
            if retries and any(s in str(e) for s in _PORT_TAKEN):
                retries -= 1
                continue
            raise
        except BaseException:
            world.close()
            raise
        if gpus:
            world.close()
        else:
            _POOL[world_size] = world
        return out
