"""The sweep directory: finished cells skipped, failed ones reported with their log tail and tried again,
interrupted attempts kept aside, a changed grid refused, and ``--out`` refused when it holds anything that is
not this grid's output. Cells run the fake trainer of ``tests/sweep_setup.py`` through a launch template."""

from __future__ import annotations

import json

import pytest

from megatron_gndpo.scaling import state
from megatron_gndpo.scaling.sweep import sweep
from tests.sweep_setup import write_grid

AXES = {"algorithm.estimator": ["gndpo", "opd"]}


def calls(tmp):
    return (tmp / "calls.txt").read_text().split()


def test_failed_cell_reported_then_retried_done_skipped(tmp_path, monkeypatch):
    grid, out = write_grid(tmp_path, AXES), tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL", "opd")
    first = {r["name"]: r for r in sweep(str(grid), out, cwd=tmp_path)}
    assert first["gndpo"]["status"] == "done" and first["gndpo"]["measured"]["steps"] == 2
    assert first["opd"]["status"] == "failed" and first["opd"]["returncode"] == 3
    assert "CUDA out of memory (simulated)" in first["opd"]["log_tail"]
    cells = out / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["gndpo", "opd.failed-1"]
    assert json.loads((cells / "gndpo" / "cell.json").read_text())["plan"]["plan/gpu"] == "h100"
    assert (cells / "gndpo" / "plan.json").is_file()

    monkeypatch.delenv("FAKE_FAIL")
    second = {r["name"]: r for r in sweep(str(grid), out, cwd=tmp_path)}
    assert second["gndpo"].get("skipped") and second["opd"]["status"] == "done"
    assert second["opd"]["attempt"] == 2
    assert calls(tmp_path) == [".gndpo.partial", ".opd.partial", ".opd.partial"]  # gndpo ran once
    assert sorted(p.name for p in cells.iterdir()) == ["gndpo", "opd", "opd.failed-1"]  # the failure kept


def test_interrupted_attempt_set_aside(tmp_path):
    grid, out = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}), tmp_path / "out"
    sweep(str(grid), out, cwd=tmp_path)
    done = out / "cells" / "gndpo"
    # as a sweep killed mid-run leaves it: the partial directory, status running, no exit code
    partial = out / "cells" / ".gndpo.partial"
    done.rename(partial)
    record = json.loads((partial / "cell.json").read_text())
    (partial / "cell.json").write_text(json.dumps({**record, "status": "running"}))
    (partial / "exit_code").unlink()
    (records,) = sweep(str(grid), out, cwd=tmp_path)
    assert records["status"] == "done"
    aside = json.loads((out / "cells" / "gndpo.failed-1" / "cell.json").read_text())
    assert aside["status"] == "interrupted"


def test_changed_cell_config_refused(tmp_path):
    grid, out = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}), tmp_path / "out"
    sweep(str(grid), out, cwd=tmp_path)
    grid = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}, overrides={"optim.lr": 0.5})
    with pytest.raises(ValueError, match=r"ran another config .*optim.lr: 0.001 -> 0.5"):
        sweep(str(grid), out, cwd=tmp_path)
    assert calls(tmp_path) == [".gndpo.partial"]


@pytest.mark.parametrize("setup, culprit", [
    (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt"),
    (lambda out: state.write_json(out / "sweep.json", {"schema": state.SCHEMA, "grid": "other"}), "sweep.json"),
])
def test_foreign_out_refused(tmp_path, setup, culprit):
    grid, out = write_grid(tmp_path, AXES), tmp_path / "out"
    out.mkdir()
    setup(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=str(out / culprit)):
        sweep(str(grid), out, cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == before


def test_stray_file_beside_a_sweep_refused(tmp_path):
    grid, out = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}), tmp_path / "out"
    sweep(str(grid), out, cwd=tmp_path)
    (out / "cells" / "scratch").mkdir()
    with pytest.raises(ValueError, match=str(out / "cells" / "scratch")):
        sweep(str(grid), out, cwd=tmp_path)


def test_lone_lock_is_not_foreign(tmp_path):
    grid, out = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}), tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("")  # what a sweep stopped before writing sweep.json leaves
    (record,) = sweep(str(grid), out, cwd=tmp_path)
    assert record["status"] == "done"
