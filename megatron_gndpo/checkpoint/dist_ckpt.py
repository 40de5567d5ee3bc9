"""Training checkpoints with megatron-core ``dist_checkpointing``: resumable, resharding across TP / PP.

Layout of ``root``::

    root/latest                 the name of the newest complete checkpoint (replaced atomically)
    root/step_00000010/         a megatron dist-checkpoint + gndpo_meta.json + tokenizer/
    root/step_00000020.tmp/     a save in progress (or one killed mid-way; removed by the next save)

A checkpoint is written into ``*.tmp`` and renamed into place only after every rank has finished
and the metadata, with the size and content hash of every file (``integrity.py``), is on disk;
``latest`` moves after the rename: a kill at any moment leaves the previous checkpoint complete and
pointed to. Loads check every file's size; a resume whose ``latest`` is damaged falls back, loudly,
to the newest intact checkpoint before it.

Model weights always live under the top-level key ``model`` with megatron's own sharded keys, so a
weights-only checkpoint (from ``tools/checkpoint_convert``) and a training checkpoint load the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_gndpo.checkpoint.integrity import (checkpoint_problem, file_manifest, foreign_files, hashes_requested,
                                                 remove_own_dir, replace_dir, verify_checkpoint)
from megatron_gndpo.checkpoint.metadata import (LATEST_FILE, META_FILE, STEP_DIR, TOKENIZER_DIR,  # noqa: F401
                                                CheckpointIntegrityError, model_config_from_checkpoint, read_meta,
                                                resolve_checkpoint)
from megatron_gndpo.config.schema import ModelConfig

log = logging.getLogger(__name__)

# A vision-language model's processor files (image processor, processor config, its chat template) travel
# with the tokenizer's: data/vision.py's load_vision_processor reads both from one directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "video_preprocessor_config.json")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> List[str]:
    """Copies the Hugging Face tokenizer files (chat template and generation config included) that
    ``src`` has into ``dst`` (created when there is one); returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_architecture(path: str | os.PathLike, model: ModelConfig, role: str) -> None:
    """The checkpoint's architecture must be the configured one (the layout may differ: dist
    checkpoints reshard)."""
    saved = dataclasses.asdict(model_config_from_checkpoint(path))
    ours = dataclasses.asdict(model)
    keys = [k for k in ours if k not in ("max_position_embeddings",)]
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {ours[k]!r}" for k in keys if saved.get(k) != ours[k]]
    if diff:
        raise ValueError(f"checkpoint {path} holds a different {role} architecture than configured: " + "; ".join(diff))


def write_meta(path: str | os.PathLike, model: ModelConfig, parallel_layout: Dict[str, int], **extra) -> None:
    payload = {"model": dataclasses.asdict(model), "layout": parallel_layout, **extra}
    tmp = Path(path) / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, Path(path) / META_FILE)


