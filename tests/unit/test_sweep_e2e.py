"""One real cell end to end: the default local template launches ``torchrun -m megatron_gndpo.train`` for a
2-step single-process run of the tests' tiny models (random init), the sweep records plan and measurement,
and ``report`` reads it back (about 20 s on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_gndpo.scaling.report import make_report
from megatron_gndpo.scaling.sweep import sweep
from tests.sweep_setup import write_grid
from tests.trainer_setup import write_prompts

REPO = Path(__file__).resolve().parents[2]


def test_real_cell(tmp_path, monkeypatch):
    write_prompts(tmp_path / "train.parquet")
    grid = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}, launch={},
                      overrides={"trainer.val_interval": 1})
    # the launched trainer imports this checkout, whatever the directory the sweep starts it from
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    (record,) = sweep(str(grid), tmp_path / "out", cwd=tmp_path)
    assert record["status"] == "done", record.get("log_tail")
    assert record["returncode"] == 0 and record["measured"]["steps"] == 2
    assert record["host_peak_rss_gib"] > 0.1 and record["plan"]["plan/fits"]
    (row_run,) = [p for p in (tmp_path / "out" / "cells").iterdir()]
    assert row_run.name == "gndpo" and (row_run / "run" / "metrics.jsonl").is_file()
    summary = make_report([str(tmp_path / "out")], tmp_path / "report")
    assert summary["runs"] == 1
