"""What a checkpoint says about itself: its metadata file, the ``latest`` pointer of a checkpoint root,
and the architecture it was saved with.

Plain files and JSON, no torch: the config loader reads architectures from here (a config that names
checkpoints need not repeat them) without importing the distributed stack.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Dict

from megatron_gndpo.config.schema import ModelConfig

META_FILE = "gndpo_meta.json"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
TOKENIZER_DIR = "tokenizer"


class CheckpointIntegrityError(ValueError):
    """A checkpoint is damaged or incomplete; the message names the file."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint or a checkpoint root (it has metadata, or a ``latest`` pointer)."""
    path = Path(path)
    return (path / META_FILE).is_file() or (path / LATEST_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` when it is a checkpoint (it has ``gndpo_meta.json``), or the checkpoint its ``latest``
    names when it is a checkpoint root (``RUN/checkpoints``)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    pointer = path / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if not STEP_DIR.fullmatch(name):
            raise CheckpointIntegrityError(f"{pointer} holds {name[:80]!r}, not the name of a step checkpoint")
        target = path / name
        if not (target / META_FILE).is_file():
            raise CheckpointIntegrityError(f"{pointer} names {target}, which is not a complete checkpoint "
                                           f"(no {META_FILE}); name an intact step_* directory instead")
        return target
    raise FileNotFoundError(f"{path} is not a megatron-gndpo checkpoint (no {META_FILE}) nor a checkpoint "
                            f"directory (no {LATEST_FILE})")


def read_meta(path: str | os.PathLike) -> Dict[str, Any]:
    meta = Path(path) / META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a megatron-gndpo checkpoint (no {META_FILE})")
    try:
        return json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointIntegrityError(f"{meta} is damaged: {e}") from None


def model_config_from_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """The architecture a checkpoint (or, through ``latest``, a checkpoint root) was saved with. A
    field this version does not know is refused by name; one the checkpoint predates takes its default."""
    ckpt = resolve_checkpoint(path)
    saved = read_meta(ckpt)["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"checkpoint {ckpt} records model fields this version does not know: {', '.join(unknown)}; "
                         "upgrade megatron-gndpo to load it")
    return ModelConfig(**saved)