def load_model_weights(model, path: str | os.PathLike, model_config: ModelConfig, role: str, *,
                       vision_language: bool = False, dp_cp_group=None) -> None:
    """Weights of ``model`` (one pipeline stage, any TP x PP) from a checkpoint written at any layout
    (or the one a checkpoint root's ``latest`` names). Collective. Every file's size is checked first,
    and its content hash with ``MEGATRON_GNDPO_VERIFY_HASHES=1``.

    A vision-language checkpoint is refused unless ``vision_language`` (its caller, models/vlm.py's
    ``load_vlm_checkpoint``, loads the vision side too): a text model loaded from it would drop
    its vision tower without a word.

    A checkpoint whose vocabulary was padded for another TP loads as well: megatron marks the
    embedding and output layer ``allow_shape_mismatch``, so the stored rows that fit are read
    exactly and the model's padding rows past the stored ones are zero.

    ``dp_cp_group``: the data-parallel group of a model built on groups of its own (the teacher on
    ``teacher.parallel``), which names its replicas; None: ``parallel_state``'s."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    vision = read_meta(path).get("vision")
    if vision is not None and not vision_language:
        raise ValueError(f"{role} checkpoint {path} is a vision-language ({vision.get('family')}) checkpoint: loading "
                         "its language model alone would drop its vision tower; build it with "
                         "megatron_gndpo.models.vlm.load_vlm_checkpoint")
    verify_checkpoint(path, hashes=hashes_requested())
    check_architecture(path, model_config, role)
    metadata = None if dp_cp_group is None else {"dp_cp_group": dp_cp_group}
    state = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=metadata)}, str(path))
    model.load_state_dict(state["model"], strict=True)


def _refuse_foreign(*paths: Path) -> None:
    """Every rank: a directory about to be replaced or removed must hold only our own files."""
    for path in paths:
        foreign = foreign_files(path)
        if foreign:
            raise FileExistsError(f"{path} holds files megatron-gndpo did not write ({', '.join(foreign[:5])}): "
                                  "move them or choose another checkpoint path; nothing was written")


def _save_atomically(state: Dict[str, Any], final: Path, model_config: ModelConfig, layout: Dict[str, int], *,
                     tokenizer: Optional[str | os.PathLike] = None,
                     add_files: Optional[Callable[[Path], None]] = None, **extra) -> None:
    """Collective: write ``state`` (and the files of ``tokenizer``, a tokenizer directory, under
    ``tokenizer/``; and what ``add_files``, called on rank 0 with the directory, writes there) to
    ``final.tmp`` (a stale one is replaced), add the metadata with the file manifest, and rename it
    to ``final`` only when every rank is done. An existing ``final`` is replaced only when it holds
    nothing but megatron-gndpo's own files."""
    from megatron.core import dist_checkpointing

    tmp = Path(f"{final}.tmp")
    _refuse_foreign(final, tmp)
    _barrier()
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(state, str(tmp))
    if _rank0() and tokenizer is not None:
        if not copy_tokenizer(tokenizer, tmp / TOKENIZER_DIR):
            log.warning("tokenizer directory %s has none of %s: %s gets no tokenizer", tokenizer,
                        ", ".join(TOKENIZER_FILES), final)
    if _rank0() and add_files is not None:
        add_files(tmp)
    _barrier()
    manifest = file_manifest(tmp)
    if _rank0():
        write_meta(tmp, model_config, layout, **extra, **manifest)
        replace_dir(tmp, final)
    _barrier()


def save_sharded_weights(sharded_state_dict: Dict[str, Any], path: str | os.PathLike, model_config: ModelConfig,
                         layout: Dict[str, int], *, tokenizer: Optional[str | os.PathLike] = None,
                         add_files: Optional[Callable[[Path], None]] = None, **extra) -> None:
    """A weights-only dist-checkpoint from a model's sharded state dict (collective), written to
    ``path.tmp`` and renamed; ``tokenizer``: a tokenizer directory whose files go under ``tokenizer/``;
    ``add_files``: writes further files (a vision tower's) into the directory before its manifest."""
    _save_atomically({"model": sharded_state_dict}, Path(path), model_config, layout, tokenizer=tokenizer,
                     add_files=add_files, **extra)


