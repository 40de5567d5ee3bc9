"""``megatron-gndpo report DIR... --out REPORT_DIR``: the runs under DIR... (sweep directories, sweep cells
or run output directories) as one table (``report.csv``, ``report.parquet``), PNG figures and ``index.html``.
``REPORT_DIR`` must be new, empty or an earlier report (its ``report.json``) unless ``--overwrite``; only the
report's own files are written there."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from megatron_gndpo.scaling import html, plots
from megatron_gndpo.scaling.runs import METRICS, collect, read_metrics, write_table
from megatron_gndpo.scaling.state import write_json

SCHEMA = "megatron-gndpo.report/1"
MARKER = "report.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="sweep directories, sweep cells or run directories")
    parser.add_argument("--out", required=True, help="the report's directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not an earlier report")
    parser.add_argument("--title", default="Scaling report")


def check_report_dir(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite or (out / MARKER).is_file():
        return
    if not out.is_dir() or any(out.iterdir()):
        raise ValueError(f"{out} is not empty and is not an earlier report (no {MARKER}); pass --overwrite to "
                         "write the report's files into it anyway, or choose another --out")


def make_report(dirs: List[str], out: Path, overwrite: bool = False, title: str = "Scaling report") -> Dict:
    """Write the report; returns its ``report.json`` (raises ValueError naming a path that is wrong)."""
    check_report_dir(out, overwrite)
    rows = collect(dirs)
    if not rows:
        raise ValueError(f"no finished runs under {', '.join(dirs)}")
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / "report.csv", out / "report.parquet")
    several = len({r["sweep"] for r in rows}) > 1  # arms of two sweeps may share a name
    series: Dict[str, List] = {}
    for r in rows:
        series.setdefault(f"{r['sweep']}/{r['arm']}" if several else r["arm"], []).append(
            read_metrics(Path(r["path"]) / METRICS))
    figures = [f for f in (plots.curves(series, out / "curves.png"), plots.throughput(rows, out / "throughput.png"),
                           plots.step_time(rows, out / "step_time.png"),
                           plots.accuracy_vs_size(rows, out / "accuracy_vs_size.png")) if f]
    (out / "index.html").write_text(html.page(title, rows, figures, ["report.csv", "report.parquet"]))
    summary = {"schema": SCHEMA, "inputs": list(dirs), "runs": len(rows),
               "files": ["report.csv", "report.parquet", "index.html"] + [f.name for f in figures]}
    write_json(out / MARKER, summary)
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        summary = make_report(args.dirs, Path(args.out), args.overwrite, args.title)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{summary['runs']} runs -> {Path(args.out) / 'index.html'} ({', '.join(summary['files'])})", flush=True)
    return 0
