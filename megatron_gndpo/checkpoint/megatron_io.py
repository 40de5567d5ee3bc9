"""Megatron dist-checkpoints read and written one decoder layer at a time, in one process.

Both sides start from the ``sharded_state_dict`` of a model built on the *meta* device (no
memory) at TP=PP=1: it names every tensor with megatron's own layout-free key, offsets, factories
and extra-state objects, so what we write is exactly what a model at any TP x PP loads.

- Reading (:class:`MegatronCheckpointReader`): one layer's block of every stacked tensor, read
  from the checkpoint (a torch DCP one in megatron's ``torch_dist`` format) into fresh tensors.
- Writing (:func:`write_megatron_checkpoint`): megatron's saver needs every tensor at once, so each
  converted layer is appended to a memory-mapped scratch file next to the output and the state dict
  points into it. The page cache, not the process, holds the model while it is written, and the
  scratch file is deleted afterwards; its size is the checkpoint's.

Megatron's parallel groups must be initialised at TP=PP=1 (``convert.run`` does it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_gndpo.checkpoint.dist_ckpt import read_meta, save_sharded_weights
from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_gndpo.models.weights import sharded_tensors

META_PRECISION = PrecisionConfig(params_dtype="float32", transformer_impl="local")


def _meta_sharded_state_dict(cfg: ModelConfig, tp: int) -> dict:
    """The sharded state dict of the whole model (one process), its vocabulary padded as a model at
    TP=``tp`` pads it; tensors live on the meta device."""
    from megatron_gndpo.models.provider import build_gpt_model

    padded = dataclasses.replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)
    with torch.device("meta"):
        # CPU initialisation: on a GPU host megatron would otherwise allocate every weight on the GPU,
        # whatever the meta context says.
        model = build_gpt_model(padded, ParallelConfig(), META_PRECISION, pre_process=True, post_process=True,
                                cpu_initialization=True)
    return model.sharded_state_dict()


def _entries(sharded: Mapping[str, object]) -> Iterator[Tuple[str, object, Optional[int]]]:
    """(state-dict name, ShardedTensor or factory, decoder layer or None) for every tensor entry."""
    for name, item in sharded.items():
        pieces = sharded_tensors(item)
        if pieces:
            yield name, item, (pieces[0].global_offset[0] if pieces[0].prepend_axis_num else None)


def _with_data(item, data: torch.Tensor):
    if tuple(data.shape) != tuple(item.data.shape):
        raise ValueError(f"tensor {item.key!r} has shape {tuple(data.shape)}, "
                         f"the model expects {tuple(item.data.shape)}")
    dtype = {"dtype": data.dtype} if "dtype" in {f.name for f in dataclasses.fields(item)} else {}
    return dataclasses.replace(item, data=data, **dtype)


class _ChunkReader(DefaultLoadPlanner):
    """A torch DCP load planner that fills ``buffer`` with the block of stored tensor ``key`` that
    starts at ``offsets`` (key -> (offsets, buffer)); DCP intersects it with the stored chunks.

    Megatron's own ``dist_checkpointing.load`` cannot do this in one process: it rebuilds each
    tensor's whole shard grid and, with a world of one, counts the other layers' chunks as local.
    Its ``torch_dist`` format is a DCP checkpoint keyed by the sharded keys, so reading it through
    DCP's public planner API is the supported way to take one block.

    A module-level class on purpose: a class made per call is a reference cycle, and one that
    closed over the buffers kept every layer read until the next full garbage collection
    (measured: +2.7 GiB over a 32-layer reshard).
    """

    def __init__(self, requests: Mapping[str, Tuple[Tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, buffer) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class MegatronCheckpointReader:
    """Weights of a megatron-gndpo dist-checkpoint (weights-only or training), layer by layer."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = str(ckpt_dir)
        self.meta = read_meta(ckpt_dir)
        self.cfg = ModelConfig(**self.meta["model"])
        self.layout = self.meta["layout"]
        self._stored = dcp.FileSystemReader(self.ckpt_dir).read_metadata().state_dict_metadata
        # key -> (stored global shape, stacked over layers?) for every weight the model has
        self._keys: Dict[str, Tuple[torch.Size, bool]] = {}
        for _, item, layer in _entries(_meta_sharded_state_dict(self.cfg, self.layout.get("tp", 1))):
            if item.key not in self._stored:
                raise KeyError(f"{ckpt_dir} has no tensor {item.key!r}; is it a checkpoint of this architecture?")
            self._keys[item.key] = (self._stored[item.key].size, layer is not None)
        self.dtype = self._stored["embedding.word_embeddings.weight"].properties.dtype

    def _read(self, requests: Dict[str, Tuple[Tuple[int, ...], torch.Tensor]]) -> Dict[str, torch.Tensor]:
        dcp.load({}, storage_reader=dcp.FileSystemReader(self.ckpt_dir), planner=_ChunkReader(requests), no_dist=True)
        return {key: buffer for key, (_, buffer) in requests.items()}

    def non_layer(self) -> Dict[str, torch.Tensor]:
        """Embedding, final norm and output layer (vocabulary padded as stored)."""
        return self._read({key: ((0,) * len(shape), torch.empty(shape, dtype=self.dtype))
                           for key, (shape, stacked) in self._keys.items() if not stacked})

    def layer(self, i: int) -> Dict[str, torch.Tensor]:
        """Stacked key -> decoder layer ``i``'s tensor."""
        out = self._read({key: ((i,) + (0,) * (len(shape) - 1), torch.empty((1, *shape[1:]), dtype=self.dtype))
                          for key, (shape, stacked) in self._keys.items() if stacked})
        return {key: t[0] for key, t in out.items()}


