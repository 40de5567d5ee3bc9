"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

:class:`HFCheckpointReader` opens every shard lazily (safetensors memory-maps it) and copies a
tensor out only when asked; :class:`HFShardWriter` is given the full list of tensors up front,
so it knows the shard names (``model-0000i-of-0000N``) before the first byte, and writes each
shard the moment its last tensor arrives. Together they keep a conversion's memory at about one
decoder layer plus one shard.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

INDEX_FILE = "model.safetensors.index.json"


def progress_bar(total: int, what: str):
    """A transient rich progress bar and its task id (long conversions are minutes per direction)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    return progress, progress.add_task(what, total=total)


class HFCheckpointReader(contextlib.AbstractContextManager):
    """Tensors of ``model.safetensors`` or of the shards its index lists, read on demand."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            listed = dict(json.loads(index.read_text())["weight_map"])
        elif (self.hf_dir / "model.safetensors").is_file():
            listed = {}
        else:
            raise FileNotFoundError(f"{hf_dir} has no model.safetensors or {INDEX_FILE}")
        self._stack = contextlib.ExitStack()
        self._handles: Dict[str, object] = {}
        # What the shards' headers say is authoritative (cheap to read: no tensor data is touched);
        # an index entry its shard does not back is an error naming the tensor.
        self._file_of: Dict[str, str] = {}
        for name in sorted(set(listed.values())) or ["model.safetensors"]:
            self._file_of.update({key: name for key in self._open(name).keys()})
        broken = sorted(key for key, name in listed.items() if self._file_of.get(key) != name)
        if broken:
            raise KeyError(f"{INDEX_FILE} in {hf_dir} lists tensor {broken[0]!r} in {listed[broken[0]]}, "
                           f"which does not contain it ({len(broken)} such entries)")

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            path = self.hf_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but does not exist")
            self._handles[name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[name]

    def keys(self) -> List[str]:
        return list(self._file_of)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise KeyError(f"Hugging Face checkpoint {self.hf_dir} has no tensor {key!r}")
        return self._open(self._file_of[key]).get_tensor(key)

    def __exit__(self, *exc):
        self._stack.close()
        self._handles.clear()
        return None


def plan_shards(sizes: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Consecutive tensors packed into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: List[List[str]] = []
    size = 0
    for key, nbytes in sizes:
        if not shards or (shards[-1] and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


class HFShardWriter:
    """Writes the planned tensors as sharded safetensors plus ``model.safetensors.index.json``.

    ``sizes`` lists every tensor (name, bytes) in the order they will be added; a shard is written
    and dropped from memory as soon as it is complete, so at most one shard is held at a time.
    """

    def __init__(self, out_dir: str | Path, sizes: Sequence[Tuple[str, int]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._bytes = dict(sizes)
        self._shards = plan_shards(sizes, max_shard_bytes)
        n = len(self._shards)
        self._names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {key: i for i, keys in enumerate(self._shards) for key in keys}
        self._pending: Dict[int, Dict[str, torch.Tensor]] = {}
        self._added = set()
        self.progress, self._task = progress_bar(n, "writing safetensors")

    def add(self, key: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if key not in self._shard_of:
            raise KeyError(f"tensor {key!r} was not planned for this Hugging Face checkpoint")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != self._bytes[key]:
            raise ValueError(f"tensor {key!r} has {nbytes} bytes, {self._bytes[key]} were planned")
        i = self._shard_of[key]
        shard = self._pending.setdefault(i, {})
        shard[key] = tensor.contiguous()
        self._added.add(key)
        if len(shard) == len(self._shards[i]):
            save_file(self._pending.pop(i), str(self.out_dir / self._names[i]), metadata={"format": "pt"})
            self.progress.advance(self._task)

    def finish(self) -> Dict[str, object]:
        """Writes the index; every planned tensor must have been added."""
        missing = [key for key in self._bytes if key not in self._added]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        total = sum(self._bytes.values())
        weight_map = {key: self._names[i] for key, i in self._shard_of.items()}
        (self.out_dir / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return {"tensors": len(weight_map), "shards": len(self._names), "bytes": total}
