"""tools/checkpoint_convert end to end: HF directory -> megatron dist-checkpoint -> logits at every
TP x PP layout match transformers'; megatron -> HF is bit-exact; reshard; error cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import common
from tests.distributed.test_hf_mapping import _hf_model
from tests.harness import relayout, run_distributed
from tests.trainer_setup import TOKENIZER

pytestmark = pytest.mark.distributed
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))


def _save_hf(family, tied, path: Path):
    model = _hf_model(family, tied)
    model.save_pretrained(str(path), max_shard_size="100KB")  # several shards + index
    for name in Path(TOKENIZER).iterdir():
        shutil.copy2(name, path / name.name)
    return model


def _convert(groups, command, *args, **kwargs):
    from megatron_gndpo.checkpoint import convert

    return getattr(convert, command)(*args, **kwargs)


def _logits_at_layouts(groups, ckpt, toks):
    """Load the converted checkpoint at each (TP, PP) of a 4-rank world; full-vocab logits of rank 0's
    data-parallel replica (last stage)."""
    import torch.distributed as dist

    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, read_meta
    from megatron_gndpo.config.schema import ModelConfig
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.trainer.megatron_glue import run_schedule

    cfg = ModelConfig(**read_meta(ckpt)["model"])
    out = {}
    for tp, pp in LAYOUTS:
        groups = relayout(tp, pp)
        model = build_gpt_model(cfg, common.parallel(tp, pp), common.FP32, pre_process=groups.is_first_stage,
                                post_process=groups.is_last_stage)
        load_model_weights(model, ckpt, cfg, "model")
        got = run_schedule(model, [common.microbatch(toks)], forward_only=True,
                           collect_fn=lambda lg, mb: {"logits": common.gather_vocab(lg, groups, cfg.vocab_size)})
        if got and groups.dp_rank == 0 and groups.tp_rank == 0:
            out[(tp, pp)] = got[0]["logits"]
        dist.barrier()
    return out


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_hf_to_megatron_to_hf(tmp_path, family, tied):
    hf = _save_hf(family, tied, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    toks = common.tokens(2, 12)
    with torch.no_grad():
        ref = hf(toks).logits

    run_distributed(_convert, 1, args=("hf_to_megatron", str(tmp_path / "hf"), str(tmp_path / "mg")),
                    timeout_s=120)
    results = run_distributed(_logits_at_layouts, 4, args=(str(tmp_path / "mg"), toks), timeout_s=240)
    seen = {}
    for r in results:
        seen.update(r)
    assert set(seen) == set(LAYOUTS)
    for layout, logits in seen.items():
        diff = (logits - ref).abs().max().item()
        assert diff < 1e-4, f"{family} {layout}: max |logits - transformers| = {diff}"

    summary = run_distributed(_convert, 1, args=("megatron_to_hf", str(tmp_path / "mg"), str(tmp_path / "back")),
                              timeout_s=120)[0]
    assert summary["family"] == family
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    tensors = {}
    for name in set(index["weight_map"].values()):
        tensors.update(load_file(str(back / name)))
    ref_sd = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(tensors) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(tensors[k], v), k
    assert (back / "tokenizer.json").is_file() and (back / "config.json").is_file()
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back)).float().eval()
    with torch.no_grad():
        assert torch.equal(reloaded(toks).logits, ref)


def _resave_at_tp2pp2(groups, src, dst):
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, read_meta, save_model_weights
    from megatron_gndpo.config.schema import ModelConfig
    from megatron_gndpo.models.provider import build_gpt_model

    groups = relayout(2, 2)
    cfg = ModelConfig(**read_meta(src)["model"])
    model = build_gpt_model(cfg, common.parallel(2, 2), common.FP32, pre_process=groups.is_first_stage,
                            post_process=groups.is_last_stage)
    load_model_weights(model, src, cfg, "model")
    save_model_weights(model, dst, cfg, {"tp": 2, "pp": 2}, hf_architecture="qwen2")


def test_reshard_tp2pp2_to_tp1pp1_is_lossless(tmp_path):
    hf = _save_hf("qwen2", False, tmp_path / "hf")
    run_distributed(_convert, 1, args=("hf_to_megatron", str(tmp_path / "hf"), str(tmp_path / "mg")))
    run_distributed(_resave_at_tp2pp2, 4, args=(str(tmp_path / "mg"), str(tmp_path / "tp2pp2")))
    summary = run_distributed(_convert, 1, args=("reshard", str(tmp_path / "tp2pp2"), str(tmp_path / "tp1pp1"),
                                                 1, 1))[0]
    assert summary["from"] == {"tp": 2, "pp": 2} and summary["layout"] == {"tp": 1, "pp": 1}
    run_distributed(_convert, 1, args=("megatron_to_hf", str(tmp_path / "tp1pp1"), str(tmp_path / "back")))
    from safetensors.torch import load_file

    back = tmp_path / "back"
    tensors = {}
    for name in back.glob("*.safetensors"):
        tensors.update(load_file(str(name)))
    for k, v in hf.state_dict().items():
        assert torch.equal(tensors[k], v), k


def _expect_error(groups, command, *args, **kwargs):
    try:
        _convert(groups, command, *args, **kwargs)
    except (ValueError, KeyError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_conversion_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_hf("llama", False, tmp_path / "hf")
    hf = tmp_path / "hf"

    def err(*args, **kwargs):
        return run_distributed(_expect_error, 1, args=args, timeout_s=120)[0]

    assert "tensor_model_parallel_size (3)" in err("hf_to_megatron", str(hf), str(tmp_path / "o1"), 3)
    # a missing tensor, an unexpected one, a wrong shape: edit the shard that holds the first layer's q_proj
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = hf / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    original = load_file(str(shard))
    broken = dict(original)
    del broken["model.layers.0.self_attn.q_proj.weight"]
    save_file(broken, str(shard), metadata={"format": "pt"})
    assert "model.layers.0.self_attn.q_proj.weight" in err("hf_to_megatron", str(hf), str(tmp_path / "o2"))
    save_file({**original, "model.layers.7.mlp.extra.weight": torch.zeros(2)}, str(shard), metadata={"format": "pt"})
    assert "model.layers.7.mlp.extra.weight" in err("hf_to_megatron", str(hf), str(tmp_path / "o3"))
    save_file({**original, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(shard),
              metadata={"format": "pt"})
    assert "shape" in err("hf_to_megatron", str(hf), str(tmp_path / "o4"))
    save_file(original, str(shard), metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "gpt2" in err("hf_to_megatron", str(hf), str(tmp_path / "o5"))


def _load_fp32_at_tp2(groups, ckpt):
    """A bf16 checkpoint loaded into a float32 model at TP=2, gathered back to HF names."""
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, read_meta
    from megatron_gndpo.checkpoint.hf_mapping import global_to_hf
    from megatron_gndpo.config.schema import ModelConfig
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.weights import gather_global_weights

    cfg = ModelConfig(**read_meta(ckpt)["model"])
    model = build_gpt_model(cfg, common.parallel(2), common.FP32, pre_process=True, post_process=True)
    load_model_weights(model, ckpt, cfg, "model")
    return global_to_hf(gather_global_weights(model), cfg)


def _to_hf_in_small_shards(groups, src, dst):
    return _convert(groups, "megatron_to_hf", src, dst, max_shard_bytes=64 * 1024)


def test_bf16_checkpoint_streams_in_its_own_dtype(tmp_path):
    """A bf16 HF model stays bf16 on disk (no silent fp32 doubling), loads into a float32 model at TP=2
    exactly, and comes back bit-exact across several output shards."""
    from safetensors.torch import load_file

    hf = _hf_model("qwen3", False).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    ref = hf.state_dict()
    summary = run_distributed(_convert, 1, args=("hf_to_megatron", str(tmp_path / "hf"), str(tmp_path / "mg"), 2))[0]
    assert summary["dtype"] == "bfloat16"
    loaded = run_distributed(_load_fp32_at_tp2, 2, args=(str(tmp_path / "mg"),))[0]
    for k, v in ref.items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), k

    summary = run_distributed(_to_hf_in_small_shards, 1, args=(str(tmp_path / "mg"), str(tmp_path / "back")))[0]
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert summary["shards"] == len(files) > 1 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    back = {}
    for name in files:
        shard = load_file(str(tmp_path / "back" / name))
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= 64 * 1024 or len(shard) == 1
        assert {k for k, f in index["weight_map"].items() if f == name} == set(shard)
        back.update(shard)
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v), k
    # a re-export with fewer, larger shards replaces the directory: no stale shard survives beside the index
    run_distributed(_convert, 1, args=("megatron_to_hf", str(tmp_path / "mg"), str(tmp_path / "back")))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))
    assert len(set(index["weight_map"].values())) == 1 and not (tmp_path / "back.tmp").exists()


def _stream_and_inspect(groups, hf_dir, out):
    """What the megatron writer is handed, and what reading a layer leaves behind."""
    import gc

    from megatron_gndpo.checkpoint import convert, megatron_io
    from megatron_gndpo.models.weights import sharded_tensors

    handed = []
    save = megatron_io.save_sharded_weights

    def recording_save(sharded, *args, **kwargs):
        handed.extend(sh.data for item in sharded.values() for sh in sharded_tensors(item))
        return save(sharded, *args, **kwargs)

    megatron_io.save_sharded_weights = recording_save
    try:
        convert.hf_to_megatron(hf_dir, out)
    finally:
        megatron_io.save_sharded_weights = save
    views = sum(t.numel() * t.element_size() != t.untyped_storage().nbytes() for t in handed)

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        layer = megatron_io.MegatronCheckpointReader(out).layer(0)
        del layer
        gc.collect()
        cyclic_tensors = sum(isinstance(o, torch.Tensor) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return {"handed": len(handed), "views": views, "cyclic_tensors": cyclic_tensors}


def test_streaming_holds_no_hidden_copies(tmp_path):
    """The two things that made conversion memory grow with depth: megatron's writer clones every
    CPU tensor that does not span its whole storage (SwiGLU fc1's gate / up halves did not), and a
    layer read through DCP stayed alive in a reference cycle until a full garbage collection."""
    _hf_model("llama", False).save_pretrained(str(tmp_path / "hf"))
    got = run_distributed(_stream_and_inspect, 1, args=(str(tmp_path / "hf"), str(tmp_path / "mg")))[0]
    assert got["handed"] > 0 and got["views"] == 0
    assert got["cyclic_tensors"] == 0


# vocab 17 pads to 24 rows at TP=1 and to 32 at TP=2 (make_vocab_size_divisible_by 8 x TP)
PADDED_ARCH = dict(vocab_size=17, make_vocab_size_divisible_by=8, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _padded_model(tied, tp, pp, groups):
    from megatron_gndpo.config.schema import ModelConfig
    from megatron_gndpo.models.provider import build_gpt_model

    cfg = ModelConfig(**PADDED_ARCH, tie_word_embeddings=tied)
    return cfg, build_gpt_model(cfg, common.parallel(tp, pp), common.FP32, pre_process=groups.is_first_stage,
                                post_process=groups.is_last_stage)


def _load_across_paddings(groups, tmp):
    """A TP=1 checkpoint (24 vocabulary rows) loaded at TP=2 (32 rows) and saved from there; that TP=2
    checkpoint loaded at TP=1 x PP=2 (24 rows). Global weights at each step."""
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, save_model_weights
    from megatron_gndpo.models.weights import gather_global_weights

    out = {}
    for tied in (False, True):
        groups = relayout(1, 1)
        cfg, model = _padded_model(tied, 1, 1, groups)
        save_model_weights(model, f"{tmp}/tp1_{tied}", cfg, {"tp": 1, "pp": 1})
        saved = gather_global_weights(model)
        groups = relayout(2, 1)
        cfg, model = _padded_model(tied, 2, 1, groups)
        load_model_weights(model, f"{tmp}/tp1_{tied}", cfg, "model")
        at_tp2 = gather_global_weights(model)
        save_model_weights(model, f"{tmp}/tp2_{tied}", cfg, {"tp": 2, "pp": 1})
        groups = relayout(1, 2)
        cfg, model = _padded_model(tied, 1, 2, groups)
        load_model_weights(model, f"{tmp}/tp2_{tied}", cfg, "model")
        out[tied] = (saved, at_tp2, gather_global_weights(model))
    return out


def test_checkpoint_padded_for_another_tp_loads_at_any_layout(tmp_path):
    """Padded vocabulary rows are added (zero) or dropped on load; every real row is bit-exact. This
    used to be refused with a message to reshard the checkpoint first."""
    loaded = run_distributed(_load_across_paddings, 2, args=(str(tmp_path),))[0]
    for tied in (False, True):
        saved, at_tp2, at_tp1pp2 = loaded[tied]
        assert set(at_tp2) == set(at_tp1pp2) == set(saved), tied
        for key, w in saved.items():
            if key in VOCAB_KEYS:
                assert w.shape[0] == 24 and at_tp2[key].shape[0] == 32 and at_tp1pp2[key].shape[0] == 24
                assert torch.equal(at_tp2[key][:24], w) and not at_tp2[key][24:].any(), (tied, key)
                assert torch.equal(at_tp1pp2[key], w), (tied, key)
            else:
                assert torch.equal(at_tp2[key], w) and torch.equal(at_tp1pp2[key], w), (tied, key)
