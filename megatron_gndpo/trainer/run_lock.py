"""One run per directory: a lock file naming the process that writes there.

``trainer.output_dir`` (and the checkpoint directory, where it lies elsewhere) hold one run's metrics
and checkpoints. Two runs writing one directory corrupt both, and it happens without anyone meaning
it: a ``torchrun`` launcher killed with ``kill -9`` leaves its workers running and writing, and the
next launch into the same directory would interleave its checkpoints and ``latest`` with theirs.
Global rank 0 therefore holds ``DIR/run.lock`` for the whole run: JSON with its pid, host and start
time, and the pid's process creation time, so that a recycled pid is not taken for the run.

A lock whose process is gone (same host, that process no longer running) is stale and is taken over
with a warning. A lock held by a running process, or by a process on another host (whose liveness
cannot be checked from here), is refused, naming the holder and how to remove the lock. Two runs
taking over one stale lock in the same instant may both succeed; anything short of that is refused.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """The process a lock file names."""

    pid: int
    host: str
    started: str
    """When the run took the lock (local time, for people)."""
    process_created: float
    """The process's creation time (seconds since the epoch): a new process that reuses the pid differs."""

    @classmethod
    def this_process(cls) -> "LockHolder":
        pid = os.getpid()
        return cls(pid, socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   psutil.Process(pid).create_time())

    def is_running(self) -> bool:
        """On this host: whether the process that took the lock still runs."""
        try:
            created = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True  # someone else's process with that pid: cannot tell, so assume it is the run
        return abs(created - self.process_created) < 1.0

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (started {self.started})"


def read_holder(path: Path) -> LockHolder:
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:  # a lock being written this instant, or not ours
        raise ValueError(f"{path} exists but is not a run lock this program can read ({e}); if no run writes "
                         f"to {path.parent}, delete {path}") from e


class RunLock:
    """``RunLock.acquire(directory)`` takes ``directory/run.lock`` or raises a ValueError naming its holder;
    ``release()`` (also run at interpreter exit) removes it if it is still this process's."""

    def __init__(self, path: Path, holder: LockHolder):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        me = LockHolder.this_process()
        # The lock appears complete or not at all: written and synced under a private name, then hard-linked
        # into place (link fails if the lock exists). Creating run.lock first and writing it after would leave
        # an empty lock behind a crash between the two, refusing every later launch, --resume included.
        staged = directory / f".{LOCK_FILE}.{me.host}.{me.pid}"
        staged.write_text(json.dumps(dataclasses.asdict(me)))
        with open(staged) as f:
            os.fsync(f.fileno())
        try:
            for _ in range(2):  # the second attempt follows the removal of a stale lock
                try:
                    os.link(staged, path)
                except FileExistsError:
                    holder = read_holder(path)
                    if (holder.pid, holder.host, holder.process_created) == (me.pid, me.host, me.process_created):
                        return cls(path, holder)  # this process already runs there (a Trainer built again)
                    _refuse_unless_stale(path, holder, me)
                    log.warning("%s: taking over the lock of %s, which no longer runs", path, holder.describe())
                    _remove_if_unchanged(path, holder)
                    continue
                lock = cls(path, me)
                atexit.register(lock.release)
                return lock
        finally:
            staged.unlink()
        raise ValueError(f"{directory} is being claimed by another run starting at the same time ({path}); "
                         "choose another trainer.output_dir")

    def release(self) -> None:
        atexit.unregister(self.release)
        try:
            if read_holder(self.path) == self.holder:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass  # already removed, or replaced by someone who took it over: not ours to delete


def _refuse_unless_stale(path: Path, holder: LockHolder, me: LockHolder) -> None:
    if holder.host != me.host:
        raise ValueError(
            f"{path.parent} is in use by another run: {path} names {holder.describe()}, whose process cannot "
            f"be checked from host {me.host}. If that run has ended, delete {path}; otherwise choose another "
            "trainer.output_dir")
    if holder.is_running():
        raise ValueError(
            f"{path.parent} is in use by another run: {holder.describe()} still runs (lock file {path}). "
            "Wait for it or stop it (a torchrun launcher killed with -9 leaves its workers running: "
            f"`ps -o pid,args -p {holder.pid}`), or choose another trainer.output_dir")


def _remove_if_unchanged(path: Path, stale: LockHolder) -> None:
    """Removes the stale lock, unless another run took it over since it was read."""
    try:
        if read_holder(path) == stale:
            path.unlink()
    except FileNotFoundError:
        pass
