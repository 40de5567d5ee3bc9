"""The vision-language models (models/vlm.py) against transformers' own ``InternVLForConditionalGeneration``
and ``Qwen2_5_VLForConditionalGeneration`` (tiny random configs, Qwen2 language models, nothing
downloaded): InternVL's logits at TP 1 and 2 and its frozen parts, Qwen2.5-VL's M-RoPE positions. The
helpers serve both families' conversion (whose test requires Qwen2.5-VL's logits at three layouts)
and rollout tests."""

import pytest
import torch

from tests import common
from tests.harness import relayout, run_distributed

pytestmark = pytest.mark.distributed

FAMILIES = ("internvl", "qwen2_5_vl")
# the image-token ids of each family's test tokenizer (tests/unit/test_vision_data.py's: <img>, </img>,
# <IMG_CONTEXT>; <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>); random text ids start above
IMAGE_TOKEN, START, END = 5, 3, 4
QWEN_TOKENS = {"image_token_id": 9, "vision_start_token_id": 7, "vision_end_token_id": 8, "video_token_id": 10}
TEXT_FROM = {"internvl": 6, "qwen2_5_vl": 11}
TOKENS_PER_TILE = 4  # 28 x 28 tiles of 7 x 7 patches: 16 positions, pixel shuffle 0.5 -> 4
TILES = (3, 1)  # two images of different sizes: 2 tiles + thumbnail, and one tile
# Qwen2.5-VL: two images of different patch grids (t, h, w) of 7 x 7 patches, merged 2 x 2 into image tokens;
# the first spans several 28-pixel attention windows (2 x 2 merged patches each), the last one only part of one
GRIDS = ((1, 8, 6), (1, 2, 4))
PATCH = 3 * 2 * 7 * 7  # channels x temporal_patch_size x patch_size**2


def image_tokens(family: str):
    """(start, image, end) token ids of ``family``'s test models."""
    if family == "internvl":
        return START, IMAGE_TOKEN, END
    return QWEN_TOKENS["vision_start_token_id"], QWEN_TOKENS["image_token_id"], QWEN_TOKENS["vision_end_token_id"]


def _perturbed(model):
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so the mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "lambda" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_model(vocab_size: int = 64, family: str = "internvl", tie_word_embeddings: bool = True):
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if family == "internvl":
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=[28, 28], patch_size=[7, 7])
        config = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text),
                                image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
                                tie_word_embeddings=tie_word_embeddings)
        return _perturbed(InternVLForConditionalGeneration(config).float().eval())
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=7,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=28, fullatt_block_indexes=[1])
    # head_dim 16: 8 rotary frequency pairs, 2 temporal, 3 height, 3 width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=dict(rope_parameters=rope, bos_token_id=0,
                                                                     eos_token_id=2, **text),
                              tie_word_embeddings=tie_word_embeddings, **QWEN_TOKENS)
    return _perturbed(Qwen2_5_VLForConditionalGeneration(config).float().eval())


