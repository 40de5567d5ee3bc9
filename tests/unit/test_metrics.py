"""output_dir holds one run's metrics: a resumed run continues its history without the steps it
redoes; a fresh run never appends to an earlier run's."""

import json

from megatron_gndpo.trainer.metrics import MetricsWriter


def _writer(out, start_step, tensorboard=False):
    return MetricsWriter(str(out), total_steps=10, start_step=start_step, tensorboard=tensorboard,
                         wandb_project=None, progress=False, config={})


def _run(out, start_step, steps, value, tensorboard=False):
    w = _writer(out, start_step, tensorboard)
    for step in steps:
        w.log(step, {"loss": value})
    w.close()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fresh_run_sets_an_earlier_run_aside(tmp_path):
    _run(tmp_path, 0, [1, 2, 3], 1.0, tensorboard=True)
    _run(tmp_path, 0, [1, 2], 2.0, tensorboard=True)
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 2.0}]
    (aside,) = tmp_path.glob("previous_run_*")
    assert [r["step"] for r in _rows(aside / "metrics.jsonl")] == [1, 2, 3]
    assert any((aside / "tensorboard").iterdir())


def test_resumed_run_drops_the_steps_it_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, 0, [1, 2, 3, 4], 1.0, tensorboard=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    _run(tmp_path, 2, [3], 2.0, tensorboard=True)  # resumed from the step-2 checkpoint
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
                                                  {"step": 3, "loss": 2.0}]
    assert not list(tmp_path.glob("previous_run_*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 1.0), (3, 2.0)]
