"""Launching ``python -m megatron_gndpo.train`` (alone or under torchrun) as users do, killing it, and
reading back what it left: metrics.jsonl rows and every item of a dist-checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import numpy as np
import torch
import yaml

from tests.trainer_setup import REPO, tree, write_prompts

# CPU and gloo even on a GPU machine: bit-exact comparisons need the deterministic CPU kernels (and two
# ranks would share one GPU). One thread per process, as the runs share the CI machine's cores. The
# sampler runs eagerly: compiling it again in every restarted process would cost seconds per launch,
# and the compiled path has its own tests.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MEGATRON_GNDPO_COMPILE": "0", "OMP_NUM_THREADS": "1"}


def write_config(tmp: Path) -> Path:
    """The tiny run of tests/trainer_setup.py as a YAML file; models start from seeded random weights."""
    write_prompts(tmp / "train.parquet")
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tree(tmp)))
    return path


def train_command(config: Path, *overrides: str, prefix: Sequence[str] = (), resume: bool = False) -> List[str]:
    """``prefix``: interpreter arguments before the module, e.g. ``torchrun(...)``."""
    return [sys.executable, *prefix, "-m", "megatron_gndpo.train", "--config", str(config),
            *(["--resume"] if resume else []), *overrides]


def torchrun(*args: str) -> List[str]:
    return ["-m", "torch.distributed.run", *args]


def _start(cmd: List[str], log: Path) -> subprocess.Popen:
    # A session of its own, so that a kill reaches the processes megatron's checkpoint writer starts
    # too. Output goes to a file: a pipe nobody reads could fill and block the run.
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and everything in its session; returns when it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already exited and reaped
        pass
    proc.wait()


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM first: torchrun runs its workers in sessions of their own, beyond a SIGKILL to the
    agent's, and passes a SIGTERM on to them (SIGKILL after its own 30 s)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill(proc)


@contextlib.contextmanager
def launcher() -> Iterator[Callable[[List[str], Path], subprocess.Popen]]:
    """Yields ``launch(cmd, log)``; whatever it started and still runs is stopped on the way out, so a
    failed assertion or a hang leaves no training processes behind."""
    started: List[subprocess.Popen] = []

    def launch(cmd: List[str], log: Path) -> subprocess.Popen:
        started.append(_start(cmd, log))
        return started[-1]

    try:
        yield launch
    finally:
        for proc in started:
            _stop(proc)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Waits for a clean exit; a hang (a rendezvous or collective that never completes) fails with the
    end of the log rather than blocking CI."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        tail = log.read_text()[-3000:]
        raise AssertionError(f"{log.name}: still running after {timeout_s:.0f}s\n{tail}") from None
    assert rc == 0, f"{log.name}: exit code {rc}\n{log.read_text()[-3000:]}"


def wait_until(proc: subprocess.Popen, log: Path, condition: Callable[[], bool], timeout_s: float = 120.0,
               poll_s: float = 0.002) -> None:
    """Polls ``condition`` while ``proc`` runs; fast enough to catch a save (~0.1 s on the tiny model)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{log.name}: exited ({proc.returncode}) before the kill point\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{log.name}: no kill point within {timeout_s:.0f}s\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


def latest_step(checkpoints: Path) -> int:
    """The step of the checkpoint ``latest`` names (0 when there is none yet)."""
    pointer = checkpoints / "latest"  # replaced atomically: never read half-written
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def metric_rows(output_dir: Path) -> List[dict]:
    """The metrics.jsonl rows without wall-clock timings, throughput and memory peaks, which differ between runs."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/", "memory/"))} for row in rows]


def checkpoint_items(path: Path) -> dict:
    """Everything a dist-checkpoint holds: its sharded tensors and objects (model, optimizer moments, RNG
    states), read with torch.distributed.checkpoint, and its common state (scheduler, trainer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/state.pt")
        items = torch.load(f"{tmp}/state.pt", weights_only=False)
    items["common"] = torch.load(path / "common.pt", weights_only=False)
    return items


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every item of two dist-checkpoints identical bit for bit, but for the one setting in which the
    compared runs differ: where they write (the run config saved with the trainer state)."""
    states = [checkpoint_items(path) for path in (a, b)]
    for state in states:
        state["common"]["trainer"]["config"]["trainer"]["output_dir"] = None
    assert_identical(*states, where=a.name)


def assert_identical(a, b, where: str = "") -> None:
    """Same structure, and tensors / arrays equal bit for bit (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        as_bytes = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*as_bytes), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"
