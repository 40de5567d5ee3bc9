"""GNDPO training with images end to end: a tiny random InternVL student and teacher (transformers configs,
converted in the test), a parquet of prompts with PNG images made with Pillow (nothing downloaded), the
trainer at several layouts, a checkpoint saved, resumed and exported; the same steps with Qwen2.5-VL."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.test_vlm_convert import VOCAB, _safetensors, _save_hf
from tests.harness import run_distributed
from tests.unit.test_vision_data import _png

pytestmark = pytest.mark.distributed

COMPARED = ("actor/policy_loss", "actor/grad_norm", "score/mean", "score/std", "reward", "response/length_mean",
            "prompt/length_mean", "prompt/length_max", "estimator/valid_tokens")
PROJECTOR = "multi_modal_projector.linear_1.weight"


def _prepare(groups, tmp, family="internvl"):
    """Student and teacher converted (test_vlm_convert's directories, the teacher perturbed), and 4 prompts:
    images of different sizes (InternVL: 1 and 3 tiles), two images in one row, text only."""
    from megatron_gndpo.checkpoint import convert
    from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

    tmp = Path(tmp)
    for name, seed in (("student", 0), ("teacher", 1)):
        _save_hf(tmp / f"hf_{name}", family, seed, max_shard_size="5GB")
        convert.hf_to_megatron(str(tmp / f"hf_{name}"), str(tmp / name))
    def row(content, truth, *images):
        return verl_row([{"role": "user", "content": content}], truth, data_source="t",
                        images=[{"bytes": _png(h, w, seed)} for seed, (h, w) in enumerate(images)])

    rows = [row("<image>x?", "1", (28, 28)), row("<image>y?", "2", (28, 56)),
            row("<image>a<image>b", "3", (28, 28), (56, 28)), row("no image", "4")]
    write_prompt_parquet(str(tmp / "train.parquet"), rows)

    # a text checkpoint (the student's language model alone) cannot take images: refused when the run opens it
    from megatron_gndpo.trainer.setup import _check_initial_checkpoints

    shutil.copytree(tmp / "student", tmp / "text")
    meta = json.loads((tmp / "text" / "gndpo_meta.json").read_text())
    del meta["vision"]
    (tmp / "text" / "gndpo_meta.json").write_text(json.dumps(meta))
    cfg = _config(tmp, "unused")
    for field, bad in (("student_checkpoint", dict(student_checkpoint=str(tmp / "text"))),
                       ("teacher.checkpoint", dict(teacher=dataclasses.replace(cfg.teacher,
                                                                               checkpoint=str(tmp / "text"))))):
        with pytest.raises(ValueError, match=f"data.images=process needs a vision-language {field}.*no vision tower"):
            _check_initial_checkpoints(dataclasses.replace(cfg, **bad))
    with pytest.raises(ValueError, match="student_checkpoint .* is a vision-language checkpoint: set "
                                         "data.images=process .*not 'ignore'"):
        _check_initial_checkpoints(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, images="ignore")))


def _config(tmp: Path, run: str, tp: int = 1, pp: int = 1):
    from megatron_gndpo.config.loader import config_from_dict

    return config_from_dict({
        "seed": 3, "student_checkpoint": str(tmp / "student"),
        "teacher": {"checkpoint": str(tmp / "teacher")},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "precision": {"params_dtype": "float32", "transformer_impl": "local"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "clip_grad": 1.0},
        "rollout": {"n_samples": 2, "temperature": 1.0, "max_new_tokens": 4},
        "algorithm": {"estimator": "gndpo", "policy_loss": "gspo"},
        "data": {"train_files": [str(tmp / "train.parquet")], "val_files": [str(tmp / "train.parquet")],
                 "tokenizer": str(tmp / "student" / "tokenizer"), "max_prompt_length": 64, "images": "process",
                 "shuffle": False},
        "trainer": {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 2, "mini_batches": 1,
                    "output_dir": str(tmp / run), "tensorboard": False, "progress": False, "val_prompts": 4},
    })


def _state(trainer):
    """Every weight of the student, language model and vision side (whole, on every rank)."""
    from megatron_gndpo.models.weights import gather_global_weights

    return gather_global_weights(trainer.student.module)


def _train(groups, tmp, tp, pp, resume_too):
    """Two steps (saving after the first when ``resume_too``, then a second run resumed from that
    checkpoint takes step 2 again); the metrics, weights and validation."""
    import torch.distributed as dist

    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    tmp = Path(tmp)
    run = f"run_{tp}{pp}{dist.get_world_size() // (tp * pp)}"
    destroy_parallel(destroy_process_group=False)
    trainer = Trainer(_config(tmp, run, tp, pp))
    initial = _state(trainer)
    metrics = [trainer.train_step()]
    out = {}
    if resume_too:  # the step-1 checkpoint, exported to Hugging Face as a converted one would be
        from megatron_gndpo.checkpoint import convert

        saved = trainer.save()
        convert.megatron_to_hf(str(saved), str(tmp / "exported"))
        out["step1"] = _state(trainer)
        out["exported"] = _safetensors(tmp / "exported")
        out["val1"] = trainer.validate()
    metrics.append(trainer.train_step())
    out.update(metrics=metrics if trainer.is_logging_rank else None, initial=initial, weights=_state(trainer),
               val=trainer.validate())
    trainer.close(destroy_process_group=False)
    if resume_too:
        from megatron_gndpo.trainer.evaluation import evaluate_checkpoint

        trainer = Trainer(_config(tmp, run, tp, pp), resume=True)
        assert trainer.step == 1
        out["resumed"] = {"metrics": trainer.train_step(), "weights": _state(trainer)}
        trainer.close(destroy_process_group=False)
        destroy_parallel(destroy_process_group=False)  # `megatron-gndpo eval` of the step-1 checkpoint
        out["eval"] = evaluate_checkpoint(_config(tmp, "eval"), str(tmp / run / "checkpoints"))
    return out


def _unfrozen_tower_step(groups, tmp):
    """One step with ``trainer.freeze_vision_tower=false``: which vision tensors moved."""
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    cfg = _config(Path(tmp), "unfrozen")
    cfg.trainer.freeze_vision_tower = False
    destroy_parallel(destroy_process_group=False)
    trainer = Trainer(cfg)
    before = _state(trainer)
    trainer.train_step()
    after = _state(trainer)
    trainer.close(destroy_process_group=False)
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith("vision.")}


def test_gndpo_steps_with_images_match_across_layouts_and_resume(tmp_path):
    run_distributed(_prepare, 1, args=(str(tmp_path),))
    moved = run_distributed(_unfrozen_tower_step, 1, args=(str(tmp_path),))[0]
    assert all(moved.values()), [k for k, m in moved.items() if not m]  # tower and projector train
    ref = run_distributed(_train, 1, args=(str(tmp_path), 1, 1, True))[0]
    layouts = {(tp, pp, 2 // (tp * pp)): run_distributed(_train, 2, tp=tp, pp=pp, args=(str(tmp_path), tp, pp, False))
               for tp, pp in ((2, 1), (1, 2), (1, 1))}

    projector = next(k for k in ref["weights"] if k.endswith(PROJECTOR))
    tower = [k for k in ref["weights"] if k.startswith("vision.vision_tower.")]
    assert tower and projector == f"vision.{PROJECTOR}"
    # gradients reach the projector; the frozen tower does not move
    assert not torch.equal(ref["weights"][projector], ref["initial"][projector])
    for key in tower:
        assert torch.equal(ref["weights"][key], ref["initial"][key]), key

    assert ref["metrics"][0]["prompt/length_max"] > 20  # image tokens count in the prompt length
    _same_as_reference(ref, layouts)

    # resumed from the step-1 checkpoint, step 2 is the same step
    for key in COMPARED:
        assert ref["resumed"]["metrics"][key] == pytest.approx(ref["metrics"][1][key], rel=1e-6, abs=1e-7), key
    for key, w in ref["weights"].items():
        assert torch.equal(ref["resumed"]["weights"][key], w), key

    # the exported checkpoint holds the trained projector and language model
    assert torch.equal(ref["exported"][PROJECTOR], ref["step1"][projector])
    assert not torch.equal(ref["exported"][PROJECTOR], ref["initial"][projector])
    embedding = ref["step1"]["embedding.word_embeddings.weight"][:VOCAB]
    assert torch.equal(ref["exported"]["language_model.model.embed_tokens.weight"], embedding)

    # `megatron-gndpo eval` loads the step-1 checkpoint's VLM and validates it with the images, as the run did
    assert ref["eval"]["step"] == 1 and ref["eval"]["prompts"] == 4
    assert {k: ref["eval"][k] for k in ref["val1"]} == ref["val1"]


def _same_as_reference(ref, layouts) -> None:
    """Every layout's run took the steps of the (TP, PP, DP) = (1, 1, 1) run ``ref``: metrics, weights, validation."""
    for layout, ranks in layouts.items():
        got = next(o["metrics"] for o in ranks if o["metrics"] is not None)
        for step, (r, g) in enumerate(zip(ref["metrics"], got)):
            for key in COMPARED:
                assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (layout, step, key)
        for key, w in ref["weights"].items():  # (the vocabulary is padded to 128 x TP: its real rows compared)
            cut = slice(VOCAB) if "word_embeddings" in key or "output_layer" in key else slice(None)
            torch.testing.assert_close(ranks[0]["weights"][key][cut], w[cut], rtol=0, atol=2e-5, msg=(layout, key))
        assert ranks[0]["val"] == pytest.approx(ref["val"]), layout


def test_qwen25vl_gndpo_steps_with_images_match_across_layouts(tmp_path):
    """Two GNDPO steps of a Qwen2.5-VL student and teacher (M-RoPE positions in the sampler, the scores and the
    update) at (TP, PP, DP) = (2, 1, 1), (1, 2, 1) and (1, 1, 2) are those of (1, 1, 1); the patch merger trains, the
    rest of the ViT does not move."""
    run_distributed(_prepare, 1, args=(str(tmp_path), "qwen2_5_vl"))
    ref = run_distributed(_train, 1, args=(str(tmp_path), 1, 1, False))[0]
    layouts = {(tp, pp, 2 // (tp * pp)): run_distributed(_train, 2, tp=tp, pp=pp, args=(str(tmp_path), tp, pp, False))
               for tp, pp in ((2, 1), (1, 2), (1, 1))}
    merger = [k for k in ref["weights"] if k.startswith("vision.visual.merger.")]
    encoder = [k for k in ref["weights"] if k.startswith("vision.visual.") and k not in merger]
    assert merger and encoder
    assert any(not torch.equal(ref["weights"][k], ref["initial"][k]) for k in merger)
    for key in encoder:
        assert torch.equal(ref["weights"][key], ref["initial"][key]), key
    assert ref["metrics"][0]["prompt/length_max"] > 16  # image tokens count in the prompt length
    _same_as_reference(ref, layouts)
