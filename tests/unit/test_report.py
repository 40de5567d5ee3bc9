"""``report``: the table built from synthetic runs (values checked against hand computation), CSV and
parquet alike, the plots and the HTML page produced, and the rule for REPORT_DIR."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
import yaml

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.model import parameter_count
from megatron_gndpo.scaling import state
from megatron_gndpo.scaling.plots import mean_by_step
from megatron_gndpo.scaling.report import make_report
from megatron_gndpo.scaling.runs import read_metrics
from tests.trainer_setup import ARCH

# step 1 is the warm-up the pace leaves out; validation before the first step (0) and after steps 2 and 3
ROWS = [{"step": 0, "val/acc": 0.1},
        {"step": 1, "reward": 0.1, "acc": 0.0, "perf/tokens": 1000, "time/rollout_s": 5.0, "time/train_s": 5.0,
         "time/step_s": 10.0, "perf/tokens_per_s": 100},
        {"step": 2, "reward": 0.4, "acc": 0.3, "perf/tokens": 1000, "time/rollout_s": 1.0, "time/train_s": 1.0,
         "time/step_s": 2.0, "val/acc": 0.5, "memory/peak_gib": 3.0},
        {"step": 3, "reward": 0.6, "acc": 0.5, "perf/tokens": 2000, "time/rollout_s": 1.0, "time/train_s": 2.0,
         "time/step_s": 3.0, "val/acc": 0.4, "memory/peak_gib": 4.0}]


def write_run(run_dir, rows, hidden=32, estimator="gndpo", tp=1):
    run_dir.mkdir(parents=True)
    config = {"model": dict(ARCH, hidden_size=hidden), "teacher": {"model": dict(ARCH, hidden_size=48)},
              "algorithm": {"estimator": estimator},
              "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')


def write_sweep(root):
    """A sweep directory with two finished cells (tp1 and tp2 of two GPUs) and a failed attempt."""
    root.mkdir()
    state.write_json(root / "sweep.json", {"schema": state.SCHEMA, "grid": "study", "cells": ["a", "b"]})
    for name, tp, hidden, estimator in (("a", 1, 32, "gndpo"), ("b", 2, 64, "opd")):
        cell = root / "cells" / name
        write_run(cell / "run", ROWS, hidden, estimator, tp)
        state.write_json(cell / "cell.json", {
            "name": name, "status": "done", "labels": {"layout": f"tp{tp}"},
            "launch": {"tp": tp, "pp": 1, "dp": 2 // tp, "gpus": 2}, "host_peak_rss_gib": 1.5,
            "plan": {"plan/gpu": "h100", "plan/step_s": 1.25, "plan/tokens_per_s_per_gpu": 1500.0,
                     "plan/peak_gib": 5.0}})
    failed = root / "cells" / "c.failed-1"
    failed.mkdir()
    state.write_json(failed / "cell.json", {"name": "c", "status": "failed"})


def test_table_values(tmp_path):
    write_sweep(tmp_path / "sweep")
    write_run(tmp_path / "lone", ROWS[:2], hidden=96)
    report = tmp_path / "report"
    summary = make_report([str(tmp_path / "sweep"), str(tmp_path / "lone")], report)
    assert summary["runs"] == 3
    rows = {r["cell"]: r for r in csv.DictReader(open(report / "report.csv"))}
    assert sorted(rows) == ["a", "b", "lone"]
    a = {k: v for k, v in pq.read_table(report / "report.parquet").to_pylist()[0].items()}
    assert a["cell"] == "a" and a["sweep"] == "study" and a["axis/layout"] == "tp1" and a["arm"] == "tp1"
    assert (a["steps"], a["final/reward"], a["final/acc"]) == (3, 0.6, 0.5)  # the cut-short last line ignored
    assert (a["final/val/acc"], a["best/val/acc"], a["best/val/acc_step"]) == (0.4, 0.5, 2)
    assert a["time/step_s"] == pytest.approx(2.5) and a["time/train_s"] == pytest.approx(1.5)  # steps 2-3
    assert a["tokens_per_s"] == pytest.approx(3000 / 5.0) and a["tokens_per_s_per_gpu"] == pytest.approx(300)
    assert a["error/step_s"] == pytest.approx(1.25 / 2.5 - 1)
    assert a["error/tokens_per_s_per_gpu"] == pytest.approx(1500 / 300 - 1)
    assert (a["peak_memory_gib"], a["error/peak_gib"]) == (4.0, pytest.approx(5 / 4 - 1))
    assert a["student_parameters"] == parameter_count(ModelConfig(**ARCH))["total"]
    assert (a["tp"], a["dp"], a["gpus"], a["host_peak_rss_gib"]) == (1, 2, 2, 1.5)
    lone = rows["lone"]
    assert lone["gpus"] == "" and lone["tokens_per_s"] == "100.0"  # one step: its own pace
    assert float(rows["b"]["student_parameters"]) > float(a["student_parameters"])


def test_plots_and_page(tmp_path):
    write_sweep(tmp_path / "sweep")
    report = tmp_path / "report"
    summary = make_report([str(tmp_path / "sweep")], report)
    figures = ["curves.png", "throughput.png", "step_time.png", "accuracy_vs_size.png"]
    assert summary["files"] == ["report.csv", "report.parquet", "index.html"] + figures
    for name in figures:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<td>a</td>" in page and 'href="report.csv"' in page


def test_report_dir_rule(tmp_path):
    write_sweep(tmp_path / "sweep")
    report = tmp_path / "report"
    report.mkdir()
    (report / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=f"{report} is not empty and is not an earlier report"):
        make_report([str(tmp_path / "sweep")], report)
    assert sorted(p.name for p in report.iterdir()) == ["mine.txt"]
    make_report([str(tmp_path / "sweep")], report, overwrite=True)
    assert (report / "mine.txt").read_text() == "keep"
    make_report([str(tmp_path / "sweep")], report)  # an earlier report is replaced without --overwrite
    with pytest.raises(ValueError, match="neither a sweep directory"):
        make_report([str(tmp_path)], tmp_path / "other")


def test_seeds_are_one_arm(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    state.write_json(root / "sweep.json", {"schema": state.SCHEMA, "grid": "seeds", "cells": ["x-1", "x-2"]})
    for seed, reward in (("1", 0.2), ("2", 0.6)):
        rows = [{"step": 1, "reward": reward, "acc": 0.0, "time/step_s": 1.0, "perf/tokens": 10}]
        write_run(root / "cells" / f"x-{seed}" / "run", rows)
        state.write_json(root / "cells" / f"x-{seed}" / "cell.json", {
            "name": f"x-{seed}", "status": "done", "labels": {"student": "x", "seed": seed},
            "launch": {"tp": 1, "pp": 1, "dp": 1, "gpus": 1}})
    make_report([str(root)], tmp_path / "r")
    rows = list(csv.DictReader(open(tmp_path / "r" / "report.csv")))
    assert [r["arm"] for r in rows] == ["x", "x"]
    runs = [read_metrics(root / "cells" / f"x-{s}" / "run" / "metrics.jsonl") for s in "12"]
    assert mean_by_step(runs, "reward") == [(1, pytest.approx(0.4))]
