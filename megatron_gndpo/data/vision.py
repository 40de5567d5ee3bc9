"""A vision-language checkpoint's image processing: pixels for the vision tower and the image tokens the
prompt holds, laid out exactly as the checkpoint's own transformers processor lays them out.

transformers' ``InternVLProcessor`` and ``Qwen2_5_VLProcessor`` cannot be built without torchvision
(their video processor is checked even when absent), which this project does not install. So this
module takes the two halves that do work with Pillow alone -- the checkpoint's image processor on
its PIL backend and its chat template -- and repeats the processors' placeholder expansion (a few
lines per family; tests/unit/test_vision_data.py holds it equal to the processors' own output):

- InternVL: each image is cut into tiles (plus a thumbnail when there are several) and fills
  ``<img>`` + ``image_seq_length`` x tiles ``<IMG_CONTEXT>`` + ``</img>``;
- Qwen2.5-VL: each image is resized to a grid of patches and fills ``<|vision_start|>`` +
  (grid / merge_size**2) ``<|image_pad|>`` + ``<|vision_end|>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from megatron_gndpo.data.images import ImageRef

PLACEHOLDER = "<image>"
"""How a prompt of the verl schema marks where its next image goes."""

FAMILIES = {"InternVLProcessor": "internvl", "Qwen2_5_VLProcessor": "qwen2_5_vl"}
"""The processor classes (``processor_class`` of a checkpoint's processor config) this module repeats."""


@dataclasses.dataclass
class ImageInputs:
    """One prompt's images as the vision tower takes them; what a micro-batch carries next to the
    token ids. The rows of ``pixel_values`` follow the order of the images in the prompt."""

    pixel_values: "torch.Tensor"  # noqa: F821 (torch is imported where the tensors are made)
    """InternVL: [tiles, 3, size, size], every image's tiles in turn; Qwen2.5-VL: [patches,
    3 * temporal_patch_size * patch_size**2], every image's flattened patches in turn."""
    tokens_per_image: List[int]
    """How many image-token positions (``<IMG_CONTEXT>`` / ``<|image_pad|>``) each image fills in the
    prompt: the vision tower's output rows for that image, in order."""
    tiles_per_image: Optional[List[int]] = None
    """InternVL: tiles (thumbnail included) each image was cut into; None for Qwen2.5-VL."""
    image_grid_thw: Optional["torch.Tensor"] = None  # noqa: F821
    """Qwen2.5-VL: [images, 3] patch grid (t, h, w) of each image, which its vision tower's 2-D RoPE
    and window attention need; None for InternVL."""


class VisionProcessor:
    """Images -> ``ImageInputs``, and chat messages with ``<image>`` placeholders -> prompt token ids
    with every placeholder expanded to the image's tokens."""

    def __init__(self, family: str, image_processor, tokenizer, *, image_seq_length: int = 256):
        if family not in FAMILIES.values():
            raise ValueError(f"unknown vision-language family {family!r} (known: {', '.join(FAMILIES.values())})")
        self.family, self.image_processor, self.tokenizer = family, image_processor, tokenizer
        self.image_seq_length = image_seq_length
        if family == "internvl":
            # the token names InternVLProcessor reads from the tokenizer
            self.start, self.end = tokenizer.start_image_token, tokenizer.end_image_token
            self.image_token = tokenizer.context_image_token
            # InternVLProcessor always tiles (its images_kwargs default), whatever the image processor's own
            # crop_to_patches says
            self.image_kwargs: Dict[str, object] = {"crop_to_patches": True}
        else:
            self.start, self.end = "", ""  # the chat template writes <|vision_start|> / <|vision_end|>
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.image_kwargs = {}
        for token in filter(None, (self.start, self.end, self.image_token)):
            if token not in tokenizer.get_vocab():
                raise ValueError(f"the tokenizer has no {token!r} token, which {family} prompts need for images")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompts with images need the checkpoint's chat template (it decides where an "
                             "image's tokens go); the tokenizer has none")

    def image_tokens(self, image: ImageRef) -> int:
        """The image-token positions ``image`` fills, from its size alone."""
        n = self.image_processor.get_number_of_image_patches(image.height, image.width, dict(self.image_kwargs))
        if self.family == "internvl":
            return self.image_seq_length * n
        return n // self.image_processor.merge_size ** 2

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], images: Sequence[ImageRef]) -> List[int]:
        """Chat messages -> prompt token ids ending with the assistant's turn opened, the k-th ``<image>``
        expanded to the k-th image's tokens. The chat template renders each image as the model expects
        (InternVL: ``<IMG_CONTEXT>`` and a newline; Qwen2.5-VL: ``<|vision_start|><|image_pad|>
        <|vision_end|>``), then that one image token becomes the image's run of tokens."""
        structured = []
        for m in messages:
            content = []
            for j, text in enumerate(m["content"].split(PLACEHOLDER)):
                if j:
                    content.append({"type": "image"})
                if text:
                    content.append({"type": "text", "text": text})
            structured.append({"role": m["role"], "content": content})
        rendered = self.tokenizer.apply_chat_template(structured, add_generation_prompt=True, tokenize=False)
        pieces = rendered.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the chat template rendered {len(pieces) - 1} image tokens {self.image_token!r} for "
                             f"{len(images)} images")
        text = pieces[0] + "".join(self.start + self.image_token * self.image_tokens(image) + self.end + piece
                                   for image, piece in zip(images, pieces[1:]))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pixels(self, images: Sequence[ImageRef]) -> ImageInputs:
        """The images decoded and processed by the checkpoint's image processor."""
        out = self.image_processor([image.open() for image in images], return_tensors="pt", **self.image_kwargs)
        if self.family == "internvl":
            tiles = [int(n) for n in out["num_patches"]]
            return ImageInputs(out["pixel_values"], [self.image_seq_length * n for n in tiles], tiles_per_image=tiles)
        grid = out["image_grid_thw"]
        tokens = [int(g.prod()) // self.image_processor.merge_size ** 2 for g in grid]
        return ImageInputs(out["pixel_values"], tokens, image_grid_thw=grid)


def load_vision_processor(path: str, tokenizer) -> VisionProcessor:
    """The vision processor of a local Hugging Face checkpoint or processor directory (never downloads):
    its family from ``processor_class``, its image processor on the PIL backend."""
    from transformers import AutoImageProcessor

    config: Dict[str, object] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):  # the processor's own file wins
        if (Path(path) / name).is_file():
            config.update(json.loads((Path(path) / name).read_text()))
    family = FAMILIES.get(config.get("processor_class"))
    if family is None:
        raise ValueError(f"{path}: processor_class {config.get('processor_class')!r} is not a supported "
                         f"vision-language processor ({', '.join(FAMILIES)})")
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    return VisionProcessor(family, image_processor, tokenizer, image_seq_length=int(config.get("image_seq_length",
                                                                                                 256)))
