"""`make demo` deletes only what it made, and its warm-up is reproducible."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gndpo import demo
from tests.trainer_setup import REPO


def test_demo_refuses_a_foreign_run_directory(tmp_path, capsys):
    precious = tmp_path / "gndpo" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(tmp_path)])  # refused before any training starts
    assert str(tmp_path / "gndpo") in str(exit_.value) and "refusing" in str(exit_.value)
    assert precious.read_text() == "mine"


def test_demo_replaces_only_its_own_run_directories(tmp_path):
    demo.check_out(tmp_path)  # nothing there yet
    run_dir = tmp_path / "gndpo"
    demo.fresh_run_dir(run_dir)
    (run_dir / "metrics.jsonl").write_text("{}\n")  # what the last demo run left
    demo.check_out(tmp_path)
    demo.fresh_run_dir(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [demo.MARKER]

    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / demo.MARKER).unlink()  # a user kept the directory for themselves
    with pytest.raises(demo.DemoError, match="refusing"):
        demo.check_out(tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    demo.check_out(tmp_path)  # an empty directory has nothing to lose
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "notes.txt").write_text("mine")  # not a warm-up checkpoint's file
    with pytest.raises(demo.DemoError, match="student"):
        demo.check_out(tmp_path)


def _warm_up(out: Path) -> dict:
    cmd = [sys.executable, "examples/arithmetic/train_sft.py", "--config", "examples/configs/demo.yaml", "--role",
           "student", "--steps", "3", "--batch", "16", "--decay", demo.SFT["student"]["decay"], "--threads",
           str(demo.SFT_THREADS), "--out", str(out), "parallel.tensor_model_parallel_size=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.distcp"))}


def test_sft_warm_up_is_deterministic(tmp_path):
    first, second = _warm_up(tmp_path / "a"), _warm_up(tmp_path / "b")
    assert first and first == second
