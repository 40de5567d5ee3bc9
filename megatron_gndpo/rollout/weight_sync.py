"""The student's weights under Hugging Face names, for pushing into a rollout engine (vLLM).

After every optimizer step the rollout engine needs the new weights in the layout it loads
(HF names, full tensors; vLLM's ``model.load_weights`` reshards them to its own TP). Each rank
holds TP shards of one pipeline stage, so the sync, per TP group:

1. walks the stage's tensors in megatron's sharded-state-dict order (each a slice of a layout-free
   global tensor: vocab-parallel embedding, column/row-parallel linears, SwiGLU gate and up halves),
2. packs them into buckets of about ``bucket_bytes`` and gathers each bucket with ONE all-gather
   (not one per parameter), placing every rank's slice at its global offset,
3. maps each completed decoder layer with the converter's ``layer_to_hf`` (the same function
   ``megatron-to-hf`` uses, so the engine sees exactly the names and layouts of an exported
   checkpoint), and yields HF buckets of about ``bucket_bytes``.

With ``across_pipeline`` each stage's buckets are also broadcast over the pipeline group, so every
rank sees the whole model (a colocated engine that does not pipeline needs every layer).
Replicated tensors (norms) are not gathered. Memory: one gather bucket plus one layer in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_gndpo.checkpoint.hf_mapping import layer_to_hf, non_layer_to_hf
from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.weights import local_pieces

HFBucket = List[Tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class _Piece:
    key: str
    layer: Optional[int]
    full_shape: Tuple[int, ...]
    """Shape of the whole tensor for this layer (layer axis dropped)."""
    slices: Tuple[Tuple[slice, ...], ...]
    """Per TP rank: where its local tensor sits in the whole one."""
    local: torch.Tensor
    """This rank's slice (a view of the parameter, so it follows every optimizer step)."""

    @property
    def replicated(self) -> bool:
        return all(s == self.slices[0] for s in self.slices) and tuple(self.local.shape) == self.full_shape


