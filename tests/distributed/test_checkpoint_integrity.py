"""Checkpoints that can be trusted, end to end in spawned gloo worlds: training checkpoints carry their
tokenizer and a file manifest, keep_checkpoints prunes only after a save is complete, a resume over a
damaged `latest` falls back loudly, an exported student knows its EOS / pad ids, and the converter
refuses damaged inputs and non-finite weights by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.distributed.test_convert import _save_hf
from tests.distributed.test_hf_mapping import _hf_model
from tests.harness import run_distributed
from tests.trainer_setup import TOKENIZER, run_config, write_prompts

pytestmark = pytest.mark.distributed


def _largest_shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_byte(path: Path, at: int = 100) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    return data


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train_save_resume_export(groups, tmp):
    from megatron.core import dist_checkpointing

    from megatron_gndpo.checkpoint.convert import megatron_to_hf
    from megatron_gndpo.checkpoint.dist_ckpt import save_model_weights
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.trainer.trainer import Trainer

    tmp = Path(tmp)
    write_prompts(tmp / "train.parquet")
    cfg = run_config(tmp, ["trainer.keep_checkpoints=2"], student_checkpoint=str(tmp / "student"),
                     teacher={"checkpoint": str(tmp / "teacher")})
    for arch, name in ((cfg.model, "student"), (cfg.teacher.model, "teacher")):
        model = build_gpt_model(arch, cfg.parallel, cfg.precision, pre_process=True, post_process=True)
        save_model_weights(model, tmp / name, arch, {"tp": 1, "pp": 1}, tokenizer=TOKENIZER)
    destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
    trainer = Trainer(cfg)
    trainer.train_step()  # the optimizer has its state from the first step on
    root = trainer.checkpoints.root
    seen = {}
    for step in (1, 2, 3):
        trainer.step = step
        trainer.save()
        seen[step] = sorted(p.name for p in root.iterdir())
    tokenizer_files = sorted(p.name for p in (root / "step_00000003" / "tokenizer").iterdir())

    real_save = dist_checkpointing.save

    def dies_midway(state, path, *args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    dist_checkpointing.save = dies_midway
    trainer.step = 4
    try:
        trainer.save()
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    after_killed_save = sorted(p.name for p in root.iterdir())

    summary = megatron_to_hf(str(root), str(tmp / "hf"))  # a checkpoint root: through `latest`

    shard = _largest_shard(root / "step_00000003")
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated latest
    warnings = _Warnings()
    logging.getLogger("megatron_gndpo").addHandler(warnings)
    trainer.close(destroy_process_group=False)
    resumed = Trainer(cfg, resume=True)
    return {"seen": seen, "tokenizer_files": tokenizer_files, "after_killed_save": after_killed_save,
            "summary": summary, "resumed_step": resumed.step, "warnings": warnings.messages, "shard": str(shard),
            "eos": resumed.tokenizer.eos_token_id, "pad": resumed.tokenizer.pad_token_id}


def test_training_checkpoints_keep_prune_resume_and_export(tmp_path):
    out = run_distributed(_train_save_resume_export, 1, args=(str(tmp_path),), timeout_s=240)[0]
    # keep_checkpoints=2: the oldest goes only once the third is complete and `latest` names it
    assert out["seen"][2] == ["latest", "step_00000001", "step_00000002"]
    assert out["seen"][3] == ["latest", "step_00000002", "step_00000003"]
    assert out["after_killed_save"] == ["latest", "step_00000002", "step_00000003", "step_00000004.tmp"]
    assert out["tokenizer_files"] == sorted(p.name for p in Path(TOKENIZER).iterdir())

    # the export of the run's latest checkpoint stops generating: EOS and pad ids written
    assert out["summary"]["source"].endswith("step_00000003")
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    generation = json.loads((hf / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (out["eos"], out["pad"])
    assert generation["eos_token_id"] == out["eos"] and generation["pad_token_id"] == out["pad"]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in hf.iterdir()}
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(str(hf)).eos_token_id == out["eos"]

    # the truncated latest: resumed from the newest intact checkpoint, with a warning naming both
    assert out["resumed_step"] == 2
    warning = next(m for m in out["warnings"] if "resuming from" in m)
    assert out["shard"] in warning and "step_00000002" in warning


def _converter_refusals(groups, tmp):
    from megatron_gndpo.checkpoint import convert
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, model_config_from_checkpoint
    from megatron_gndpo.checkpoint.integrity import CheckpointIntegrityError
    from megatron_gndpo.models.provider import build_gpt_model
    from tests import common

    tmp = Path(tmp)
    errors = {}

    def error(name, call, kind=(CheckpointIntegrityError, ValueError)):
        try:
            call()
        except kind as e:
            errors[name] = f"{type(e).__name__}: {e}"

    convert.hf_to_megatron(str(tmp / "hf"), str(tmp / "mg"), verify=True)
    mg = tmp / "mg"
    meta = json.loads((mg / "gndpo_meta.json").read_text())
    shard = _largest_shard(mg)
    original = _flip_byte(shard)
    error("flipped_to_hf", lambda: convert.megatron_to_hf(str(mg), str(tmp / "out1")))
    error("flipped_reshard", lambda: convert.reshard(str(mg), str(tmp / "out2")))
    shard.write_bytes(original[:-10])
    cfg = model_config_from_checkpoint(mg)
    model = build_gpt_model(cfg, common.parallel(1), common.FP32, pre_process=True, post_process=True)
    error("truncated_load", lambda: load_model_weights(model, mg, cfg, "model"))
    shard.write_bytes(original)

    convert.megatron_to_hf(str(mg), str(tmp / "export"), verify=True)
    generation = tmp / "export" / "generation_config.json"
    generation.write_text(generation.read_text().replace("{", '{"max_new_tokens": 64,', 1))  # a user's edit
    convert.hf_to_megatron(str(tmp / "export"), str(tmp / "reimported"))  # weights intact: accepted
    exported = max((tmp / "export").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    _flip_byte(exported, at=exported.stat().st_size // 2)
    error("flipped_export", lambda: convert.hf_to_megatron(str(tmp / "export"), str(tmp / "out3")))

    error("nan_hf", lambda: convert.hf_to_megatron(str(tmp / "hf_nan"), str(tmp / "out4")))
    state = model.state_dict()
    with torch.no_grad():
        state["decoder.layers.1.mlp.linear_fc2.weight"][1, 2] = float("inf")
    from megatron_gndpo.checkpoint.dist_ckpt import save_model_weights

    save_model_weights(model, tmp / "mg_inf", cfg, {"tp": 1, "pp": 1})
    error("inf_to_hf", lambda: convert.megatron_to_hf(str(tmp / "mg_inf"), str(tmp / "out5")))
    error("inf_reshard", lambda: convert.reshard(str(tmp / "mg_inf"), str(tmp / "out6")))
    left = sorted(p.name for p in tmp.iterdir())
    return {"meta": meta, "shard": str(shard), "exported": str(exported), "errors": errors, "left": left}


def test_converter_refuses_damaged_inputs_and_non_finite_weights(tmp_path):
    _save_hf("llama", False, tmp_path / "hf")
    nan = _hf_model("llama", False)
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
    nan.save_pretrained(str(tmp_path / "hf_nan"))
    out = run_distributed(_converter_refusals, 1, args=(str(tmp_path),), timeout_s=180)[0]
    meta, errors, shard = out["meta"], out["errors"], out["shard"]
    assert meta["conversion"]["command"] == "hf-to-megatron" and meta["hash_algorithm"] in ("sha256", "xxh3_128")
    assert {"tokenizer/tokenizer.json", Path(shard).name} <= set(meta["files"])
    for name in ("flipped_to_hf", "flipped_reshard"):
        assert errors[name].startswith("CheckpointIntegrityError"), errors[name]
        assert f"{shard} does not have the content" in errors[name]
    assert f"{shard} has" in errors["truncated_load"] and "truncated" in errors["truncated_load"]
    assert f"{out['exported']} does not have the content" in errors["flipped_export"]
    assert "'model.layers.1.mlp.down_proj.weight' has 1 NaN" in errors["nan_hf"]
    assert "'model.layers.1.mlp.down_proj.weight' has 0 NaN and 1 infinite" in errors["inf_to_hf"]
    assert "linear_fc2.weight' (decoder layer 1) has 0 NaN and 1 infinite" in errors["inf_reshard"]
    # nothing refused left an output or a staging directory behind
    assert out["left"] == ["export", "hf", "hf_nan", "mg", "mg_inf", "reimported"]
