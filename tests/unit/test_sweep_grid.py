"""Grid expansion: the cartesian product of the axes, labels and names, every cell's config built by the
loader (a typo in an axis key is an error before anything launches), launch settings per cell."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_gndpo.scaling.grid import expand, load_grid
from megatron_gndpo.scaling.sweep import sweep
from tests.sweep_setup import write_grid

REPO = Path(__file__).resolve().parents[2]

AXES = {"student": {"small": {"model.hidden_size": 32}, "wide": {"model.hidden_size": 64,
                                                                 "model.intermediate_size": 128}},
        "algorithm.estimator": ["gndpo", "opd"], "optim.lr": [1e-3]}


def test_cartesian_product(tmp_path):
    cells = expand(load_grid(write_grid(tmp_path, AXES, overrides={"trainer.steps": 3})))
    assert [c.name for c in cells] == ["small-gndpo-0.001", "small-opd-0.001", "wide-gndpo-0.001", "wide-opd-0.001"]
    wide_opd = cells[3]
    assert wide_opd.labels == {"student": "wide", "algorithm.estimator": "opd", "optim.lr": "0.001"}
    assert (wide_opd.config.model.hidden_size, wide_opd.config.model.intermediate_size) == (64, 128)
    assert wide_opd.config.algorithm.estimator == "opd" and wide_opd.config.optim.lr == 1e-3
    assert wide_opd.config.model.num_hidden_layers == 2  # from the base
    assert all(c.config.trainer.steps == 3 for c in cells)  # the shared overrides
    assert cells[0].config.model.intermediate_size == 64  # a cell's keys do not leak into the next


def test_layout_axis_sets_processes(tmp_path):
    axes = {"layout": {"tp2": {"parallel.tensor_model_parallel_size": 2},
                       "pp2dp2": {"parallel.pipeline_model_parallel_size": 2, "launch.dp": 2}}}
    cells = expand(load_grid(write_grid(tmp_path, axes)))
    assert [(c.tp, c.pp, c.launch.dp, c.gpus) for c in cells] == [(2, 1, 1, 2), (1, 2, 2, 4)]


@pytest.mark.parametrize("axes, message", [
    ({"trainer.stpes": [1, 2]}, "unknown config key trainer.stpes"),
    ({"student": {"a": {"model.hidden_size": "wide"}}}, "model.hidden_size must be int"),
    ({"layout": {"tp3": {"parallel.tensor_model_parallel_size": 3}}}, "divisible"),
    ({"x": {"a": {"launch.nodes": 2}}}, "a cell may set only launch.dp"),
])
def test_mistakes_refused_before_launch(tmp_path, axes, message):
    grid = write_grid(tmp_path, axes)
    with pytest.raises(ValueError, match=message) as info:
        sweep(str(grid), tmp_path / "out")
    assert "cell " in str(info.value) or "launch" in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "calls.txt").exists()


def test_duplicate_names_refused(tmp_path):
    with pytest.raises(ValueError, match="same label"):
        expand(load_grid(write_grid(tmp_path, {"optim.lr": [0.5, "0.5"]})))


@pytest.mark.parametrize("name, cells", [("demo_scaling", 8), ("geo3k_paper", 18)])
def test_example_grids_expand(name, cells):
    grid = load_grid(REPO / "examples" / "sweeps" / f"{name}.yaml")
    assert len(expand(grid)) == cells
