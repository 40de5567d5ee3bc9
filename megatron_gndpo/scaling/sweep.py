"""``megatron-gndpo sweep GRID.yaml --out DIR``: every cell of a grid run (local) or written and optionally
submitted (Slurm), resumably. A sweep first checks the whole grid (every cell's config, the layout, the
directory) and only then launches: finished cells are skipped, a cell whose earlier attempt failed or was
interrupted is tried again in a new attempt, Slurm jobs that ended since the last sweep are collected."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from megatron_gndpo.config.loader import config_changes, config_to_dict
from megatron_gndpo.scaling import launch, state
from megatron_gndpo.scaling.estimate import plan_cell, plan_summary
from megatron_gndpo.scaling.grid import Cell, Grid, expand, load_grid
from megatron_gndpo.scaling.runs import METRICS, read_metrics, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="the grid file: base config, overrides, axes, launch (docs/scaling.md)")
    parser.add_argument("--out", required=True, help="the sweep's directory (new, empty, or this grid's earlier "
                                                     "output to resume)")
    parser.add_argument("--submit", action="store_true", help="Slurm: submit the cells' scripts with sbatch "
                                                              "(default: only write them)")
    parser.add_argument("--dry-run", action="store_true", help="check the grid and list the cells; launch nothing")


def run_tree(cell: Cell, run_dir: Path) -> Dict[str, Any]:
    """The resolved config the cell runs, its outputs under ``run_dir``."""
    tree = config_to_dict(cell.config)
    tree["trainer"]["output_dir"] = str(run_dir)
    return tree


def _without_output_dir(tree: Dict[str, Any]) -> Dict[str, Any]:
    # an attempt ran under its partial directory's name and was renamed after: paths are not the config
    return {**tree, "trainer": {**tree["trainer"], "output_dir": None}}


def config_drift(cell: Cell, cell_dir: Path) -> List[str]:
    """How the config an earlier attempt ran differs from the cell's now ([] when it does not)."""
    earlier = yaml.safe_load((cell_dir / "config.yaml").read_text())
    return config_changes(_without_output_dir(earlier), _without_output_dir(run_tree(cell, cell_dir / "run")))


def check_cells(grid: Grid, cells: List[Cell]) -> None:
    """What must hold before any cell launches (ValueError naming the cell or path)."""
    for cell in cells:
        if cell.config.trainer.save_dir:
            raise ValueError(f"cell {cell.name}: trainer.save_dir ({cell.config.trainer.save_dir}) would be shared "
                             "by every cell; leave it unset so each cell saves under its own directory")
        launch.geometry(cell)


def check_earlier(out: Path, cells: List[Cell]) -> None:
    """A finished or pending attempt must have run the config the grid gives its cell now: otherwise the sweep
    would mix two studies under one name."""
    for cell in cells:
        dirs = state.CellDirs(out, cell.name)
        for path in (dirs.done, dirs.partial):
            if (path / "config.yaml").is_file() and (changes := config_drift(cell, path)):
                raise ValueError(f"{path} ran another config than the grid's cell {cell.name} now "
                                 f"({'; '.join(changes[:3])}); choose another --out or restore the grid")


def _record(grid: Grid, cell: Cell) -> Dict[str, Any]:
    record: Dict[str, Any] = {"name": cell.name, "grid": grid.name, "labels": cell.labels, "settings": cell.settings,
                              "launch": {"kind": cell.launch.kind, "tp": cell.tp, "pp": cell.pp, "cp": cell.cp,
                                         "dp": cell.launch.dp, **launch.geometry(cell)}}
    if grid.plan.gpu:
        try:
            plan = plan_cell(cell.config, cell.launch.dp, grid.plan.gpu)
            record["plan"] = plan_summary(plan)
        except (ValueError, KeyError, ZeroDivisionError) as e:  # a plan that cannot be made does not stop the run
            plan, record["plan_error"] = None, str(e)
        record["plan_json"] = plan
    return record


def prepare(grid: Grid, cell: Cell, dirs: state.CellDirs, cwd: Path) -> Path:
    """A new attempt's partial directory: config, plan, launch script, cell.json."""
    path = dirs.partial
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(run_tree(cell, path / "run"), sort_keys=False))
    record = _record(grid, cell)
    plan = record.pop("plan_json", None)
    if plan:
        state.write_json(path / "plan.json", plan)
    record["script"] = launch.write_script(grid, cell, path, cwd).name
    record["status"] = state.RUNNING if cell.launch.kind == "local" else state.WRITTEN
    record["attempt"] = len(dirs.failed()) + 1
    state.write_json(path / state.CELL_JSON, record)
    return path


