"""Images in the scoring and training micro-batches, and the check that teacher and student see the
same image-token layout.

A micro-batch of a vision-language model carries, on the first pipeline stage only, the images of
exactly the rows it holds (``mb["row_ids"]``, rank-local), in row order, under :data:`IMAGE_KEYS`;
``megatron_glue.model_forward`` hands them to the ``VisionLanguageModel``. Later stages receive
hidden states from the schedule and carry no pixels; with Qwen2.5-VL's images they carry the images'
grids and each row's image-token count, from which every stage lays out the M-RoPE positions.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

from megatron_gndpo.data.images import ImageRef
from megatron_gndpo.data.vision import ImageInputs, VisionProcessor
from megatron_gndpo.distributed.init import ProcessGroups

MicroBatch = Dict[str, torch.Tensor]

IMAGE_KEYS = ("pixel_values", "image_source", "image_tiles", "image_tokens", "image_grid_thw", "row_image_tokens")
"""What a micro-batch's images are made of: ``pixel_values`` (the tiles / patches of each distinct image
once: the rows of one prompt's samples share its ``ImageInputs``, and the vision tower runs once per
prompt), per image in reading order ``image_source`` (which distinct image it is), ``image_tiles``
(InternVL) or ``image_grid_thw`` (Qwen2.5-VL) and ``image_tokens``, per row ``row_image_tokens`` (the
image tokens its prompt holds)."""


def micro_batch_images(images: Sequence[Optional[ImageInputs]], device: torch.device, *,
                       pixels: bool = True) -> MicroBatch:
    """The :data:`IMAGE_KEYS` tensors of rows whose images are ``images`` (None: a text-only row), in
    row order; {} when no row has images. Without ``pixels`` (a later pipeline stage) only what the
    M-RoPE positions need: ``image_grid_thw`` and ``row_image_tokens`` of Qwen2.5-VL images, else {}."""
    present = [im for im in images if im is not None]
    grids = present and all(im.image_grid_thw is not None for im in present)
    if not present or not (pixels or grids):
        return {}
    out = {"row_image_tokens": torch.tensor([sum(im.tokens_per_image) if im is not None else 0 for im in images],
                                            device=device)}
    if grids:
        out["image_grid_thw"] = torch.cat([im.image_grid_thw for im in present]).to(device)
    if not pixels:
        return out
    distinct = list({id(im): im for im in present}.values())  # the samples of a prompt share one object
    first_image = dict(zip(map(id, distinct), itertools.accumulate([len(im.tokens_per_image) for im in distinct],
                                                                   initial=0)))
    out["pixel_values"] = torch.cat([im.pixel_values for im in distinct]).to(device)
    out["image_source"] = torch.tensor([first_image[id(im)] + k for im in present
                                        for k in range(len(im.tokens_per_image))], device=device)
    out["image_tokens"] = torch.tensor([n for im in present for n in im.tokens_per_image], device=device)
    if all(im.tiles_per_image is not None for im in present):
        out["image_tiles"] = torch.tensor([n for im in present for n in im.tiles_per_image], device=device)
    return out


def sampler_images(images: Sequence[Optional[ImageInputs]]) -> Dict[str, Sequence[Optional[ImageInputs]]]:
    """``generate``'s ``images`` argument for rows whose images are ``images``: {} when no row has any,
    so a text-only batch samples exactly as without images (and a text model is never handed them)."""
    return {"images": images} if any(im is not None for im in images) else {}


def attach_images(microbatches: List[MicroBatch], per_row_images: Sequence[Optional[ImageInputs]],
                  groups: ProcessGroups) -> None:
    """Adds to each micro-batch the images of its rows ``mb["row_ids"]`` (indices into
    ``per_row_images``, this rank's rows), on the first pipeline stage; on the others their layout
    alone, where the positions need it (:func:`micro_batch_images` without pixels)."""
    for mb in microbatches:
        mb.update(micro_batch_images([per_row_images[r] for r in mb["row_ids"].tolist()], mb["tokens"].device,
                                     pixels=groups.is_first_stage))


def _token_at(processor: VisionProcessor, ids: List[int], k: int) -> str:
    return repr(processor.tokenizer.convert_ids_to_tokens(ids[k])) if k < len(ids) else "the end"


def check_same_image_layout(student: VisionProcessor, teacher: VisionProcessor, messages: Sequence[Dict[str, str]],
                            images: Sequence[ImageRef], where: str = "") -> None:
    """Raises ValueError unless ``teacher``'s processor turns this prompt and its images into the same
    token ids and pixel values as ``student``'s: the teacher scores the student's tokens with the
    student's pixels, so a teacher whose processor writes another image-token layout (another image
    token, ``image_seq_length``, tiling, patch grid or normalisation) would see image embeddings in the
    wrong places. The message names what differs; ``where`` says which row."""
    prefix = f"{where}: " if where else ""
    if student.family != teacher.family:
        raise ValueError(f"{prefix}the student's processor is {student.family}, the teacher's {teacher.family}")
    s_ids, t_ids = student.prompt_ids(messages, images), teacher.prompt_ids(messages, images)
    if s_ids != t_ids:
        k = next((i for i, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
        raise ValueError(f"{prefix}teacher and student processors write different prompt tokens "
                         f"({len(t_ids)} vs {len(s_ids)} tokens; first difference at position {k}: teacher "
                         f"{_token_at(teacher, t_ids, k)}, student {_token_at(student, s_ids, k)}); they must share"
                         " the image-token layout (image token, image_seq_length, tiling)")
    s_px, t_px = student.pixels(images), teacher.pixels(images)
    for field in ("tokens_per_image", "tiles_per_image", "image_grid_thw"):
        s_value, t_value = (v.tolist() if isinstance(v, torch.Tensor) else v
                            for v in (getattr(s_px, field), getattr(t_px, field)))
        if s_value != t_value:
            raise ValueError(f"{prefix}teacher and student processors disagree on {field}: teacher "
                             f"{t_value}, student {s_value}")
    if s_px.pixel_values.shape != t_px.pixel_values.shape or not torch.equal(s_px.pixel_values, t_px.pixel_values):
        raise ValueError(f"{prefix}teacher and student image processors make different pixel values (shapes "
                         f"{tuple(t_px.pixel_values.shape)} vs {tuple(s_px.pixel_values.shape)}): compare their "
                         "image processor configs (size, normalisation)")