class WeightSync:
    """HF-named buckets of one pipeline stage's weights (unwrapped megatron model), gathered per TP group."""

    def __init__(self, model, cfg: ModelConfig, groups: ProcessGroups, bucket_bytes: int = 512 * 1024 ** 2):
        self.cfg, self.groups, self.bucket_bytes = cfg, groups, bucket_bytes
        mine = []
        for key, shape, index, local, _ in local_pieces(model):
            if key == "embedding.word_embeddings.weight" and not model.pre_process:
                continue  # a later stage's tied output layer: the first stage sends the embedding
            stacked = not isinstance(index[0], slice)
            layer, slices = (index[0], index[1:]) if stacked else (None, index)
            mine.append((key, layer, tuple(shape[1:] if stacked else shape), tuple((s.start, s.stop) for s in slices),
                         local))
        everyone = [None] * groups.tp_size
        dist.all_gather_object(everyone, [m[:4] for m in mine], group=groups.tp)
        self._pieces: List[_Piece] = []
        for j, (key, layer, full_shape, _, local) in enumerate(mine):
            if any(other[j][:3] != (key, layer, full_shape) for other in everyone):
                raise RuntimeError(f"TP ranks disagree on tensor #{j} ({key!r}, layer {layer}): models differ")
            slices = tuple(tuple(slice(a, b) for a, b in other[j][3]) for other in everyone)
            self._pieces.append(_Piece(key, layer, full_shape, slices, local))

    def _gather(self, pieces: List[_Piece]) -> Dict[Tuple[str, Optional[int]], torch.Tensor]:
        """(key, layer) -> whole tensor for ``pieces``, with one all-gather for all the sharded ones
        (a tensor may come as several pieces: SwiGLU's gate and up halves)."""
        whole = {(p.key, p.layer): p.local.detach().clone() for p in pieces if p.replicated}
        sharded = [p for p in pieces if not p.replicated]
        if sharded:
            flat = torch.cat([p.local.detach().reshape(-1) for p in sharded])
            parts = [torch.empty_like(flat) for _ in range(self.groups.tp_size)]
            dist.all_gather(parts, flat, group=self.groups.tp)
            for r, part in enumerate(parts):
                offset = 0
                for p in sharded:
                    target = whole.setdefault((p.key, p.layer), p.local.new_empty(p.full_shape))
                    n = p.local.numel()
                    target[p.slices[r]] = part[offset:offset + n].view(p.local.shape)
                    offset += n
        return whole

    def _gather_buckets(self) -> Iterator[Tuple[List[_Piece], Dict[Tuple[str, Optional[int]], torch.Tensor]]]:
        """Consecutive pieces in buckets of about ``bucket_bytes`` (gathered size), never splitting
        the pieces of one tensor."""
        bucket, size = [], 0
        for p in self._pieces:
            nbytes = p.local.numel() * p.local.element_size() * (1 if p.replicated else self.groups.tp_size)
            if bucket and size + nbytes > self.bucket_bytes and (bucket[-1].key, bucket[-1].layer) != (p.key, p.layer):
                yield bucket, self._gather(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            yield bucket, self._gather(bucket)

    def _stage_buckets(self) -> Iterator[HFBucket]:
        """This stage's weights as HF buckets (collective over the TP group)."""
        remaining: Dict[Optional[int], int] = {}
        for p in self._pieces:
            remaining[p.layer] = remaining.get(p.layer, 0) + 1
        whole: Dict[Optional[int], Dict[str, torch.Tensor]] = {}
        out: HFBucket = []
        size = 0
        for pieces, gathered in self._gather_buckets():
            for p in pieces:
                whole.setdefault(p.layer, {})[p.key] = gathered[(p.key, p.layer)]
                remaining[p.layer] -= 1
                if remaining[p.layer]:
                    continue
                tensors = whole.pop(p.layer)
                hf = non_layer_to_hf(tensors, self.cfg) if p.layer is None else layer_to_hf(tensors, self.cfg, p.layer)
                for name, t in hf.items():
                    out.append((name, t))
                    size += t.numel() * t.element_size()
                if size >= self.bucket_bytes:
                    yield out
                    out, size = [], 0
        if out:
            yield out

    def hf_buckets(self, *, across_pipeline: bool = False) -> Iterator[HFBucket]:
        """Buckets of (HF name, full tensor). Collective over the TP group, and over the pipeline group
        with ``across_pipeline`` (then every stage yields every stage's buckets, stage 0 first)."""
        if not across_pipeline or self.groups.pp_size == 1:
            yield from self._stage_buckets()
            return
        pp = self.groups.pp
        for stage in range(self.groups.pp_size):
            src = dist.get_global_rank(pp, stage)
            owner = self.groups.pp_rank == stage
            buckets = self._stage_buckets() if owner else None
            while True:
                bucket = next(buckets, None) if owner else None
                header = [[(name, tuple(t.shape), t.dtype) for name, t in bucket] if bucket is not None else None]
                dist.broadcast_object_list(header, src=src, group=pp)
                if header[0] is None:
                    break
                yield self._broadcast(header[0], bucket, src)

    def _broadcast(self, header, bucket: Optional[HFBucket], src: int) -> HFBucket:
        """One bucket from global rank ``src`` (which passes it) to the pipeline group: flat per dtype."""
        sending = bucket is not None
        tensors = dict(bucket) if sending else {}
        out = []
        for dtype in sorted({d for _, _, d in header}, key=str):
            entries = [(name, shape) for name, shape, d in header if d == dtype]
            if sending:
                flat = torch.cat([tensors[name].reshape(-1) for name, _ in entries])
            else:
                flat = torch.empty(sum(torch.Size(s).numel() for _, s in entries), dtype=dtype, device=self._device())
            dist.broadcast(flat, src=src, group=self.groups.pp)
            offset = 0
            for name, shape in entries:
                n = torch.Size(shape).numel()
                out.append((name, flat[offset:offset + n].view(shape)))
                offset += n
        return bucket if sending else out

    def _device(self) -> torch.device:
        return self._pieces[0].local.device if self._pieces else torch.device("cpu")
