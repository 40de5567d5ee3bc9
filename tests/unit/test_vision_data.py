"""Prompts with images (data.images=process): decoding the ``images`` column, expanding ``<image>`` to
the checkpoint's image tokens exactly as transformers' own processors do, and the errors at dataset open.

The processors are built here from transformers classes (no download): a character-level tokenizer
with each family's special tokens and chat template, and the family's image processor on its PIL
backend at a tiny tile / patch size."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from megatron_gndpo.config.schema import AlgorithmConfig, DataConfig, RunConfig, TeacherConfig
from megatron_gndpo.data.images import read_images
from megatron_gndpo.data.prompts import PromptDataset, read_prompt_rows, verl_row, write_prompt_parquet
from megatron_gndpo.data.tokenizer import render_prompt
from megatron_gndpo.data.vision import load_vision_processor

SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# the image part of each family's chat template, as its checkpoints render it
IMAGE_PART = {"internvl": "'<IMG_CONTEXT>\\n'", "qwen2_5_vl": "'<|vision_start|><|image_pad|><|vision_end|>'"}
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT = "<image>Find x in the figure."


def _tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<unk>"] + SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"} if family == "internvl" else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  chat_template=TEMPLATE.replace("IMAGE", IMAGE_PART[family]),
                                  extra_special_tokens=names)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok


def _hf_processor(family: str, monkeypatch):
    """transformers' own processor of ``family``. Its constructor checks the (absent) video processor's
    class, which needs torchvision; that one check is skipped for a None video processor."""
    from transformers import InternVLProcessor, Qwen2_5_VLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))
    tok = _tokenizer(family)
    if family == "internvl":
        image_processor = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, max_patches=6)
        return InternVLProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                 chat_template=tok.chat_template)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def _save(processor, family: str, path) -> None:
    """What a checkpoint carries: tokenizer, image processor and processor config (written by hand:
    ``ProcessorMixin.save_pretrained`` fails without the video processor)."""
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    config = {"processor_class": type(processor).__name__}
    if family == "internvl":
        config["image_seq_length"] = processor.image_seq_length
    (path / "processor_config.json").write_text(json.dumps(config))


def _png(height: int, width: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _rows(tmp_path):
    """Row 0: a wide image as bytes; row 1: a tall image as a path relative to the parquet file; row 2:
    text only."""
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "tall.png").write_bytes(_png(84, 28, seed=1))
    return [verl_row([{"role": "user", "content": PROMPT}], "3", data_source="t", images=[{"bytes": _png(40, 90, 0)}]),
            verl_row([{"role": "user", "content": "Say it. " + PROMPT}], "4", data_source="t",
                     images=[{"path": "img/tall.png"}]),
            verl_row([{"role": "user", "content": "2+2="}], "4", data_source="t")]


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_image_prompts_match_the_transformers_processor(family, tmp_path, monkeypatch):
    hf = _hf_processor(family, monkeypatch)
    _save(hf, family, tmp_path / "ckpt")
    write_prompt_parquet(str(tmp_path / "d.parquet"), _rows(tmp_path))
    tok = _tokenizer(family)
    data = PromptDataset([str(tmp_path / "d.parquet")], tok, max_prompt_length=4096, images="process",
                         processor=load_vision_processor(str(tmp_path / "ckpt"), tok))
    images = [_image(_png(40, 90, 0)), _image((tmp_path / "img" / "tall.png").read_bytes())]
    image_token = hf.tokenizer.convert_tokens_to_ids(hf.image_token)
    counts = []
    for i, (text, image) in enumerate(zip(["", "Say it. "], images)):
        messages = [{"role": "user", "content": [{"type": "text", "text": text}] * bool(text) + [
            {"type": "image"}, {"type": "text", "text": PROMPT[len("<image>"):]}]}]
        rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want = hf(text=[rendered], images=[image], return_tensors="pt")
        assert data.prompt_ids(i) == want["input_ids"][0].tolist()
        inputs = data.image_inputs(i)
        torch.testing.assert_close(inputs.pixel_values, want["pixel_values"], rtol=0, atol=0)
        counts.append(int((want["input_ids"][0] == image_token).sum()))
        assert inputs.tokens_per_image == [counts[-1]]
        if family == "qwen2_5_vl":
            assert torch.equal(inputs.image_grid_thw, want["image_grid_thw"])
        else:
            assert inputs.pixel_values.shape[0] == sum(inputs.tiles_per_image)
    assert counts[0] != counts[1]  # the two sizes really take different numbers of tokens
    assert data.prompt_ids(2) == render_prompt(tok, [{"role": "user", "content": "2+2="}])
    assert data.image_inputs(2) is None
    # the prompt length counts the image tokens
    longest = max(len(data.prompt_ids(0)), len(data.prompt_ids(1)))
    with pytest.raises(ValueError, match=f"row [01]: the prompt is {longest} tokens"):
        PromptDataset([str(tmp_path / "d.parquet")], tok, max_prompt_length=longest - 1, images="process",
                      processor=load_vision_processor(str(tmp_path / "ckpt"), tok))


def test_bad_images_are_refused_at_open_naming_file_row_and_column(tmp_path):
    rows = _rows(tmp_path)
    rows[1]["images"] = [{"path": "img/missing.png"}]
    write_prompt_parquet(str(tmp_path / "a.parquet"), rows)
    with pytest.raises(ValueError, match=r"a\.parquet: row 1, column 'images', image 0: image file .*missing\.png "
                                         "not found"):
        read_prompt_rows([str(tmp_path / "a.parquet")], images="process")
    rows = _rows(tmp_path)
    rows[0]["images"] = [{"bytes": b"not an image"}]
    write_prompt_parquet(str(tmp_path / "b.parquet"), rows)
    with pytest.raises(ValueError, match=r"b\.parquet: row 0, column 'images', image 0: cannot decode the image "
                                         r"\(12 bytes\)"):
        read_prompt_rows([str(tmp_path / "b.parquet")], images="process")
    rows = _rows(tmp_path)
    rows[0]["images"] = [{"bytes": _png(40, 90, 0)[:-40]}]  # truncated: the header reads, the pixels do not
    write_prompt_parquet(str(tmp_path / "c.parquet"), rows)
    with pytest.raises(ValueError, match=r"c\.parquet: row 0, column 'images', image 0: cannot decode"):
        read_prompt_rows([str(tmp_path / "c.parquet")], images="process")
    rows = _rows(tmp_path)
    rows[1]["prompt"][0]["content"] += " <image>"
    write_prompt_parquet(str(tmp_path / "d.parquet"), rows)
    with pytest.raises(ValueError, match=r"d\.parquet: row 1, column 'images': the prompt has 2 <image> "
                                         "placeholders but the row has 1 images"):
        read_prompt_rows([str(tmp_path / "d.parquet")], images="process")
    # the text-only policies are unchanged
    write_prompt_parquet(str(tmp_path / "e.parquet"), _rows(tmp_path))
    with pytest.raises(ValueError, match="row 0, column 'images'.*text-only"):
        read_prompt_rows([str(tmp_path / "e.parquet")])
    assert [r.images for r in read_prompt_rows([str(tmp_path / "e.parquet")], images="ignore")] == [[], [], []]
    with pytest.raises(ValueError, match="data.images must be one of error, ignore, process, got 'keep'"):
        read_prompt_rows([str(tmp_path / "e.parquet")], images="keep")
    with pytest.raises(ValueError, match="data.images=process needs the vision processor"):
        PromptDataset([str(tmp_path / "e.parquet")], _tokenizer("internvl"), max_prompt_length=64, images="process")


def test_images_config():
    with pytest.raises(ValueError, match="data.images must be 'error', 'ignore' or 'process', got 'keep'"):
        DataConfig(images="keep")
    assert DataConfig(images="process").images == "process"
    RunConfig(data=DataConfig(images="process"))  # whether the checkpoints see images is checked when opened
    for section, match in ((dict(algorithm=AlgorithmConfig(estimator="gopd")), "algorithm.estimator=gopd"),
                           (dict(teacher=TeacherConfig(quantize="fp8")), "teacher.quantize"),
                           (dict(teacher=TeacherConfig(offload=True)), "teacher.offload")):
        with pytest.raises(ValueError, match=f"data.images=process does not take {match}"):
            RunConfig(data=DataConfig(images="process"), **section)


def test_geo3k_tool_keeps_the_images(tmp_path):
    from PIL import Image

    from tools.data import geo3k

    decoded = Image.open(io.BytesIO(_png(20, 30, 2)))  # what a save_to_disk dataset gives
    rows = geo3k.convert_rows([{"problem": "<image>Find x.", "answer": "3", "images": [{"bytes": _png(40, 90, 0)}]},
                               {"problem": "<image>Find y.", "answer": "4", "images": [decoded]}], "train")
    write_prompt_parquet(str(tmp_path / "train.parquet"), rows)
    read = read_prompt_rows([str(tmp_path / "train.parquet")], images="process")
    assert [(r.images[0].height, r.images[0].width) for r in read] == [(40, 90), (20, 30)]
    assert read[0].messages[0]["content"].startswith("<image>Find x.")
    assert read_images(str(tmp_path / "train.parquet"), 0, [{"bytes": _png(40, 90, 0)}])[0].open().size == (90, 40)


def test_a_prompts_samples_share_one_vision_tower_run_per_micro_batch():
    """Three rows: two samples of a prompt with two images (one ImageInputs object), a text-only row, a
    prompt with one image. The micro-batch carries the shared pixels once; the model runs the tower on the
    distinct images only and gives every row its images' embeddings in reading order, as if each row had
    carried its own pixels."""
    from megatron_gndpo.data.vision import ImageInputs
    from megatron_gndpo.models.vlm import VisionLanguageModel
    from megatron_gndpo.trainer.images import micro_batch_images

    def pixels(*values):
        return torch.tensor([[float(v)] for v in values])

    shared = ImageInputs(pixels(1, 2, 3), tokens_per_image=[2, 1], tiles_per_image=[2, 1])
    single = ImageInputs(pixels(7), tokens_per_image=[1], tiles_per_image=[1])
    mb = micro_batch_images([shared, None, shared, single], torch.device("cpu"))
    assert mb["pixel_values"].flatten().tolist() == [1, 2, 3, 7]  # the shared prompt's tiles once
    assert mb["image_source"].tolist() == [0, 1, 0, 1, 2]
    assert mb["image_tokens"].tolist() == [2, 1, 2, 1, 1] and mb["row_image_tokens"].tolist() == [3, 0, 3, 1]

    class Tower:  # one embedding per tile: the tile's value, scaled
        seen = []

        def image_features(self, pixel_values, image_tiles, image_tokens, image_grid_thw):
            self.seen.append(pixel_values.flatten().tolist())
            return 10 * pixel_values

    got = VisionLanguageModel.shared_image_features(Tower(), mb["pixel_values"], mb["image_source"],
                                                    mb["image_tokens"], mb["image_tiles"])
    assert Tower.seen == [[1, 2, 3, 7]]
    assert got.flatten().tolist() == [10, 20, 30, 10, 20, 30, 70]  # row 1's images, row 3's, row 4's
