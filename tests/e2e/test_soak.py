"""A training run SIGKILLed again and again, inside steps and inside checkpoint saves, and resumed each
time with --resume, ends bit for bit where the same run ends uninterrupted."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.e2e.run_helpers import (assert_same_checkpoint, finish, kill, latest_step, launcher, metric_rows,
                                   train_command, wait_until, write_config)

STEPS = 30
SEED = 20240611
# "save": SIGKILL as soon as the process has begun writing a chosen checkpoint (its step_N.tmp appeared).
# "step": SIGKILL a seeded 0-0.25 s after a chosen checkpoint completed, somewhere in the next step or
# save (on the tiny model a step takes about 0.05 s, a save 0.1 s).
MODES = ("save", "step", "save", "step", "save")


def _created_after(path: Path, launched: float) -> bool:
    """``path`` exists and is not the stale one a previous kill left (that one predates this launch)."""
    try:
        return path.stat().st_mtime >= launched
    except FileNotFoundError:
        return False


@pytest.mark.soak
def test_sigkilled_run_resumes_bit_exact(tmp_path):
    config = write_config(tmp_path)
    common = (f"trainer.steps={STEPS}", "trainer.save_interval=1")
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    checkpoints = killed_dir / "checkpoints"
    rng = random.Random(SEED)
    modes = list(MODES)
    rng.shuffle(modes)
    kills = []
    with launcher() as launch:
        # The uninterrupted run uses the second core meanwhile: the kill points are tied to the killed
        # run's own progress (a checkpoint begun or completed), so the load barely moves them.
        straight_log = tmp_path / "straight.log"
        straight = launch(train_command(config, f"trainer.output_dir={straight_dir}", *common), straight_log)
        for i, mode in enumerate(modes):
            log = tmp_path / f"killed_{i}.log"
            resumed_from = latest_step(checkpoints)
            target = resumed_from + rng.randint(1, 5)  # past the resume point, so every launch makes progress
            launched = time.time()
            proc = launch(train_command(config, f"trainer.output_dir={killed_dir}", *common, resume=i > 0), log)
            if mode == "save":
                pending = checkpoints / f"step_{target:08d}.tmp"
                # The save can outrun the polling; the kill then lands in the next step and is recorded so.
                wait_until(proc, log, lambda: _created_after(pending, launched) or latest_step(checkpoints) >= target)
            else:
                wait_until(proc, log, lambda: latest_step(checkpoints) >= target)
                time.sleep(rng.uniform(0.0, 0.25))
            kill(proc)
            inside_save = sorted(p.name for p in checkpoints.glob("step_*.tmp"))  # a dead process left it mid-save
            kills.append(dict(mode=mode, resumed_from=resumed_from, target=target, latest=latest_step(checkpoints),
                              inside_save=inside_save))
            if resumed_from:  # a launch that silently started over would end identical too: it must say it resumed
                assert f"at step {resumed_from}" in log.read_text(), f"{log.name} did not resume: {kills}"

        final_log = tmp_path / "final.log"
        resumed_from = latest_step(checkpoints)
        final = launch(train_command(config, f"trainer.output_dir={killed_dir}", *common, resume=True), final_log)
        finish(final, final_log, timeout_s=300)
        finish(straight, straight_log, timeout_s=300)

    assert any(k["inside_save"] for k in kills), f"no kill landed inside a save: {kills}"
    assert resumed_from and f"at step {resumed_from}" in final_log.read_text(), kills
    assert latest_step(checkpoints) == STEPS and not list(checkpoints.glob("*.tmp")), kills
    rows = metric_rows(killed_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), kills  # redone steps replace their rows
    assert rows == metric_rows(straight_dir)
    last = f"checkpoints/step_{STEPS:08d}"
    assert_same_checkpoint(killed_dir / last, straight_dir / last)
