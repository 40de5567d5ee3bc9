"""Checks a run makes before any compute, decided together by every rank.

A rank that raises on its own leaves the others waiting in their next collective until the process
group times out (ten minutes), and a launcher that kills the rest prints every rank's traceback. Each
check here runs through :func:`agree`: the outcome is exchanged over the world before anyone goes on,
and then either every rank continues or every rank raises the same :class:`SetupError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import torch.distributed as dist

from megatron_gndpo.checkpoint.dist_ckpt import LATEST_FILE, STEP_DIR, CheckpointManager, read_meta
from megatron_gndpo.config.schema import TrainerConfig
from megatron_gndpo.trainer.run_lock import RunLock

log = logging.getLogger(__name__)
T = TypeVar("T")
MISTAKES = (ValueError, OSError, ImportError)


class SetupError(ValueError):
    """A check before compute failed; every rank raises it, with the failing rank's message."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(what: str, fn: Callable[[], T], *, rank0_only: bool = False) -> T:
    """Collective: runs ``fn`` on every rank (or on rank 0 only, whose result every rank then
    receives) and returns its result, unless it failed somewhere: then every rank raises a
    SetupError naming ``what`` and the first failing rank's error. A ValueError, OSError or
    ImportError is a mistake in the config or the environment (a value, a path, a missing package) and
    reads as its message; any other exception is a bug and is re-raised with its traceback on the rank
    where it happened."""
    rank, world = _rank_and_world()
    result, error, local = None, None, None
    if rank == 0 or not rank0_only:
        try:
            result = fn()
        except Exception as e:  # every rank must learn of it before anyone raises
            local = e
            error = str(e) if isinstance(e, MISTAKES) else f"{type(e).__name__}: {e}"
    errors = [error]
    if world > 1 and rank0_only:
        box = [error, result]
        dist.broadcast_object_list(box, src=0)
        errors, result = [box[0]], box[1]
    elif world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if failed is None:
        return result
    if local is not None and not isinstance(local, MISTAKES):
        raise local
    # a mistake every rank makes alike (a config value) is nobody's rank in particular
    where = f" (rank {failed[0]})" if len(set(errors)) > 1 else ""
    raise SetupError(f"{what}{where}: {failed[1]}") from local


@dataclasses.dataclass
class RunClaim:
    """What rank 0 decided about the run's directories; every rank holds the same ``start_step`` and
    ``resume_from``, rank 0 alone the locks."""

    start_step: int
    """The step the run starts after: the resumed checkpoint's step, 0 for a fresh run."""
    resume_from: Optional[str]
    """The checkpoint ``--resume`` continues from (None: a fresh run)."""
    locks: List[RunLock] = dataclasses.field(default_factory=list)
    """The run locks rank 0 holds until :meth:`release` (empty on the other ranks)."""

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []


def _directories_to_lock(tc: TrainerConfig) -> List[Path]:
    out = Path(tc.output_dir).resolve()
    ckpt = Path(tc.checkpoint_dir).resolve()
    return [out] if ckpt.is_relative_to(out) else [out, ckpt]


def claim_run(tc: TrainerConfig, checkpoints: CheckpointManager, *, resume: bool) -> RunClaim:
    """Collective. Rank 0 locks ``trainer.output_dir`` (and the checkpoint directory) against a second
    run, and refuses a fresh run into a checkpoint directory that holds checkpoints (its saves would
    replace that run's, and ``latest`` would move back) unless ``trainer.overwrite``; with ``resume``
    it finds the checkpoint to continue from. Every rank learns the outcome."""
    locks: List[RunLock] = []

    def decide():
        for directory in _directories_to_lock(tc):
            locks.append(RunLock.acquire(directory))
        try:
            if resume:
                path = checkpoints.resume_point()
                if path is None:
                    return 0, None
                step = read_meta(path)["step"]
                if step >= tc.steps:
                    log.warning("--resume: %s is at step %d and trainer.steps is %d: nothing left to train",
                                path, step, tc.steps)
                return step, str(path)
            earlier = _earlier_checkpoints(checkpoints.root)
            if earlier and not tc.overwrite:
                raise ValueError(
                    f"{checkpoints.root} holds an earlier run's checkpoints ({earlier}), which this fresh run's "
                    "saves would replace. Pass --resume to continue that run, set trainer.overwrite=true to "
                    "replace them, or choose another trainer.output_dir (or trainer.save_dir)")
            if earlier:
                log.warning("trainer.overwrite=true: this fresh run replaces the checkpoints in %s (%s) as it saves",
                            checkpoints.root, earlier)
            return 0, None
        except BaseException:
            for lock in locks:
                lock.release()
            raise

    start_step, resume_from = agree("claiming trainer.output_dir", decide, rank0_only=True)
    return RunClaim(start_step, resume_from, locks)


def _earlier_checkpoints(root: Path) -> str:
    """What ``root`` holds of an earlier run, in words ("" for nothing)."""
    steps = sorted(p.name for p in root.iterdir() if STEP_DIR.fullmatch(p.name)) if root.is_dir() else []
    pointer = root / LATEST_FILE
    found = [f"latest: {pointer.read_text(errors='replace').strip()[:80]}"] if pointer.is_file() else []
    if steps:
        found.append(f"{len(steps)} step checkpoint(s), the newest {steps[-1]}")
    return ", ".join(found)


def probe_writable(directory: str | os.PathLike, field: str, nbytes: int = 64) -> None:
    """Creates ``directory`` and an ``nbytes`` file in it, then removes the file: a directory this rank
    cannot write fails now, naming the path and the errno, and not at the first save an hour in."""
    directory = Path(directory)
    probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * nbytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"{field} {directory} is not writable: {e.strerror}", e.filename or str(probe)) from e


def describe_write_failure(error: BaseException, directory: str | os.PathLike, field: str) -> str:
    """One line on why writing under ``directory`` failed, with a path and an errno. megatron's
    checkpoint writers often lose the OSError (torch.save reports a full disk as "unexpected pos"), so
    when ``error`` carries none, a 1 MiB probe write into ``directory`` is made to name them."""
    found = _os_errors(error)
    if found:
        return str(found[0])
    summary = _one_line(error)
    try:
        probe_writable(directory, field, nbytes=1 << 20)
    except OSError as e:
        return f"{summary}; a probe write now fails: {e}"
    free = shutil.disk_usage(directory).free / 2**30
    return f"{summary} (a probe write into {directory} succeeds now; {free:.1f} GiB free)"


def _os_errors(error: BaseException) -> List[OSError]:
    """The OSErrors in ``error``, its causes, and the per-rank failures of torch's CheckpointException."""
    found: List[OSError] = []
    pending, seen = [error], set()
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            found.append(e)
        pending += [e.__cause__, e.__context__]
        pending += [failure[0] if isinstance(failure, tuple) else failure
                    for failure in (getattr(e, "failures", None) or {}).values()]
    return found


def _one_line(error: BaseException) -> str:
    failures = getattr(error, "failures", None)
    if failures:  # torch's CheckpointException: one entry per failed rank, its str() holds every traceback
        return "; ".join(f"rank {rank}: {_one_line(f[0] if isinstance(f, tuple) else f)}"
                         for rank, f in sorted(failures.items()))
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