def image_inputs(family: str, generator: torch.Generator, sizes):
    """Random images as the family's processor lays them out: ``ImageInputs`` of ``sizes`` (InternVL:
    tiles per image; Qwen2.5-VL: patch grids)."""
    from megatron_gndpo.data.vision import ImageInputs

    if family == "internvl":
        return ImageInputs(torch.randn(sum(sizes), 3, 28, 28, generator=generator),
                           [TOKENS_PER_TILE * n for n in sizes], tiles_per_image=list(sizes))
    grid = torch.tensor(sizes)
    return ImageInputs(torch.randn(int(grid.prod(-1).sum()), PATCH, generator=generator),
                       [int(g.prod()) // 4 for g in grid], image_grid_thw=grid)


def model_images(im) -> dict:
    """The model's (and transformers') image arguments for ``ImageInputs`` ``im``."""
    return {"pixel_values": im.pixel_values,
            **({"image_grid_thw": im.image_grid_thw} if im.image_grid_thw is not None else {})}


def hf_logits(hf, toks, im=None):
    """transformers' logits of ``toks`` with the images ``im`` (Qwen2.5-VL also needs each token's
    modality to lay out its M-RoPE positions)."""
    extra = {} if im is None else model_images(im)
    if hf.config.model_type == "qwen2_5_vl":
        extra["mm_token_type_ids"] = (toks == hf.config.image_token_id).int()
    with torch.no_grad():
        return hf(input_ids=toks, **extra).logits


def _batch(family: str = "internvl"):
    """Row 0: text, image A, text, image B, text; row 1: text only (no image token ids)."""
    g = torch.Generator().manual_seed(1)
    start, image, end = image_tokens(family)

    def text(n):
        return torch.randint(TEXT_FROM[family], 64, (n,), generator=g).tolist()

    im = image_inputs(family, g, TILES if family == "internvl" else GRIDS)
    row = text(3)
    for n in im.tokens_per_image:
        row += [start] + [image] * n + [end] + text(2)
    return torch.tensor([row, text(len(row))]), im


def _megatron_logits(groups, family, toks, im):
    from megatron_gndpo.models.vlm import build_vlm_model, load_vlm_hf_weights

    hf = _hf_model(family=family)
    out = {}
    for tp in (1, 2):
        groups = relayout(tp)
        model = build_vlm_model(hf.config, common.parallel(tp), common.FP32, pre_process=True, post_process=True)
        load_vlm_hf_weights(model, hf.state_dict(), hf.config)
        with torch.no_grad():
            shard = model(toks, common.microbatch(toks)["position_ids"], None, **model_images(im))
        out[tp] = common.gather_vocab(shard, groups, hf.config.text_config.vocab_size)
        for key, trains in (("frozen", False), ("trained", True)):  # the vision side's parts (Qwen's under visual.)
            out[f"{key}{tp}"] = sorted({name.removeprefix("visual.").split(".")[0]
                                        for name, p in model.vision.named_parameters() if p.requires_grad == trains})
        out[f"lm_trains{tp}"] = all(p.requires_grad for p in model.language_model.parameters())
    return out


FROZEN = {"internvl": (["vision_tower"], ["multi_modal_projector"]),
          "qwen2_5_vl": (["blocks", "patch_embed"], ["merger"])}
"""The vision side's frozen and trained parts by default (Qwen2.5-VL's under ``visual.``)."""


def test_internvl_logits_match_transformers():
    family = "internvl"
    toks, im = _batch(family)
    hf = _hf_model(family=family)
    ref = hf_logits(hf, toks, im)
    text_only = hf_logits(hf, toks[1:])
    assert (ref[1:] - text_only).abs().max() < 1e-5  # row 1 really is text only
    for rank, per_tp in enumerate(run_distributed(_megatron_logits, 2, args=(family, toks, im))):
        for tp in (1, 2):
            diff = (per_tp[tp] - ref).abs().max().item()
            assert diff < 1e-4, f"{family} rank {rank} TP={tp}: max |logits - transformers| = {diff}"
            # the vision encoder, and only it, is frozen by default; the projector trains
            frozen, trained = FROZEN[family]
            assert (per_tp[f"frozen{tp}"], per_tp[f"trained{tp}"]) == (frozen, trained), family
            assert per_tp[f"lm_trains{tp}"], family


def test_mrope_positions_are_transformers_and_continue_after_the_prompt():
    """Qwen2.5-VL's 3-D positions: transformers' get_rope_index on the batch; a sampled token holding
    the image-token id after the prompt stays text (``row_image_tokens``); the positions after the
    prompt are each token's index + transformers' rope_deltas."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from megatron_gndpo.models.vlm import VisionLanguageModel

    toks, im = _batch("qwen2_5_vl")
    hf = _hf_model(family="qwen2_5_vl")
    vlm = VisionLanguageModel(torch.nn.Identity(), None, hf.config.image_token_id, rope_config=hf.config)
    mask = (toks == hf.config.image_token_id).int()
    with torch.device("meta"):
        shim = Qwen2_5_VLModel(hf.config)
    want, deltas = shim.get_rope_index(toks, mm_token_type_ids=mask, image_grid_thw=im.image_grid_thw)
    positions = common.microbatch(toks)["position_ids"]
    got = vlm.language_positions(toks, positions, im.image_grid_thw, torch.tensor([mask[0].sum(), 0]))
    assert torch.equal(got, want) and not torch.equal(got[1:, 0], got[0, 0])
    assert torch.equal(got[:, 1], positions[1].expand(3, -1))  # text only: the three axes equal
    # two sampled tokens after row 0's prompt, the first of them the image token id
    longer = torch.cat([toks, torch.tensor([[hf.config.image_token_id, 20], [21, 22]])], 1)
    ext = vlm.language_positions(longer, common.microbatch(longer)["position_ids"], im.image_grid_thw,
                                 torch.tensor([mask[0].sum(), 0]))
    assert torch.equal(ext[:, :, :toks.shape[1]], want)
    after = torch.arange(toks.shape[1], longer.shape[1])
    assert torch.equal(ext[:, 0, toks.shape[1]:], (after + deltas[0]).expand(3, -1))
    assert int(deltas[0]) < 0  # an image's tokens take fewer positions than tokens
    assert torch.equal(vlm.language_positions(toks, positions), positions.expand(3, -1, -1))
    with pytest.raises(NotImplementedError, match="pixel_values_videos"):
        vlm(toks, positions, None, pixel_values_videos=torch.zeros(1))
