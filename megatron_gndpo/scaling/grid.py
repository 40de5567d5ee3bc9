"""A sweep's grid: a base run config, overrides shared by every cell, and axes whose cartesian product are
the cells. An axis is either a dotted config key with a list of values (``algorithm.estimator: [gndpo, opd]``)
or a name with labelled values, each a mapping of dotted keys set together (``student: {small: {model.
hidden_size: 32, ...}}``). Keys under ``launch.`` are the launcher's (``launch.dp``), every other key is a run
config key. Every cell's config is built by ``config.loader`` when the grid is read, so a typo in any key or
value is an error naming the cell before anything launches."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional

import yaml

from megatron_gndpo.config.loader import _build, config_from_dict, load_yaml_with_defaults, set_dotted
from megatron_gndpo.config.schema import RunConfig

LAUNCH_PREFIX = "launch."
CELL_KEYS = ("dp",)  # the launch settings an axis may vary per cell


@dataclass
class LaunchConfig:
    """How each cell is started (``launch:`` in the grid file)."""

    kind: Literal["local", "slurm"] = "local"
    """``local``: the sweep runs each cell in turn and waits; ``slurm``: it writes an sbatch script per cell
    (submitted with ``sweep --submit``)."""
    dp: int = 1
    """Data-parallel size: a cell uses TP x PP x DP processes (GPUs)."""
    gpus_per_node: int = 8
    """Slurm: processes per node; a cell of more GPUs spans ceil(GPUs / gpus_per_node) nodes."""
    template: Optional[str] = None
    """A launch-script template (path relative to the grid file) instead of the kind's default
    (``launch.py``: ``LOCAL_TEMPLATE``, ``SLURM_TEMPLATE``)."""
    sbatch: Dict[str, Any] = field(default_factory=dict)
    """Slurm: extra ``#SBATCH --key=value`` lines (partition, account, time, ...)."""

    def __post_init__(self):
        if self.dp < 1 or self.gpus_per_node < 1:
            raise ValueError(f"launch.dp and launch.gpus_per_node must be >= 1, got {self.dp}, {self.gpus_per_node}")


@dataclass
class PlanConfig:
    """The planner's estimate recorded beside each cell (``plan:`` in the grid file)."""

    gpu: Optional[str] = "h100"
    """The GPU the estimate is for (a key of ``planning.hardware.GPUS``); null: no estimate."""


@dataclass
class Cell:
    """One run of the grid."""

    name: str
    """Directory name: the cell's value labels joined by '-' in axis order."""
    labels: Dict[str, str]
    """Axis name -> the label of this cell's value."""
    settings: Dict[str, Any]
    """Dotted key -> value: the shared overrides, then this cell's axis values."""
    tree: Dict[str, Any]
    """The run config as a nested mapping (before ``trainer.output_dir`` is set to the cell's directory)."""
    config: RunConfig
    """The tree built and checked by the loader."""
    launch: LaunchConfig
    """The grid's launch settings with this cell's ``launch.*`` values."""

    @property
    def tp(self) -> int:
        return self.config.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.config.parallel.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.config.parallel.context_parallel_size

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.launch.dp


@dataclass
class Grid:
    name: str
    path: Path
    base: Dict[str, Any]
    overrides: Dict[str, Any]
    axes: Dict[str, Dict[str, Dict[str, Any]]]
    """Axis name -> value label -> the dotted keys it sets."""
    launch: LaunchConfig
    plan: PlanConfig


def _label(value: Any) -> str:
    """A value as a file-name-safe label ('1e-05' for 1e-05, 'null' for None)."""
    text = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", text.strip()).strip("_") or "_"


def _axis(name: str, values: Any, where: str) -> Dict[str, Dict[str, Any]]:
    if isinstance(values, list) and values:
        labelled = [(_label(v), {name: v}) for v in values]
    elif isinstance(values, Mapping) and values and all(isinstance(v, Mapping) for v in values.values()):
        labelled = [(_label(label), dict(keys)) for label, keys in values.items()]
    else:
        raise ValueError(f"{where}: axis {name} must be a non-empty list of values (of the dotted key {name}) or "
                         "a mapping label -> {dotted.key: value, ...}")
    labels = [label for label, _ in labelled]
    if len(set(labels)) < len(labels):
        raise ValueError(f"{where}: axis {name} has values with the same label ({', '.join(labels)}); cells are "
                         "named by their labels: give the values distinct ones (a mapping label -> keys)")
    return dict(labelled)


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (``docs/scaling.md``); paths in it are relative to the file."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"name", "config", "base", "overrides", "axes", "launch", "plan"}
    if not isinstance(raw, Mapping) or set(raw) - known:
        raise ValueError(f"{path}: a grid is a mapping of {sorted(known)}; unknown: {sorted(set(raw) - known)}")
    base = load_yaml_with_defaults(path.parent / raw["config"]) if raw.get("config") else {}
    axes = {name: _axis(name, values, str(path)) for name, values in (raw.get("axes") or {}).items()}
    launch = _build(LaunchConfig, raw.get("launch") or {}, "launch")
    if launch.template:
        launch.template = str(path.parent / launch.template)
    return Grid(name=str(raw.get("name") or path.stem), path=path, base={**base, **(raw.get("base") or {})},
                overrides=dict(raw.get("overrides") or {}), axes=axes, launch=launch,
                plan=_build(PlanConfig, raw.get("plan") or {}, "plan"))


def cell_config(grid: Grid, settings: Mapping[str, Any]) -> tuple:
    """(run config tree, RunConfig, LaunchConfig) of one cell's settings; raises ValueError naming the key."""
    tree = copy.deepcopy(grid.base)
    launch = copy.deepcopy(grid.launch)
    for key, value in settings.items():
        if key.startswith(LAUNCH_PREFIX):
            name = key[len(LAUNCH_PREFIX):]
            if name not in CELL_KEYS:
                raise ValueError(f"{key}: a cell may set only {', '.join(LAUNCH_PREFIX + k for k in CELL_KEYS)}")
            setattr(launch, name, value)
        else:
            set_dotted(tree, key, value)
    launch.__post_init__()
    return tree, config_from_dict(tree), launch


def expand(grid: Grid) -> List[Cell]:
    """Every cell, axes varying fastest last (the order the grid file lists them); each cell's config checked."""
    cells = []
    names = list(grid.axes)
    for combination in itertools.product(*(grid.axes[n].items() for n in names)):
        labels = {axis: label for axis, (label, _) in zip(names, combination)}
        settings = dict(grid.overrides)
        for _, keys in combination:
            settings.update(keys)
        name = "-".join(labels.values()) or "base"
        try:
            tree, cfg, launch = cell_config(grid, settings)
        except ValueError as e:
            raise ValueError(f"{grid.path}: cell {name}: {e}") from None
        cells.append(Cell(name=name, labels=labels, settings=settings, tree=tree, config=cfg, launch=launch))
    seen: Dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise ValueError(f"{grid.path}: two cells are both named {cell.name} ({seen[cell.name].labels} and "
                             f"{cell.labels}); give the axes' values distinct labels")
        seen[cell.name] = cell
    return cells
