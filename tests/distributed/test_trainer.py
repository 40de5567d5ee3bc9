"""The trainer end to end on tiny models: parallel invariance of whole steps, exact resume, crash-safe
saves, bad inputs, and what a run reports (rollout-vs-trainer log-probs, metrics
per data source, JSONL dumps, log lines once)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.harness import run_distributed
from tests.trainer_setup import make_initial_checkpoints, run_config

pytestmark = pytest.mark.distributed

COMPARED = ("actor/policy_loss", "actor/grad_norm", "score/mean", "score/std", "adv/max", "reward",
            "response/length_mean", "response/length_min", "prompt/length_mean", "prompt/length_max",
            "prompt/length_min", "estimator/valid_tokens")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    run_distributed(make_initial_checkpoints, 1, args=(str(tmp),))
    return tmp


def _config(tmp, overrides=(), **sections):
    tmp = Path(tmp)
    return run_config(tmp, overrides, student_checkpoint=str(tmp / "student"),
                      teacher={"checkpoint": str(tmp / "teacher")}, **sections)


def _trainer(groups, cfg, resume=False):
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
    return Trainer(cfg, resume=resume)


def _weights(trainer):
    from megatron_gndpo.models.weights import gather_global_weights

    return gather_global_weights(trainer.student.module)


def _steps(groups, tmp, tp, pp, steps):
    cfg = _config(tmp, [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                        f"trainer.output_dir={tmp}/run_{tp}{pp}"])
    trainer = _trainer(groups, cfg)
    metrics = [trainer.train_step() for _ in range(steps)]
    out = {"metrics": metrics if trainer.is_logging_rank else None, "weights": _weights(trainer)}
    trainer.close(destroy_process_group=False)  # the single-process reference and DP=2 share run_11
    return out


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_two_steps_match_single_process(workdir, tp, pp, dp):
    """Same data and seeds: sampled responses, losses, statistics and updated weights equal the
    single-process run (float32; tolerance 2e-5 on weights after two Adam steps of lr 1e-3). The
    sampler's own log-probs of its tokens equal the trainer's recomputed ones up to rounding."""
    ref = run_distributed(_steps, 1, args=(str(workdir), 1, 1, 2))[0]
    out = run_distributed(_steps, tp * pp * dp, tp=tp, pp=pp, args=(str(workdir), tp, pp, 2))
    got = next(o["metrics"] for o in out if o["metrics"] is not None)
    for step, (r, g) in enumerate(zip(ref["metrics"], got)):
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (step, key)
        for m in (r, g):
            assert 0 <= m["rollout/logprob_diff_mean"] <= m["rollout/logprob_diff_max"] < 1e-4, (step, m)
            assert m["rollout/logprob_diff_std"] < 1e-4
            assert m["response/length_min"] <= m["response/length_mean"] <= m["response/length_max"]
            assert 0.1 < m["memory/peak_rss_gib"] < 20  # the logging rank's own peak, for the scaling report
    for key, w in ref["weights"].items():
        torch.testing.assert_close(out[0]["weights"][key], w, rtol=0, atol=2e-5, msg=key)
    assert ref["metrics"][1]["actor/grad_norm"] > 0


def _resume_run(groups, tmp, mode, cp=1):
    cfg = _config(tmp, [f"trainer.output_dir={tmp}/resume_{mode}_cp{cp}", "trainer.steps=4",
                        f"parallel.context_parallel_size={cp}"])
    if mode == "straight":
        trainer = _trainer(groups, cfg)
        trainer.train()
    else:
        trainer = _trainer(groups, cfg)
        trainer.train_step()
        trainer.train_step()
        trainer.save()
        del trainer  # "crash" after the step-2 checkpoint
        trainer = _trainer(groups, cfg, resume=True)
        assert trainer.step == 2
        trainer.train()
    return _weights(trainer)


@pytest.mark.parametrize("cp", [1, 2])
def test_resume_is_exact(workdir, cp):
    """Also with context parallelism: its ranks hold copies of the RNG state, written once."""
    straight = run_distributed(_resume_run, cp, args=(str(workdir), "straight", cp))[0]
    resumed = run_distributed(_resume_run, cp, args=(str(workdir), "resumed", cp))[0]
    for key, w in straight.items():
        assert torch.equal(resumed[key], w), key


def _interrupted_save(groups, tmp):
    from megatron.core import dist_checkpointing

    from megatron_gndpo.checkpoint.dist_ckpt import CheckpointManager

    cfg = _config(tmp, [f"trainer.output_dir={tmp}/interrupted", "trainer.steps=3"])
    trainer = _trainer(groups, cfg)
    trainer.train_step()
    trainer.save()
    saved = _weights(trainer)
    trainer.train_step()
    real_save = dist_checkpointing.save

    def dies_midway(state, path, *args, **kwargs):
        (Path(path) / "partial.distcp").write_bytes(b"\0" * 128)
        raise KeyboardInterrupt("killed during save")

    dist_checkpointing.save = dies_midway
    try:
        trainer.save()
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    manager: CheckpointManager = trainer.checkpoints
    left_over = sorted(p.name for p in manager.root.iterdir())
    latest = manager.latest().name
    resumed = _trainer(groups, cfg, resume=True)
    step_after_resume = resumed.step
    weights = _weights(resumed)
    resumed.train_step()
    resumed.save()
    final = sorted(p.name for p in manager.root.iterdir())
    return left_over, latest, step_after_resume, all(torch.equal(weights[k], saved[k]) for k in saved), final


def test_interrupted_save_leaves_previous_checkpoint(workdir):
    left_over, latest, step, same, final = run_distributed(_interrupted_save, 1, args=(str(workdir),))[0]
    assert "step_00000002.tmp" in left_over and latest == "step_00000001"
    assert step == 1 and same
    assert "step_00000002.tmp" not in final and "step_00000002" in final


def _poisoned_step(groups, tmp):
    import megatron_gndpo.models.student as student_module

    cfg = _config(tmp, [f"trainer.output_dir={tmp}/nan", "trainer.mini_batches=1"])
    trainer = _trainer(groups, cfg)
    real = student_module.run_schedule
    calls = {"train": 0}

    def poison(model, microbatches, **kwargs):
        out = real(model, microbatches, **kwargs)
        if not kwargs["forward_only"]:
            calls["train"] += 1
            if calls["train"] == 1:
                next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)[0] = float("nan")
        return out

    with mock.patch.object(student_module, "run_schedule", poison):
        before = _weights(trainer)
        first = trainer.train_step()
        after_first = _weights(trainer)
        second = trainer.train_step()
        after_second = _weights(trainer)
    unchanged = all(torch.equal(before[k], after_first[k]) for k in before)
    moved = any(not torch.equal(after_first[k], after_second[k]) for k in before)
    return first["actor/skipped_steps"], second["actor/skipped_steps"], unchanged, moved


def test_non_finite_gradients_skip_the_step(workdir):
    skipped_1, skipped_2, unchanged, moved = run_distributed(_poisoned_step, 1, args=(str(workdir),))[0]
    assert (skipped_1, skipped_2) == (1.0, 1.0)
    assert unchanged and moved


def _empty_step(groups, tmp):
    import megatron_gndpo.trainer.step as step_module
    import megatron_gndpo.trainer.trainer as trainer_module
    from megatron_gndpo.rollout.generator import Rollout

    def nothing(model, prompts, rows, params, **kwargs):
        tokens = torch.zeros((len(prompts), max(map(len, prompts))), dtype=torch.long)
        zeros = torch.zeros(len(prompts), dtype=torch.long)
        return Rollout(tokens, torch.tensor([len(p) for p in prompts]), zeros, zeros.bool())

    trainer = _trainer(groups, _config(tmp, [f"trainer.output_dir={tmp}/empty"]))
    try:
        with mock.patch.object(step_module, "rollout_engine", lambda continuous_batching, decode_slots: nothing):
            trainer.train_step()
    except trainer_module.EmptyStepError as e:
        return str(e)
    return None


def test_all_empty_responses_is_a_clear_error(workdir):
    msg = run_distributed(_empty_step, 2, args=(str(workdir),))[0]
    assert msg is not None and "every response" in msg and "step 1" in msg


def _one_step_saved(groups, tmp):
    cfg = _config(tmp, [f"trainer.output_dir={tmp}/export"])
    trainer = _trainer(groups, cfg)
    trainer.train_step()
    path = trainer.save()
    return str(path), _weights(trainer), dataclasses.asdict(cfg.model)


def _export(groups, ckpt, out):
    from megatron_gndpo.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(ckpt, out, family="llama")


def test_training_checkpoint_exports_to_hf(workdir):
    """A checkpoint the trainer wrote (model + optimizer + RNG state) exports to HF with the trained weights."""
    from safetensors.torch import load_file

    from megatron_gndpo.checkpoint.hf_mapping import global_to_hf
    from megatron_gndpo.config.schema import ModelConfig

    ckpt, weights, arch = run_distributed(_one_step_saved, 1, args=(str(workdir),))[0]
    out = Path(workdir) / "export_hf"
    run_distributed(_export, 1, args=(ckpt, str(out)))
    exported = {}
    for name in out.glob("*.safetensors"):
        exported.update(load_file(str(name)))
    expected = global_to_hf(weights, ModelConfig(**arch))
    assert set(exported) == set(expected)
    for k, v in expected.items():
        assert torch.equal(exported[k], v), k


# --- what a run reports --------------------------------------------------------------------------------

def _reporting_run(groups, tmp):
    import logging

    import torch.distributed as dist

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    logging.getLogger("megatron_gndpo").setLevel(logging.INFO)
    logging.getLogger("megatron_gndpo").addHandler(Keep(level=logging.INFO))
    out = Path(tmp) / "reporting"
    cfg = run_config(Path(tmp), [f"trainer.output_dir={out}", "trainer.steps=1", "trainer.val_interval=1",
                                 "trainer.dump_rollouts=true", "trainer.dump_validation=true",
                                 f"data.val_files=[{tmp}/two_sources.parquet]"],
                     student_checkpoint=str(Path(tmp) / "student"))  # no teacher.checkpoint: a random teacher
    trainer = _trainer(groups, cfg)
    trainer.train()
    dist.barrier()  # rank 0 reads what the logging rank wrote
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dumps = {p.relative_to(out).as_posix(): [json.loads(line) for line in p.read_text().splitlines()]
             for p in sorted(out.glob("*/step_*.jsonl"))}
    return {"rank": dist.get_rank(), "records": records, "rows": rows, "dumps": dumps}


def test_a_run_reports_per_source_validation_dumps_and_logs_once(workdir):
    """Two data-parallel ranks, one step, validation before and after on prompts of two data sources:
    val/<source>/* average to val/*; rollouts and validation generations are dumped, every response
    once, in row order; the teacher-without-checkpoint notice is one INFO line from rank 0."""
    from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

    write_prompt_parquet(str(Path(workdir) / "two_sources.parquet"), [
        verl_row([{"role": "user", "content": f"{a}+{a % 7}="}], str(a + a % 7),
                 data_source="alpha" if a % 3 else "beta") for a in range(8)])
    out = run_distributed(_reporting_run, 2, args=(str(workdir),))
    rows = out[0]["rows"]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        n = {"alpha": 5, "beta": 3}
        for key in ("acc", "reward"):
            mixed = sum(row[f"val/{s}/{key}"] * n[s] for s in n) / 8
            assert mixed == pytest.approx(row[f"val/{key}"], abs=1e-12)
    train = rows[1]
    for key in ("prompt/length_mean", "prompt/length_max", "prompt/length_min", "response/length_min",
                "rollout/logprob_diff_max", "rollout/logprob_diff_mean", "rollout/logprob_diff_std", "perf/tokens"):
        assert key in train, key

    dumps = out[0]["dumps"]
    assert sorted(dumps) == ["rollouts/step_1.jsonl", "validation/step_0.jsonl", "validation/step_1.jsonl"]
    rollouts = dumps["rollouts/step_1.jsonl"]
    assert [r["row"] for r in rollouts] == list(range(16))  # 4 prompts x 4 samples, both ranks' shares
    for r in rollouts:
        assert {"prompt", "response", "reward", "acc", "format", "data_source", "ground_truth"} <= set(r)
        assert "+" in r["prompt"] and r["data_source"] == "test"
        summary = r["log_ratio"]
        assert summary is None or summary["min"] <= summary["mean"] <= summary["max"]
    assert any(r["log_ratio"] is not None for r in rollouts)
    assert sum(r["reward"] for r in rollouts) / 16 == pytest.approx(train["reward"], abs=1e-6)
    for name in ("validation/step_0.jsonl", "validation/step_1.jsonl"):
        val = dumps[name]
        assert [r["row"] for r in val] == list(range(8))
        assert [r["data_source"] for r in val] == ["beta" if a % 3 == 0 else "alpha" for a in range(8)]
    assert sum(r["acc"] for r in dumps["validation/step_1.jsonl"]) / 8 == pytest.approx(train["val/acc"], abs=1e-12)

    notices = {o["rank"]: [r for r in o["records"] if "teacher.checkpoint is not set" in r[1]] for o in out}
    assert [level for level, _ in notices[0]] == ["INFO"] and notices[1] == []
