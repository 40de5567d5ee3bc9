"""Vision-language checkpoint conversion end to end, for each family: a tiny random
``InternVLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` directory (tokenizer and
processor files included, nothing downloaded) -> megatron checkpoint -> the VLM loaded at several
TP x PP layouts gives transformers' logits on a batch with images; megatron -> HF and reshard -> HF
are bit-exact; the processor is found from the converted checkpoint; unknown tensors, damaged
vision files and text loads of it are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import common
from tests.distributed.test_vlm import FAMILIES, _batch, _hf_model, hf_logits, model_images
from tests.harness import relayout, run_distributed
from tests.unit.test_vision_data import _tokenizer

pytestmark = pytest.mark.distributed
VOCAB = 128  # the test tokenizers have 107 tokens; their image tokens are test_vlm's
# (TP, PP) -> the checkpoint loaded there: converted at TP=PP=1, converted at TP=PP=2, or that one resharded to
# TP=1, PP=2 (loaded by a world of 4)
LAYOUTS = {(1, 1): "mg", (2, 1): "mg", (1, 2): "mg12", (2, 2): "mg22"}


# per family: a vision tensor of the files' naming (its shard gets the bad tensors), tensors the mapping does
# not know (a vision one, a language one, a foreign one, one in the modules' naming that mixes the two)
TENSORS = {"internvl": ("multi_modal_projector.linear_1.weight",
                        ("vision_tower.encoder.layer.9.extra.weight", "language_model.model.layers.7.mlp.x",
                         "model.audio_tower.weight", "model.vision_tower.embeddings.cls_token")),
           "qwen2_5_vl": ("visual.merger.mlp.0.weight",
                          ("visual.blocks.9.extra.weight", "model.layers.7.mlp.x", "audio_tower.weight",
                           "model.visual.patch_embed.proj.weight"))}


def _save_hf(path: Path, family: str, seed: int = 0, max_shard_size: str = "100KB"):
    """The HF directory: weights in several shards mixing the language model and the vision side,
    the tokenizer, the image processor (PIL backend) and processor_config.json. InternVL ties
    ``lm_head`` to the embedding (its default), the Qwen2.5-VL model does not (its 7B). A ``seed``
    other than 0 perturbs every weight (a teacher unlike the student)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = _hf_model(VOCAB, family, tie_word_embeddings=family == "internvl")
    if seed:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    _tokenizer(family).save_pretrained(str(path))
    if family == "internvl":
        GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, max_patches=6).save_pretrained(str(path))
        processor = {"processor_class": "InternVLProcessor", "image_seq_length": 4}
    else:
        Qwen2VLImageProcessorPil(min_pixels=14 * 14 * 4, max_pixels=14 * 14 * 64, patch_size=7, merge_size=2,
                                 temporal_patch_size=2).save_pretrained(str(path))
        processor = {"processor_class": "Qwen2_5_VLProcessor"}
    (path / "processor_config.json").write_text(json.dumps(processor))
    return model


