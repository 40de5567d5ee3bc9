"""The vision side of a vision-language checkpoint (InternVL, Qwen2.5-VL): what a converted checkpoint
stores besides the language model, and how it is read back.

A converted vision-language checkpoint is a text checkpoint of its language model (megatron dist-checkpoint,
resharded on load like any other) plus:

- ``vision/model.safetensors``: the vision tower and projector, whole, under the vision module's
  names (InternVL: ``vision_tower.*``, ``multi_modal_projector.*``; Qwen2.5-VL: ``visual.*``, its
  patch merger included), in their stored dtype. They are
  replicated on every tensor-parallel rank of the first pipeline stage (models/vlm.py), so one copy
  serves every layout; the file is in the checkpoint's manifest like every other;
- ``vision`` in ``gndpo_meta.json``: the family, ``image_token_id``, the original top-level
  ``config.json`` (vision config, projector and pixel-shuffle settings included), from which the
  model is rebuilt without the Hugging Face directory and which ``megatron-to-hf`` writes back, and
  which of the family's two namings (models/vlm.py's ``VLM_FAMILIES``) the tensors had, which the
  export writes back;
- the processor files (image processor, ``processor_config.json``, chat template) beside the
  tokenizer's in ``tokenizer/``, where data/vision.py's ``load_vision_processor`` finds them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_gndpo.checkpoint.metadata import read_meta

VISION_DIR = "vision"
VISION_WEIGHTS = f"{VISION_DIR}/model.safetensors"


def vision_family(config: Mapping[str, Any]) -> Optional[str]:
    """The vision-language family (models/vlm.py's ``VLM_FAMILIES``) of a Hugging Face ``config.json``
    (as a dict), None for a text model."""
    from megatron_gndpo.models.vlm import VLM_FAMILIES

    model_type = config.get("model_type")
    return model_type if model_type in VLM_FAMILIES else None


def vision_record(config: Mapping[str, Any], hf_config, naming: str) -> Dict[str, Any]:
    """The ``vision`` entry of a converted checkpoint's metadata: family, image token, the original
    ``config.json`` (``config``) whose parsed form is ``hf_config``, and the tensors' ``naming``."""
    return {"family": vision_family(config), "image_token_id": int(hf_config.image_token_id),
            "hf_config": dict(config), "hf_names": naming}


def is_vision_language(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``path`` (or the one its ``latest`` names) has a vision side."""
    from megatron_gndpo.checkpoint.metadata import resolve_checkpoint

    return read_meta(resolve_checkpoint(path)).get("vision") is not None


def vlm_config(ckpt: str | os.PathLike):
    """The transformers config (``InternVLConfig``, ``Qwen2_5_VLConfig``) a converted vision-language
    checkpoint records."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    record = read_meta(ckpt).get("vision")
    if record is None or vision_family({"model_type": record.get("family")}) is None:
        raise ValueError(f"{ckpt} is not a converted vision-language checkpoint (its metadata has no vision entry "
                         "of a supported family)")
    return CONFIG_MAPPING[record["family"]].from_dict(record["hf_config"])


def check_vision_tensors(hf_config, shapes: Mapping[str, Tuple[int, ...]], hf_name: Callable[[str], str]) -> None:
    """The vision-side tensors of a vision-language checkpoint (vision module name -> shape) must be
    exactly those the family's vision module of ``hf_config`` has, in its shapes: an unknown or missing
    tensor is a KeyError, a wrong shape a ValueError, naming it as ``hf_name`` (its checkpoint name)."""
    from megatron_gndpo.models.vlm import vlm_family

    family = hf_config.model_type
    with torch.device("meta"):  # the module's names and shapes, no memory
        want = {k: tuple(t.shape) for k, t in vlm_family(family).vision(hf_config).state_dict().items()}
    unknown, missing = sorted(set(shapes) - set(want)), sorted(set(want) - set(shapes))
    if unknown:
        raise KeyError(f"{family} checkpoint has vision tensors this config does not use: "
                       f"{[hf_name(k) for k in unknown[:5]]}")
    if missing:
        raise KeyError(f"{family} checkpoint lacks vision tensors this config needs: "
                       f"{[hf_name(k) for k in missing[:5]]}")
    for key, shape in shapes.items():
        if tuple(shape) != want[key]:
            raise ValueError(f"Hugging Face tensor {hf_name(key)!r} has shape {tuple(shape)}, the config implies "
                             f"{want[key]}")


def write_vision_weights(ckpt: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """The vision side (vision module names) under ``ckpt/vision/``."""
    from safetensors.torch import save_file

    path = Path(ckpt) / VISION_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata={"format": "pt"})


def read_vision_weights(ckpt: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The vision side of a converted checkpoint, under its vision module's names."""
    from safetensors.torch import load_file

    path = Path(ckpt) / VISION_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a vision-language checkpoint keeps its vision tower there")
    return load_file(str(path))


def copy_vision_weights(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``src``'s vision files into checkpoint ``dst``, byte for byte."""
    shutil.copytree(Path(src) / VISION_DIR, Path(dst) / VISION_DIR)



def student_vision_files(initial: str | os.PathLike, model) -> Dict[str, Any]:
    """What a vision-language student's training checkpoint adds to a text one's, as
    ``CheckpointManager.save`` arguments: the ``vision`` metadata of its initial checkpoint ``initial`` and
    an ``add_files`` that writes ``model``'s (a ``VisionLanguageModel``) current vision side, projector
    included, to ``vision/`` (rank 0, which holds the first pipeline stage). A resume reads the vision
    side back from the checkpoint's sharded state; ``megatron-gndpo convert megatron-to-hf`` and
    ``load_vlm_checkpoint`` read these files, as from a converted checkpoint."""
    from megatron_gndpo.checkpoint.metadata import resolve_checkpoint

    record = read_meta(resolve_checkpoint(initial))["vision"]

    def add_files(ckpt: Path) -> None:
        write_vision_weights(ckpt, {k: t.detach().cpu() for k, t in model.vision.state_dict().items()})

    return {"vision": record, "add_files": add_files}
