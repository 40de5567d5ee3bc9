"""Training checkpoints with megatron-core ``dist_checkpointing``: resumable, resharding across TP / PP.

Layout of ``root``::

    root/latest                 the name of the newest complete checkpoint (replaced atomically)
    root/step_00000010/         a megatron dist-checkpoint + gndpo_meta.json
    root/step_00000020.tmp/     a save in progress (or one killed mid-way; removed by the next save)

A checkpoint is written into ``*.tmp`` and renamed into place only after every rank has finished
and the metadata is on disk, and ``latest`` moves after the rename: a kill at any moment leaves the
previous checkpoint complete and pointed to.

Model weights always live under the top-level key ``model`` with megatron's own sharded keys, so a
weights-only checkpoint (from ``tools/checkpoint_convert``) and a training checkpoint load the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_gndpo.config.schema import ModelConfig

META_FILE = "gndpo_meta.json"
LATEST_FILE = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def read_meta(path: str | os.PathLike) -> Dict[str, Any]:
    meta = Path(path) / META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a megatron-gndpo checkpoint (no {META_FILE})")
    return json.loads(meta.read_text())


def check_architecture(path: str | os.PathLike, model: ModelConfig, role: str) -> None:
    """The checkpoint's architecture must be the configured one (the layout may differ: dist
    checkpoints reshard)."""
    saved = read_meta(path)["model"]
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


def load_model_weights(model, path: str | os.PathLike, model_config: ModelConfig, role: str) -> None:
    """Weights of ``model`` (one pipeline stage, any TP x PP) from a checkpoint written at any layout."""
    from megatron.core import dist_checkpointing

    check_architecture(path, model_config, role)
    meta = read_meta(path)
    saved_tp = meta["layout"].get("tp", 1)
    saved_vocab = ModelConfig(**meta["model"]).padded_vocab_size(saved_tp)
    if getattr(model, "vocab_size", saved_vocab) != saved_vocab:
        raise ValueError(
            f"checkpoint {path} was written for TP={saved_tp} with the vocabulary padded to {saved_vocab} rows; "
            f"this {role} at its TP pads it to {model.vocab_size}: convert it with "
            "`python -m tools.checkpoint_convert reshard --tp N` first")
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"], strict=True)


def _save_atomically(state: Dict[str, Any], final: Path, model_config: ModelConfig, layout: Dict[str, int],
                     **extra) -> None:
    """Collective: write ``state`` to ``final.tmp`` (a stale one is replaced), add the metadata, and
    rename it to ``final`` only when every rank is done."""
    from megatron.core import dist_checkpointing

    tmp = Path(f"{final}.tmp")
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank0():
        write_meta(tmp, model_config, layout, **extra)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()


def save_sharded_weights(sharded_state_dict: Dict[str, Any], path: str | os.PathLike, model_config: ModelConfig,
                         layout: Dict[str, int], **extra) -> None:
    """A weights-only dist-checkpoint from a model's sharded state dict (collective), written to
    ``path.tmp`` and renamed."""
    _save_atomically({"model": sharded_state_dict}, Path(path), model_config, layout, **extra)


def save_model_weights(model, path: str | os.PathLike, model_config: ModelConfig, layout: Dict[str, int],
                       **extra) -> None:
    save_sharded_weights(model.sharded_state_dict(), path, model_config, layout, **extra)


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
        self.layout = layout  # {"tp", "pp", "dp"}
        self.ranks = ranks  # this rank's {"tp", "pp", "dp"}

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST_FILE
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{pointer} points to {path}, which is not a complete checkpoint")
        return path

    def _rng_object(self):
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        # One object per (pp, tp) position; DP replicas hold copies (replica_id != 0 are not written).
        return ShardedObject("rng_state", _rng_state(), (self.layout["pp"], self.layout["tp"]),
                             (self.ranks["pp"], self.ranks["tp"]), replica_id=self.ranks["dp"])

    def _state(self, model, optimizer, scheduler, *, loading: bool) -> Dict[str, Any]:
        model_sd = model.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading),
            "rng_state": self._rng_object(),
            "scheduler": scheduler.state_dict(),
        }

    def save(self, step: int, model, optimizer, scheduler, *, model_config: ModelConfig,
             trainer_state: Dict[str, Any]) -> Path:
        """Collective: every rank calls it."""
        final = self.root / f"step_{step:08d}"
        if _rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # left by a save that was killed
                shutil.rmtree(stale)
        state = self._state(model, optimizer, scheduler, loading=False)
        state["trainer"] = trainer_state
        _save_atomically(state, final, model_config, self.layout, step=step)
        if _rank0():
            pointer_tmp = self.root / (LATEST_FILE + ".tmp")
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / LATEST_FILE)
        _barrier()
        return final

    def load(self, path: str | os.PathLike, model, optimizer, scheduler, *,
             model_config: ModelConfig) -> Dict[str, Any]:
        """Restore everything saved at ``path``; returns the trainer state. RNG states are restored
        only when the checkpoint was taken at this same TP x PP layout (they are per rank)."""
        from megatron.core import dist_checkpointing

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