def _safetensors(path: Path):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(name)))
    return out


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _convert_all(groups, tmp, family):
    """Every conversion in one process: HF -> megatron at TP=PP=1 and TP=PP=2, a reshard, both back
    to HF, the processor from the checkpoint, and the refusals."""
    from safetensors.torch import load_file, save_file

    from megatron_gndpo.checkpoint import convert
    from megatron_gndpo.data.tokenizer import load_tokenizer
    from megatron_gndpo.data.vision import load_vision_processor

    out = {"mg": convert.hf_to_megatron(f"{tmp}/hf", f"{tmp}/mg"),
           "mg22": convert.hf_to_megatron(f"{tmp}/hf", f"{tmp}/mg22", 2, 2)}
    out["mg12"] = convert.reshard(f"{tmp}/mg22", f"{tmp}/mg12", 1, 2)
    out["back"] = convert.megatron_to_hf(f"{tmp}/mg", f"{tmp}/back")
    out["back12"] = convert.megatron_to_hf(f"{tmp}/mg12", f"{tmp}/back12")
    tok_dir = f"{tmp}/mg/tokenizer"
    processor = load_vision_processor(tok_dir, load_tokenizer(tok_dir))
    out["processor"] = (processor.family, processor.image_seq_length)
    out["text_family"] = _error(convert.megatron_to_hf, f"{tmp}/mg", f"{tmp}/as_qwen2", family="qwen2")

    # a damaged vision file is named by verify and stops an export
    shutil.copytree(f"{tmp}/mg", f"{tmp}/damaged")
    vision_file = Path(tmp) / "damaged" / "vision" / "model.safetensors"
    data = bytearray(vision_file.read_bytes())
    data[-1] ^= 1
    vision_file.write_bytes(bytes(data))
    out["verify"] = convert.verify(f"{tmp}/damaged")
    out["export_damaged"] = _error(convert.megatron_to_hf, f"{tmp}/damaged", f"{tmp}/o0")

    # tensors the mapping does not know, in the shard holding the vision tower's first tensor
    index = json.loads((Path(tmp) / "hf" / "model.safetensors.index.json").read_text())
    vision_key, unknown_keys = TENSORS[family]
    shard = Path(tmp) / "hf" / index["weight_map"][vision_key]
    original = load_file(str(shard))
    unknown = {}
    # (the files' naming is transformers' save_pretrained one; a tensor in the modules' naming mixes the two)
    for i, key in enumerate(unknown_keys):
        save_file({**original, key: torch.zeros(2)}, str(shard), metadata={"format": "pt"})
        unknown[key] = _error(convert.hf_to_megatron, f"{tmp}/hf", f"{tmp}/o{i + 1}")
    save_file({**original, vision_key: torch.full((3,), float("nan"))}, str(shard), metadata={"format": "pt"})
    out["nan"] = _error(convert.hf_to_megatron, f"{tmp}/hf", f"{tmp}/o5")
    save_file(original, str(shard), metadata={"format": "pt"})
    out["unknown"] = unknown
    return out


