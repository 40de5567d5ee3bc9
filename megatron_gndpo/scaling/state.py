"""The sweep directory and the state of each cell in it.

    DIR/sweep.json              marks DIR as this grid's output (schema, grid name, cells)
    DIR/grid.yaml               the grid file of the latest invocation
    DIR/.lock                   held while a sweep runs in DIR
    DIR/cells/NAME/             a finished cell (renamed from its partial directory once complete)
    DIR/cells/NAME.failed-K/    the K-th failed (or interrupted) attempt, kept as it was
    DIR/cells/.NAME.partial/    an attempt in progress: running here, or a Slurm script written / submitted

Each cell directory holds ``cell.json`` (status, settings, launch, plan and measured figures), ``config.yaml``
(the run's resolved config), ``plan.json``, the launch script, ``log.txt``, ``exit_code`` and ``run/`` (the
run's ``trainer.output_dir``). Nothing here deletes a file: a failed attempt is renamed, never removed.
"""

from __future__ import annotations

import fcntl
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

SCHEMA = "megatron-gndpo.sweep/1"
MARKER, GRID_COPY, LOCK, CELLS = "sweep.json", "grid.yaml", ".lock", "cells"
CELL_JSON = "cell.json"

DONE, FAILED, RUNNING, WRITTEN, SUBMITTED, INTERRUPTED = \
    "done", "failed", "running", "written", "submitted", "interrupted"


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Written beside and renamed over, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def check_out_dir(out: Path, grid_name: str) -> None:
    """Refuse (ValueError naming the path) an ``out`` that holds anything but this grid's own sweep output:
    a non-empty directory without ``sweep.json``, a ``sweep.json`` of another grid, or a foreign entry."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is not a directory")
    # a lone .lock: a sweep stopped before it wrote its marker
    entries = sorted(e for e in out.iterdir() if e.name != LOCK)
    if not entries:
        return
    marker = out / MARKER
    if not marker.is_file():
        raise ValueError(f"--out {out} is not a sweep's output (no {MARKER}) and holds {entries[0]}; choose "
                         "another directory")
    found = read_json(marker)
    if found.get("schema") != SCHEMA or found.get("grid") != grid_name:
        raise ValueError(f"{marker} belongs to sweep {found.get('grid')!r}, not {grid_name!r}; choose another --out")
    for entry in entries:
        if entry.name not in (MARKER, GRID_COPY, CELLS):
            raise ValueError(f"{entry} is not part of a sweep's output; move it or choose another --out")
    for entry in sorted((out / CELLS).iterdir()) if (out / CELLS).is_dir() else []:
        if not (entry.is_dir() and (entry / CELL_JSON).is_file()):
            raise ValueError(f"{entry} is not a sweep cell (no {CELL_JSON}); move it or choose another --out")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Held for the whole sweep: two sweeps in one directory would launch the same cells twice."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another sweep is running in {out} (it holds {out / LOCK})") from None
        yield


class CellDirs:
    """Where a cell's attempts live under ``DIR/cells``."""

    def __init__(self, out: Path, name: str):
        self.root, self.name = out / CELLS, name

    @property
    def done(self) -> Path:
        return self.root / self.name

    @property
    def partial(self) -> Path:
        return self.root / f".{self.name}.partial"

    def failed(self) -> List[Path]:
        """Earlier failed attempts, oldest first."""
        pattern = re.compile(re.escape(self.name) + r"\.failed-(\d+)$")
        found = [(int(m.group(1)), p) for p in self.root.glob(f"{self.name}.failed-*")
                 if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def next_failed(self) -> Path:
        return self.root / f"{self.name}.failed-{len(self.failed()) + 1}"


def read_cell(path: Path) -> Optional[Dict[str, Any]]:
    return read_json(path / CELL_JSON) if (path / CELL_JSON).is_file() else None


def exit_code(path: Path) -> Optional[int]:
    """The status the launch script wrote (None: the run has not ended, or died with its script)."""
    text = (path / "exit_code").read_text().strip() if (path / "exit_code").is_file() else ""
    return int(text) if text.lstrip("-").isdigit() else None
