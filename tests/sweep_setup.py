"""Tiny grids for the sweep and report tests: the trainer tests' run config (``trainer_setup.tree``) as a base
file, and a fake trainer that writes a metrics.jsonl without training (so a cell takes milliseconds)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from tests.trainer_setup import tree

# Stands in for `megatron_gndpo.train`: one row per step of the config's trainer.steps, a validation row every
# other step; exits 3 when FAKE_FAIL names a substring of its output_dir. Counts its launches in calls.txt.
FAKE_TRAIN = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path
    import yaml
    cfg = yaml.safe_load(open(sys.argv[1]))
    out = Path(cfg["trainer"]["output_dir"])
    with open(Path(sys.argv[2]) / "calls.txt", "a") as f:
        f.write(out.parent.name + "\\n")
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in str(out):
        print("fake trainer: CUDA out of memory (simulated)", file=sys.stderr)
        sys.exit(3)
    out.mkdir(parents=True)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, cfg["trainer"]["steps"] + 1):
            row = {"step": step, "reward": step / 10, "acc": step / 20, "perf/tokens": 100.0,
                   "time/rollout_s": 0.1, "time/train_s": 0.2, "time/step_s": 0.5, "val/acc": step / 30}
            f.write(json.dumps(row) + "\\n")
    """)


def write_grid(tmp: Path, axes: dict, launch: dict | None = None, **extra) -> Path:
    """A grid over ``tests.trainer_setup``'s config in ``tmp`` (base.yaml, grid.yaml); a fake-trainer
    template unless ``launch`` names one."""
    (tmp / "base.yaml").write_text(yaml.safe_dump(tree(tmp)))
    (tmp / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp / "fake.sh").write_text(f"cd {{cwd}}\n{{python}} {tmp / 'fake_train.py'} {{config}} {tmp}\n"
                                 "status=$?; echo $status > {exit_file}; exit $status\n")
    grid = {"name": "tiny", "config": "base.yaml", "axes": axes,
            "launch": launch if launch is not None else {"template": "fake.sh"}, **extra}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