def _vlm_logits(groups, tmp, toks, im):
    """The converted VLM at each layout of LAYOUTS: full-vocabulary logits of the last stage (the first
    stage's hidden states handed over by a broadcast in the pipeline group), where the vision side was
    built, and whether a text model may load the checkpoint."""
    import torch.distributed as dist

    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights
    from megatron_gndpo.checkpoint.vision import vlm_config
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.vlm import load_vlm_checkpoint, vlm_language_config

    out = {}
    positions = common.microbatch(toks)["position_ids"]
    images = model_images(im)
    layout = {k: v for k, v in images.items() if k == "image_grid_thw"}  # what later stages' positions need
    for (tp, pp), ckpt in LAYOUTS.items():
        groups = relayout(tp, pp)
        model = load_vlm_checkpoint(f"{tmp}/{ckpt}", common.parallel(tp, pp), common.FP32,
                                         pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
        out[("vision", tp, pp, dist.get_rank())] = (groups.is_first_stage, model.vision is not None)
        with torch.no_grad():
            if pp == 1:
                shard = model(toks, positions, None, **images)
            else:
                hidden = torch.empty(toks.shape[1], toks.shape[0], model.language_model.config.hidden_size)
                if groups.is_first_stage:
                    hidden = model(toks, positions, None, **images)
                dist.broadcast(hidden, src=dist.get_global_rank(groups.pp, 0), group=groups.pp)
                if groups.is_last_stage:
                    model.language_model.set_input_tensor(hidden)
                    shard = model(toks, positions, None, **layout)
        if groups.is_last_stage:
            logits = common.gather_vocab(shard, groups, VOCAB)
            if groups.tp_rank == 0 and groups.dp_rank == 0:
                out[(tp, pp)] = logits
    groups = relayout(1, 1)
    cfg = vlm_language_config(vlm_config(f"{tmp}/mg"))
    text = build_gpt_model(cfg, common.parallel(1), common.FP32, pre_process=True, post_process=True)
    out["text_load"] = _error(load_model_weights, text, f"{tmp}/mg", cfg, "student")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_conversion_round_trips_and_loads_at_every_layout(tmp_path, family):
    hf = _save_hf(tmp_path / "hf", family)
    original = _safetensors(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    vision_prefixes = ("vision_tower.", "multi_modal_projector.") if family == "internvl" else ("visual.",)
    vision_keys = [k for k in original if k.startswith(vision_prefixes)]
    assert vision_keys
    toks, im = _batch(family)
    ref = hf_logits(hf, toks, im)

    # the naming table against transformers: each file name is a module name of the same tensor
    from megatron_gndpo.models.vlm import vlm_hf_name, vlm_part

    modules = hf.state_dict()
    for key, t in original.items():
        naming, part, name = vlm_part(family, key)
        assert naming == ("files" if key != "lm_head.weight" else None), key
        assert vlm_hf_name(family, "files", part, name) == key
        assert torch.equal(modules[vlm_hf_name(family, "modules", part, name)], t), key
    if family == "internvl":
        # this model ties lm_head to the embedding (InternVLConfig's default), so its files have none; an untied
        # one's is transformers' "^language_model.lm_head" -> "lm_head" renaming
        assert not any("lm_head" in k for k in original) and hf.config.tie_word_embeddings
        for naming, key in (("files", "language_model.lm_head.weight"), ("modules", "lm_head.weight")):
            assert vlm_part(family, key) == (naming, "language", "lm_head.weight")
            assert vlm_hf_name(family, naming, "language", "lm_head.weight") == key
    else:  # both namings call it lm_head.weight
        assert "lm_head.weight" in original and not hf.config.tie_word_embeddings

    got = run_distributed(_convert_all, 1, args=(str(tmp_path), family), timeout_s=240)[0]
    assert got["mg"]["family"] == family and got["mg"]["vision_tensors"] == len(vision_keys)
    assert got["mg12"]["from"] == {"tp": 2, "pp": 2} and got["mg12"]["layout"] == {"tp": 1, "pp": 2}
    meta = json.loads((tmp_path / "mg" / "gndpo_meta.json").read_text())
    assert meta["vision"]["family"] == family and meta["vision"]["image_token_id"] == hf.config.image_token_id
    assert "vision/model.safetensors" in meta["files"]
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        assert (tmp_path / "mg" / "tokenizer" / name).is_file(), name
    assert got["processor"] == ((family, 4) if family == "internvl" else (family, 256))
    assert "drop its vision side" in got["text_family"]

    # megatron -> HF: every tensor of the input safetensors, bit for bit, same keys; the config as it was
    for back in ("back", "back12"):
        tensors = _safetensors(tmp_path / back)
        assert set(tensors) == set(original), back
        for key, t in original.items():
            assert tensors[key].dtype == t.dtype and torch.equal(tensors[key], t), (back, key)
        assert json.loads((tmp_path / back / "config.json").read_text()) == json.loads(
            (tmp_path / "hf" / "config.json").read_text())
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json"):
            assert (tmp_path / back / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), (back, name)
    reloaded = type(hf).from_pretrained(str(tmp_path / "back")).float().eval()
    assert torch.equal(hf_logits(reloaded, toks, im), ref)

    assert "vision/model.safetensors" in got["verify"][str(tmp_path / "damaged")]
    assert "vision/model.safetensors" in got["export_damaged"]
    for key, message in got["unknown"].items():
        assert message is not None and key in message, (key, message)
    assert TENSORS[family][0] in got["nan"] and "NaN" in got["nan"]
    assert not any((tmp_path / f"o{i}").exists() for i in range(6))

    results = run_distributed(_vlm_logits, 4, args=(str(tmp_path), toks, im), timeout_s=240)
    seen = {}
    for r in results:
        seen.update(r)
    for layout in LAYOUTS:
        diff = (seen[layout] - ref).abs().max().item()
        assert diff < 1e-4, f"{family} {layout}: max |logits - transformers| = {diff}"
    for (_, tp, pp, rank), (first, has_vision) in ((k, v) for k, v in seen.items() if k[0] == "vision"):
        assert first == has_vision, f"TP={tp} PP={pp} rank {rank}: the vision side belongs to the first stage only"
    assert "vision-language" in seen["text_load"] and "load_vlm_checkpoint" in seen["text_load"]