class _ScratchFile:
    """Tensors appended to one file and handed back memory-mapped, each over exactly its own bytes.

    Megatron's writer clones every CPU tensor that does not span its whole storage (it stages
    tensors for an async save), so each tensor, and each piece a factory cuts out of one
    (:meth:`own_storage`), must be its own mapping: a view into a larger one would be copied into
    anonymous memory (measured: SwiGLU's gate / up halves cost +1.4 GiB on a 32-layer model).
    """

    ALIGN = 64

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._offset = 0
        self._offset_of: Dict[int, int] = {}  # storage address -> its offset in the file

    def _map(self, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        mapped = torch.from_numpy(np.memmap(self.path, dtype=np.uint8, mode="r+", offset=offset, shape=(nbytes,)))
        self._offset_of[mapped.data_ptr()] = offset
        return mapped.view(dtype).view(shape)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(raw))
        self._file.flush()
        offset = self._offset
        self._offset += raw.size
        pad = -self._offset % self.ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        return self._map(offset, raw.size, tensor.dtype, tensor.shape)

    def own_storage(self, view: torch.Tensor) -> torch.Tensor:
        """``view`` (a contiguous part of a tensor :meth:`put` returned) as its own mapping."""
        storage = view.untyped_storage()
        if view.numel() * view.element_size() == storage.nbytes():
            return view
        if not view.is_contiguous():
            raise ValueError("only a contiguous part of a staged tensor can be mapped on its own")
        offset = self._offset_of[storage.data_ptr()] + view.data_ptr() - storage.data_ptr()
        return self._map(offset, view.numel() * view.element_size(), view.dtype, view.shape)

    def close(self) -> None:
        self._file.close()


def write_megatron_checkpoint(out_dir: str | Path, cfg: ModelConfig, tp: int, pp: int,
                              parts: Iterable[Tuple[Optional[int], Mapping[str, torch.Tensor]]], *,
                              tokenizer: Optional[str | Path] = None,
                              add_files: Optional[Callable[[Path], None]] = None, **meta) -> Dict[str, object]:
    """A weights-only dist-checkpoint for a TP x PP layout from ``parts``: (None, the non-layer
    tensors, vocabulary padded for ``tp``) and (layer i, stacked key -> tensor) in any order, each
    dropped once staged. Every tensor the model has must be supplied (a missing one is named); the
    stored dtype is recorded in the metadata, the files of ``tokenizer`` (a directory) go under
    ``tokenizer/``; ``add_files`` writes further files into the checkpoint before its manifest (a
    vision-language model's vision side). Returns the number of tensors written and that dtype."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch_path = out.parent / f".{out.name}.scratch"
    scratch = _ScratchFile(scratch_path)
    try:
        staged = {}
        for layer, tensors in parts:
            staged.update({(key, layer): scratch.put(t) for key, t in tensors.items()})
        scratch.close()  # written; the mappings stay valid
        dtype = str(staged[("embedding.word_embeddings.weight", None)].dtype).replace("torch.", "")
        sharded = _meta_sharded_state_dict(cfg, tp)
        tensors = 0
        for name, item, layer in _entries(sharded):
            tensors += 1
            if (item.key, layer) not in staged:
                where = "" if layer is None else f" of layer {layer}"
                raise KeyError(f"no tensor was given for {item.key!r}{where}")
            item = _with_data(item, staged.pop((item.key, layer)))
            if not isinstance(item, ShardedTensor):  # a factory: megatron would cut it into views
                item = [dataclasses.replace(sh, data=scratch.own_storage(sh.data)) for sh in sharded_tensors(item)]
            sharded[name] = item
        if staged:
            raise KeyError(f"tensors the {cfg.num_hidden_layers}-layer model does not have: "
                           f"{sorted(map(str, staged))[:5]}")
        save_sharded_weights(sharded, out, cfg, {"tp": tp, "pp": pp}, tokenizer=tokenizer, add_files=add_files,
                             **{**meta, "dtype": dtype})
        return {"tensors": tensors, "dtype": dtype}
    finally:
        scratch.close()
        scratch_path.unlink(missing_ok=True)
