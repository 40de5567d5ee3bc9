"""The InternVL vision-language model (models/vlm.py) against transformers' own
``InternVLForConditionalGeneration`` (tiny random config, Qwen2 language model, nothing downloaded)."""

import pytest
import torch

from tests import common
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

IMAGE_TOKEN, START, END = 5, 3, 4
TOKENS_PER_TILE = 4  # 28 x 28 tiles of 7 x 7 patches: 16 positions, pixel shuffle 0.5 -> 4
TILES = (3, 1)  # two images of different sizes: 2 tiles + thumbnail, and one tile


def _hf_model(vocab_size: int = 64):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[28, 28], patch_size=[7, 7])
    text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, downsample_ratio=0.5)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so the mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "lambda" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch():
    """Row 0: text, image A, text, image B, text; row 1: text only (no image token ids)."""
    g = torch.Generator().manual_seed(1)

    def text(n):
        return torch.randint(6, 64, (n,), generator=g).tolist()

    row = text(3)
    for tiles in TILES:
        row += [START] + [IMAGE_TOKEN] * (TOKENS_PER_TILE * tiles) + [END] + text(2)
    toks = torch.tensor([row, text(len(row))])
    pixels = torch.randn(sum(TILES), 3, 28, 28, generator=g)
    return toks, pixels


def _megatron_logits(groups, toks, pixels):
    from megatron_gndpo.models.vlm import build_internvl_model, load_internvl_hf_weights

    hf = _hf_model()
    out = {}
    for tp in (1, 2):
        groups = relayout(tp)
        model = build_internvl_model(hf.config, common.parallel(tp), common.FP32, pre_process=True,
                                     post_process=True)
        load_internvl_hf_weights(model, hf.state_dict(), hf.config)
        with torch.no_grad():
            shard = model(toks, common.microbatch(toks)["position_ids"], None, pixel_values=pixels)
        out[tp] = common.gather_vocab(shard, groups, hf.config.text_config.vocab_size)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        out[f"frozen{tp}"] = (all(n.startswith("vision.vision_tower.") for n in frozen),
                              len(frozen) == len(list(model.vision.vision_tower.parameters())))
    return out


def test_internvl_logits_match_transformers():
    toks, pixels = _batch()
    hf = _hf_model()
    with torch.no_grad():
        ref = hf(input_ids=toks, pixel_values=pixels).logits
        text_only = hf(input_ids=toks[1:]).logits
    assert (ref[1:] - text_only).abs().max() < 1e-5  # row 1 really is text only
    for rank, per_tp in enumerate(run_distributed(_megatron_logits, 2, args=(toks, pixels))):
        for tp in (1, 2):
            diff = (per_tp[tp] - ref).abs().max().item()
            assert diff < 1e-4, f"rank {rank} TP={tp}: max |logits - transformers| = {diff}"
            assert per_tp[f"frozen{tp}"] == (True, True), "the vision tower, and only it, is frozen by default"
