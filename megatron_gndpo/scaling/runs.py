"""A run's ``metrics.jsonl`` summarised, and the report's table: one row per run.

Measured figures of a run (training steps are the rows with a ``reward``; validation rows hold ``val/*``):

- ``final/reward``, ``final/acc``: the last training step's; ``final/val/*``: the last validation's;
  ``best/val/*`` and ``best/val/*_step``: the highest value of each validation metric and where;
- ``time/*_s`` (the step-time breakdown) and ``tokens_per_s`` = sum of ``perf/tokens`` / sum of
  ``time/step_s``, both over the steps after the first (its start-up is not the run's pace) when there are
  several; ``tokens_per_s_per_gpu`` = ``tokens_per_s`` / GPUs;
- ``peak_memory_gib``: the largest ``memory/*peak*`` value logged (GiB), when the trainer logs one;
  ``host_peak_rss_gib``: the sweep's measurement of a local cell (largest process's resident memory);
- ``arm``: the cell's axis labels but its ``seed`` axis (a run outside a sweep: its directory's name);
- ``error/*`` = planned / measured - 1 for step time, tokens/s per GPU and peak memory, where both exist.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from megatron_gndpo.config.loader import _build
from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.model import parameter_count

METRICS = "metrics.jsonl"
SEED_AXIS = "seed"
# the columns a reader looks for first; the others follow sorted
LEADING = ("sweep", "cell", "arm", "estimator", "student_parameters", "teacher_parameters", "tp", "pp", "dp", "gpus",
           "steps", "final/reward", "final/acc", "final/val/acc", "best/val/acc", "best/val/acc_step",
           "tokens_per_s", "tokens_per_s_per_gpu", "time/step_s", "plan/step_s", "error/step_s",
           "plan/tokens_per_s_per_gpu", "error/tokens_per_s_per_gpu", "peak_memory_gib", "plan/peak_gib",
           "error/peak_gib", "host_peak_rss_gib")


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The JSON rows of a metrics.jsonl; a last line cut short (a run killed while writing) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The measured figures of one run (module docstring)."""
    train = [r for r in rows if "reward" in r]
    out: Dict[str, Any] = {"steps": train[-1]["step"] if train else 0}
    if train:
        out["final/reward"], out["final/acc"] = train[-1].get("reward"), train[-1].get("acc")
    for key in sorted({k for r in rows for k in r if k.startswith("val/")}):
        seen = [(r[key], r["step"]) for r in rows if isinstance(r.get(key), (int, float))]
        if seen:
            out[f"final/{key}"] = seen[-1][0]
            best = max(seen, key=lambda vs: vs[0])  # the earliest step of the best value
            out[f"best/{key}"], out[f"best/{key}_step"] = best
    paced = train[1:] if len(train) > 1 else train
    for key in sorted({k for r in paced for k in r if k.startswith("time/")}):
        values = [r[key] for r in paced if key in r]
        out[key] = sum(values) / len(values)
    seconds = sum(r.get("time/step_s", 0.0) for r in paced)
    if seconds > 0:
        out["tokens_per_s"] = sum(r.get("perf/tokens", 0.0) for r in paced) / seconds
    peaks = [r[k] for r in rows for k in r if k.startswith("memory/") and "peak" in k]
    if peaks:
        out["peak_memory_gib"] = max(peaks)
    return out


def _parameters(tree: Dict[str, Any]) -> Optional[int]:
    try:
        return parameter_count(_build(ModelConfig, tree, "model"))["total"]
    except (ValueError, TypeError, KeyError):
        return None


def _ratio_error(planned: Optional[float], measured: Optional[float]) -> Optional[float]:
    return planned / measured - 1 if planned is not None and measured else None


def run_row(run_dir: Path, cell: Optional[Dict[str, Any]] = None, sweep: Optional[str] = None) -> Dict[str, Any]:
    """One table row: a run directory (its metrics.jsonl and config.yaml) and, for a sweep cell, its cell.json."""
    row: Dict[str, Any] = {"sweep": sweep, "cell": cell["name"] if cell else run_dir.name, "path": str(run_dir)}
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    row["estimator"] = (config.get("algorithm") or {}).get("estimator")
    row["student_parameters"] = _parameters(config.get("model") or {})
    row["teacher_parameters"] = _parameters((config.get("teacher") or {}).get("model") or {})
    parallel = config.get("parallel") or {}
    row["tp"], row["pp"] = parallel.get("tensor_model_parallel_size"), parallel.get("pipeline_model_parallel_size")
    row["dp"] = row["gpus"] = None  # a run's own files do not say how many processes it had; a cell's do
    row["arm"] = row["cell"]
    if cell:
        row.update({f"axis/{axis}": label for axis, label in cell["labels"].items()})
        # an arm is what the study compares: the cell's labels but its seed (seeds are repeats of one arm)
        row["arm"] = "-".join(label for axis, label in cell["labels"].items() if axis != SEED_AXIS) or row["cell"]
        row.update({k: cell["launch"][k] for k in ("dp", "gpus")})
        row.update(cell.get("plan") or {})
        row["host_peak_rss_gib"] = cell.get("host_peak_rss_gib")
    row.update(summarize(read_metrics(run_dir / METRICS)))
    if row.get("tokens_per_s") is not None and row["gpus"]:
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / row["gpus"]
    for name, measured in (("step_s", "time/step_s"), ("tokens_per_s_per_gpu", "tokens_per_s_per_gpu"),
                           ("peak_gib", "peak_memory_gib")):
        row[f"error/{name}"] = _ratio_error(row.get(f"plan/{name}"), row.get(measured))
    return row


def collect(paths: Iterable[Path]) -> List[Dict[str, Any]]:
    """Rows of every run under ``paths``: a sweep directory (its finished cells), a cell directory, or a run's
    output directory (with metrics.jsonl). A path that is none of these is a ValueError naming it."""
    from megatron_gndpo.scaling.state import CELL_JSON, CELLS, DONE, MARKER, read_json

    rows = []
    for path in map(Path, paths):
        if (path / MARKER).is_file():
            sweep = read_json(path / MARKER)["grid"]
            for cell_dir in sorted((path / CELLS).glob("[!.]*")):
                cell = read_json(cell_dir / CELL_JSON) if (cell_dir / CELL_JSON).is_file() else None
                if cell and cell["status"] == DONE:
                    rows.append(run_row(cell_dir / "run", cell, sweep))
        elif (path / CELL_JSON).is_file() and (path / "run" / METRICS).is_file():
            rows.append(run_row(path / "run", read_json(path / CELL_JSON)))
        elif (path / METRICS).is_file():
            rows.append(run_row(path))
        else:
            raise ValueError(f"{path} is neither a sweep directory ({MARKER}), a sweep cell nor a run's output "
                             f"directory ({METRICS})")
    return rows


def columns(rows: List[Dict[str, Any]]) -> List[str]:
    present = {k for r in rows for k in r}
    axes = sorted(k for k in present if k.startswith("axis/"))
    lead = [k for k in LEADING if k in present]
    return lead[:3] + axes + lead[3:] + sorted(present - set(lead) - set(axes))


def write_table(rows: List[Dict[str, Any]], csv_path: Path, parquet_path: Path) -> None:
    """The table as CSV and as parquet (pyarrow), same columns in the same order; missing values empty / null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = columns(rows)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    # mixed int / float columns are stored as float; pyarrow infers the rest from the values
    data = {n: [r.get(n) for r in rows] for n in names}
    for n, values in data.items():
        if any(isinstance(v, float) for v in values):
            data[n] = [None if v is None else float(v) for v in values]
    pq.write_table(pa.table(data), parquet_path)
