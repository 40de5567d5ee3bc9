"""Where ``plan`` reads an architecture from: a converted checkpoint (its ``gndpo_meta.json``, through
``checkpoint.metadata``) or a Hugging Face model directory (only its ``config.json``, mapped by
``checkpoint.hf_mapping`` exactly as the converter maps it, so a config the converter would refuse is
refused here too)."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_gndpo.checkpoint.metadata import is_checkpoint, model_config_from_checkpoint
from megatron_gndpo.config.schema import ModelConfig


def read_architecture(path: str | os.PathLike) -> ModelConfig:
    """The architecture at ``path``: a checkpoint (or checkpoint root) or a directory with ``config.json``
    (a path to the ``config.json`` itself is accepted too)."""
    path = Path(path)
    if path.is_dir() and is_checkpoint(path):
        return model_config_from_checkpoint(path)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a megatron-gndpo checkpoint nor a Hugging Face model "
                                "directory (no config.json)")
    from transformers import AutoConfig

    from megatron_gndpo.checkpoint.hf_mapping import model_config_from_hf

    return model_config_from_hf(AutoConfig.from_pretrained(str(path), local_files_only=True))
