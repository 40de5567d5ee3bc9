"""Slurm cells: the sbatch script as written (nodes, processes per node, options, paths), submitted with a
fake ``sbatch`` on PATH, pending until its job writes an exit code, then collected by the next sweep."""

from __future__ import annotations

import json

from megatron_gndpo.scaling.sweep import sweep
from tests.sweep_setup import write_grid

LAUNCH = {"kind": "slurm", "gpus_per_node": 4, "dp": 4, "sbatch": {"partition": "gpu", "time": "02:00:00"}}


def test_sbatch_written_submitted_collected(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, {"layout": {"tp2": {"parallel.tensor_model_parallel_size": 2}}}, launch=LAUNCH)
    out = tmp_path / "out"
    (records,) = sweep(str(grid), out, cwd=tmp_path)
    partial = out / "cells" / ".tp2.partial"
    assert records["status"] == "written" and records["launch"]["gpus"] == 8
    script = (partial / "job.sbatch").read_text()
    for line in ("#SBATCH --job-name=tiny-tp2", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 f"#SBATCH --output={partial / 'log.txt'}", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
                 f"cd {tmp_path}", "--nnodes 2 --nproc-per-node 4", f"--config {partial / 'config.yaml'}",
                 f"echo $status > {partial / 'exit_code'}", '"$head:29500"'):
        assert line in script, line

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/sbatch_args\necho '4242;cluster'\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    (records,) = sweep(str(grid), out, submit=True, cwd=tmp_path)
    assert records["status"] == "submitted" and records["job_id"] == "4242"
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(partial / "job.sbatch")]
    (records,) = sweep(str(grid), out, submit=True, cwd=tmp_path)  # still pending: not submitted twice
    assert records["status"] == "submitted" and len((tmp_path / "sbatch_args").read_text().splitlines()) == 1

    # the job ends: its metrics and exit code appear, the next sweep collects the cell
    (partial / "run").mkdir()
    rows = [{"step": s, "reward": 0.5, "acc": 0.5, "time/step_s": 1.0, "perf/tokens": 10} for s in (1, 2)]
    (partial / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (partial / "exit_code").write_text("0\n")
    (records,) = sweep(str(grid), out, cwd=tmp_path)
    assert records["status"] == "done" and (out / "cells" / "tp2" / "job.sbatch").is_file()


def test_failed_job_collected_and_resubmitted(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, {"algorithm.estimator": ["gndpo"]}, launch=dict(LAUNCH, dp=1))
    out = tmp_path / "out"
    sweep(str(grid), out, cwd=tmp_path)
    partial = out / "cells" / ".gndpo.partial"
    (partial / "log.txt").write_text("srun: error: node7: task 0: Out Of Memory\n")
    (partial / "exit_code").write_text("137\n")
    (records,) = sweep(str(grid), out, cwd=tmp_path)
    assert records["status"] == "written" and records["attempt"] == 2
    failed = json.loads((out / "cells" / "gndpo.failed-1" / "cell.json").read_text())
    assert failed["returncode"] == 137 and "Out Of Memory" in failed["log_tail"]
