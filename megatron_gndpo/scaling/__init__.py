"""Scaling studies: ``megatron-gndpo sweep`` runs a grid of training runs, ``megatron-gndpo report`` tells
what scaled (see ``docs/scaling.md``).

- ``grid.py``: a grid file -> its cells (cartesian product of the axes), each cell's config checked by the loader;
- ``estimate.py``: the planner's estimate of one cell (``planning``'s API on the cell's resolved config);
- ``launch.py``: launch scripts from templates (local ``torchrun``, Slurm ``sbatch``) and running / submitting them;
- ``state.py``: the sweep directory: what belongs to it, a cell's attempts, done / failed / pending;
- ``sweep.py``: the ``sweep`` subcommand;
- ``runs.py``: a run's metrics.jsonl summarised, and the report table (CSV, parquet);
- ``plots.py``: the report's PNG figures; ``html.py``: the page that shows them;
- ``report.py``: the ``report`` subcommand.
"""