def save_model_weights(model, path: str | os.PathLike, model_config: ModelConfig, layout: Dict[str, int], *,
                       tokenizer: Optional[str | os.PathLike] = None, **extra) -> None:
    save_sharded_weights(model.sharded_state_dict(), path, model_config, layout, tokenizer=tokenizer, **extra)


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointManager:
    """Save / find / load training checkpoints under one root directory."""

    def __init__(self, root: str | os.PathLike, *, layout: Dict[str, int], ranks: Dict[str, int]):
        self.root = Path(root)
        self.layout = layout  # {"tp", "pp", "dp"} and "cp" when context parallel
        self.ranks = ranks  # this rank's position in it

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names (None without one); an incomplete one is an error."""
        if not (self.root / LATEST_FILE).is_file():
            return None
        return resolve_checkpoint(self.root)

    def _steps(self) -> List[Tuple[int, Path]]:
        """(step, directory) of every finished step checkpoint directory, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def resume_point(self, *, hashes: Optional[bool] = None) -> Optional[Path]:
        """Collective. The checkpoint to resume from: the one ``latest`` names when it is intact (every
        file's size, and with ``hashes`` its content, as saved; default: ``MEGATRON_GNDPO_VERIFY_HASHES``);
        else the newest intact one before it, with a warning naming both. None when the root holds no
        checkpoint; CheckpointIntegrityError, listing each one's damage, when none is intact."""
        hashes = hashes_requested() if hashes is None else hashes
        pointer = self.root / LATEST_FILE
        steps = self._steps()
        candidates = [p for _, p in steps]
        damaged: List[str] = []
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            match = STEP_DIR.fullmatch(name)
            if match:
                candidates = [self.root / name] + [p for s, p in steps if s < int(match.group(1))]
            else:
                damaged.append(f"{pointer} holds {name[:80]!r}, not the name of a step checkpoint")
        for path in candidates:
            problem = checkpoint_problem(path, hashes=hashes)
            if problem is None:
                if damaged and _rank0():
                    log.warning("resume: the latest checkpoint is damaged (%s); resuming from %s instead, the "
                                "newest intact checkpoint before it", damaged[0], path)
                return path
            damaged.append(problem)
        if damaged:
            raise CheckpointIntegrityError(f"no intact checkpoint under {self.root} to resume from: "
                                           + "; ".join(damaged))
        return None

    def _rng_object(self):
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        # One object per (pp, tp) position; DP and CP replicas hold copies (replica_id != 0 are not written).
        replica = self.ranks["dp"] * self.layout.get("cp", 1) + self.ranks.get("cp", 0)
        return ShardedObject("rng_state", _rng_state(), (self.layout["pp"], self.layout["tp"]),
                             (self.ranks["pp"], self.ranks["tp"]), replica_id=replica)

    def _state(self, model, optimizer, scheduler, *, loading: bool) -> Dict[str, Any]:
        model_sd = model.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading),
            "rng_state": self._rng_object(),
            "scheduler": scheduler.state_dict(),
        }

    def save(self, step: int, model, optimizer, scheduler, *, model_config: ModelConfig,
             trainer_state: Dict[str, Any], tokenizer: Optional[str | os.PathLike] = None,
             keep: Optional[int] = None, add_files: Optional[Callable[[Path], None]] = None, **extra) -> Path:
        """Collective: every rank calls it. ``tokenizer``: the run's tokenizer directory, saved under
        the checkpoint's ``tokenizer/`` (an exported student needs it). ``add_files`` and ``extra`` as for
        :func:`save_sharded_weights` (a vision-language student's vision files and metadata). ``keep``: once the new
        checkpoint is complete and ``latest`` names it, delete older step checkpoints beyond the
        newest ``keep`` (this one included); None keeps them all."""
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be None or >= 1, got {keep}")
        final = self.root / f"step_{step:08d}"
        if _rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # left by a save that was killed
                if stale != Path(f"{final}.tmp"):  # that one is _save_atomically's, checked on every rank
                    self._remove(stale)
        state = self._state(model, optimizer, scheduler, loading=False)
        state["trainer"] = trainer_state
        _save_atomically(state, final, model_config, self.layout, tokenizer=tokenizer, add_files=add_files,
                         step=step, **extra)
        if _rank0():
            pointer_tmp = self.root / (LATEST_FILE + ".tmp")
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / LATEST_FILE)
            if keep is not None:
                for _, older in [(s, p) for s, p in self._steps() if s < step][keep - 1:]:
                    self._remove(older)
        _barrier()
        return final

    @staticmethod
    def _remove(path: Path) -> None:
        """Rank 0: deletes one of our directories; one holding a file we did not write stays, with a warning."""
        try:
            remove_own_dir(path)
        except FileExistsError as e:
            log.warning("checkpoint clean-up: %s", e)

    def load(self, path: str | os.PathLike, model, optimizer, scheduler, *,
             model_config: ModelConfig) -> Dict[str, Any]:
        """Restore everything saved at ``path``; returns the trainer state. Every file's size is checked
        first. RNG states are restored only when the checkpoint was taken at this same TP x PP layout
        (they are per rank)."""
        from megatron.core import dist_checkpointing

        verify_checkpoint(path, hashes=False)
        check_architecture(path, model_config, "model")
        meta = read_meta(path)
        same_layout = all(meta["layout"].get(k) == self.layout[k] for k in ("tp", "pp"))
        state = self._state(model, optimizer, scheduler, loading=True)
        if not same_layout:
            del state["rng_state"]
        state["trainer"] = None
        loaded = dist_checkpointing.load(state, str(path))
        model.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        return loaded["trainer"]
