"""A cell's launch script, rendered from a template, and running (local) or submitting (Slurm) it.

A template is a bash script with ``{placeholder}`` fields (lower-case names; ``${VAR}`` and ``$VAR`` are
left to bash):

- ``{job_name}``: ``<grid>-<cell>``; ``{cwd}``: the directory the sweep was started in (relative paths of
  the run config are relative to it, as for ``megatron-gndpo train``); ``{python}``: this interpreter;
- ``{config}``: the cell's ``config.yaml``; ``{log}``: its ``log.txt``; ``{exit_file}``: where the script
  writes the run's exit status (what a later ``sweep`` reads to know a Slurm job ended);
- ``{nodes}``, ``{nproc_per_node}``, ``{gpus}``: GPUs = TP x PP x DP = nodes x nproc_per_node;
- ``{sbatch_options}``: ``#SBATCH --key=value`` lines from the grid's ``launch.sbatch``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from megatron_gndpo.scaling.grid import Cell, Grid

LOCAL_TEMPLATE = """\
#!/bin/bash
# {job_name}: one cell of a megatron-gndpo sweep, run on this machine
cd {cwd}
{python} -m torch.distributed.run --standalone --nproc-per-node {nproc_per_node} \\
    -m megatron_gndpo.train --config {config}
status=$?
echo $status > {exit_file}
exit $status
"""

SLURM_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc_per_node}
#SBATCH --output={log}
{sbatch_options}
# one cell of a megatron-gndpo sweep: one torchrun per node, rendezvous on the first node
cd {cwd}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes {nodes} --nproc-per-node {nproc_per_node} --rdzv-id "$SLURM_JOB_ID" \\
    --rdzv-backend c10d --rdzv-endpoint "$head:29500" -m megatron_gndpo.train --config {config}
status=$?
echo $status > {exit_file}
exit $status
"""

SCRIPT = {"local": "launch.sh", "slurm": "job.sbatch"}


@dataclass
class Finished:
    """A local run's exit status and the peak resident memory of its largest process."""

    returncode: int
    peak_rss_gib: float


def geometry(cell: Cell) -> Dict[str, int]:
    """GPUs, nodes and processes per node of a cell (local: one node)."""
    gpus = cell.gpus
    if cell.launch.kind == "local":
        return {"gpus": gpus, "nodes": 1, "nproc_per_node": gpus}
    per_node = min(gpus, cell.launch.gpus_per_node)
    if gpus % per_node:
        raise ValueError(f"cell {cell.name}: {gpus} GPUs do not fill whole nodes of {per_node}")
    return {"gpus": gpus, "nodes": math.ceil(gpus / per_node), "nproc_per_node": per_node}


def render(template: str, fields: Dict[str, object]) -> str:
    """``template`` with its ``{name}`` fields replaced; an unknown lower-case name is an error (a typo would
    otherwise reach bash as literal text)."""
    def field(m: re.Match) -> str:
        if m.group(1) not in fields:
            raise ValueError(f"launch template: unknown field {{{m.group(1)}}} (known: {', '.join(sorted(fields))})")
        return str(fields[m.group(1)])
    return re.sub(r"(?<!\$)\{([a-z_]+)\}", field, template)


def write_script(grid: Grid, cell: Cell, cell_dir: Path, cwd: Path) -> Path:
    """The cell's launch script in ``cell_dir`` (executable)."""
    launch = cell.launch
    template = Path(launch.template).read_text() if launch.template else \
        (LOCAL_TEMPLATE if launch.kind == "local" else SLURM_TEMPLATE)
    paths = {"cwd": cwd, "python": sys.executable, "config": cell_dir / "config.yaml", "log": cell_dir / "log.txt",
             "exit_file": cell_dir / "exit_code"}
    fields = {**geometry(cell), **{k: shlex.quote(str(v)) for k, v in paths.items()},
              "job_name": f"{grid.name}-{cell.name}",
              "sbatch_options": "\n".join(f"#SBATCH --{k}={v}" for k, v in launch.sbatch.items())}
    script = cell_dir / SCRIPT[launch.kind]
    script.write_text(render(template, fields))
    script.chmod(0o755)
    return script


def run_local(script: Path, log: Path, cwd: Path) -> Finished:
    """Run ``script`` to its end, output to ``log``. Its process group is ours: an interrupt (Ctrl-C) stops
    it and is raised again, leaving the cell to be found interrupted by the next sweep."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
        try:
            # wait4, not wait: its rusage covers the script's reaped descendants (torchrun and its workers)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(proc.returncode, usage.ru_maxrss * 1024 / 2**30)  # ru_maxrss is in KiB on Linux


def submit(script: Path) -> str:
    """``sbatch --parsable script`` -> the job id (raises when sbatch fails or is missing)."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch is not on PATH: submit the written scripts from a Slurm login node") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"sbatch {script} failed: {e.stderr.strip()}") from None
    return out.stdout.strip().split(";")[0]


def log_tail(log: Path, lines: int = 20) -> Optional[str]:
    """The last ``lines`` lines of a log (None when there is none)."""
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))  # the tail of a long log, not all of it
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