def finalize(dirs: state.CellDirs, steps: int) -> Dict[str, Any]:
    """An attempt that ended (its exit_code written): done when it exited 0 and logged all ``steps``; the
    partial directory renamed to the cell's name, or to its next failed attempt's."""
    path = dirs.partial
    record = state.read_cell(path)
    record["returncode"] = state.exit_code(path)
    rows = read_metrics(path / "run" / METRICS) if (path / "run" / METRICS).is_file() else []
    record["measured"] = summarize(rows)
    done = record["returncode"] == 0 and record["measured"]["steps"] >= steps
    record["status"] = state.DONE if done else state.FAILED
    if not done:
        record["log_tail"] = launch.log_tail(path / "log.txt")
        if record["returncode"] == 0:
            record["log_tail"] = (f"exited 0 after {record['measured']['steps']} of {steps} steps\n"
                                  + (record["log_tail"] or ""))
    state.write_json(path / state.CELL_JSON, record)
    path.rename(dirs.done if done else dirs.next_failed())
    return record


def set_aside_interrupted(dirs: state.CellDirs) -> None:
    """A local attempt left running by a sweep that was stopped: kept as a failed attempt."""
    record = state.read_cell(dirs.partial)
    record.update(status=state.INTERRUPTED, log_tail=launch.log_tail(dirs.partial / "log.txt"))
    state.write_json(dirs.partial / state.CELL_JSON, record)
    dirs.partial.rename(dirs.next_failed())


def run_cell(grid: Grid, cell: Cell, out: Path, cwd: Path, submit: bool) -> Dict[str, Any]:
    """One cell brought as far as this sweep can: skipped, collected, run, written or submitted."""
    dirs = state.CellDirs(out, cell.name)
    if dirs.done.is_dir():
        return {**state.read_cell(dirs.done), "skipped": True}
    if dirs.partial.is_dir():
        record = state.read_cell(dirs.partial)
        if state.exit_code(dirs.partial) is not None:  # a Slurm job (or a local run) ended since the last sweep
            record = finalize(dirs, cell.config.trainer.steps)
            if record["status"] == state.DONE:
                return record
            print(f"[sweep] earlier attempt of {describe(record)}", flush=True)
        if record["status"] == state.SUBMITTED:
            return record
        if record["status"] == state.RUNNING:
            set_aside_interrupted(dirs)
    path = dirs.partial if dirs.partial.is_dir() else prepare(grid, cell, dirs, cwd)
    record = state.read_cell(path)
    if record["status"] == state.WRITTEN:
        if submit:
            record.update(status=state.SUBMITTED, job_id=launch.submit(path / record["script"]))
            state.write_json(path / state.CELL_JSON, record)
        return record
    if (record.get("plan") or {}).get("plan/rejected"):
        print(f"[sweep] {cell.name}: the plan expects trouble ({record['plan']['plan/rejected']}); running it anyway",
              flush=True)
    print(f"[sweep] {cell.name}: running ({record['launch']['gpus']} processes), log {path / 'log.txt'}", flush=True)
    start = time.time()
    finished = launch.run_local(path / record["script"], path / "log.txt", cwd)
    if state.exit_code(path) is None:  # the template's own record of the run's status comes first
        (path / "exit_code").write_text(f"{finished.returncode}\n")
    record.update(wall_s=round(time.time() - start, 2), host_peak_rss_gib=round(finished.peak_rss_gib, 3))
    state.write_json(path / state.CELL_JSON, record)
    return finalize(dirs, cell.config.trainer.steps)


def describe(record: Dict[str, Any]) -> str:
    status = "skipped (done)" if record.get("skipped") else record["status"]
    line = f"{record['name']}: {status}"
    if record["status"] == state.SUBMITTED:
        line += f" (Slurm job {record['job_id']})"
    if record["status"] == state.DONE and record.get("measured"):
        m = record["measured"]
        line += f", {m['steps']} steps, final acc {m.get('final/acc')}, val acc {m.get('final/val/acc')}"
    if record["status"] == state.FAILED:
        line += f" (exit {record['returncode']}); log tail:\n    " + "\n    ".join(
            (record.get("log_tail") or "(no log)").splitlines())
    return line


def sweep(grid_path: str, out: Path, submit: bool = False, dry_run: bool = False,
          cwd: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Run the grid into ``out``; the cells' records in grid order (raises ValueError before launching
    anything when the grid, a cell's config or ``out`` is wrong)."""
    grid = load_grid(grid_path)
    cells = expand(grid)
    check_cells(grid, cells)
    out, cwd = out.resolve(), (cwd or Path.cwd()).resolve()
    state.check_out_dir(out, grid.name)
    if dry_run:
        return [{"name": c.name, "status": "planned", "labels": c.labels} for c in cells]
    with state.locked(out):
        check_earlier(out, cells)
        state.write_json(out / state.MARKER, {"schema": state.SCHEMA, "grid": grid.name,
                                              "cells": [c.name for c in cells]})
        shutil.copyfile(grid.path, out / state.GRID_COPY)
        return [run_cell(grid, cell, out, cwd, submit) for cell in cells]


def run(args: argparse.Namespace) -> int:
    try:
        records = sweep(args.grid, Path(args.out), submit=args.submit, dry_run=args.dry_run)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for record in records:
        print(describe(record) if not args.dry_run else json.dumps(record), flush=True)
    return 1 if any(r["status"] == state.FAILED for r in records) else 0
