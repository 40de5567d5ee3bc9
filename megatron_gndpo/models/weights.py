"""Layout-independent weights: megatron-core's sharded-state-dict view of a model.

``model.sharded_state_dict()`` describes every local tensor as a slice of a *global* tensor under a
layout-free key (layers stacked along a leading axis; SwiGLU fc1 as [gate; up]). Reading and
writing through that view moves weights between any TP x PP layouts with megatron's own
bookkeeping, and is the bridge the HF converter and the rollout weight sync build on.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Set, Tuple

import torch
import torch.distributed as dist


def sharded_tensors(item) -> List:
    """The ShardedTensors one sharded-state-dict entry stands for: itself, the pieces its factory
    builds (SwiGLU fc1: gate and up), or none (a ShardedObject: extra state, not a weight)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(item, ShardedTensorFactory):
        pieces = item.build()
        return list(pieces.values() if isinstance(pieces, Mapping) else pieces)
    return [item] if isinstance(item, ShardedTensor) else []


def local_pieces(model) -> Iterator[Tuple[str, tuple, tuple, torch.Tensor, bool]]:
    """(global key, global shape, index into the global tensor, local tensor view, is main replica)."""
    for item in model.sharded_state_dict().values():
        for sh in sharded_tensors(item):
            n = sh.prepend_axis_num
            index = tuple(sh.global_offset[:n]) + tuple(
                slice(off, off + size) for off, size in zip(sh.global_offset[n:], sh.data.shape)
            )
            main = all(r == 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)))
            yield sh.key, tuple(sh.global_shape), index, sh.data, main


@torch.no_grad()
def load_global_weights(model, weights: Mapping[str, torch.Tensor], *, strict: bool = True) -> Set[str]:
    """Copy this rank's slices of ``weights`` (global key -> full tensor) into ``model``; returns the
    keys used. ``strict``: a weight the model needs but ``weights`` lacks is an error naming it."""
    seen = set()
    for key, shape, index, local, _ in local_pieces(model):
        if key not in weights:
            if strict:
                raise KeyError(f"weight {key!r} (global shape {shape}) is missing")
            continue
        full = weights[key]
        if tuple(full.shape) != shape:
            raise ValueError(f"weight {key!r} has shape {tuple(full.shape)}, the model expects {shape}")
        local.copy_(full[index])
        seen.add(key)
    return seen


@torch.no_grad()
def gather_global_weights(model, group: dist.ProcessGroup | None = None) -> Dict[str, torch.Tensor]:
    """Full tensors of every weight, assembled over ``group`` (default: the world).

    Each element is written by exactly one main replica and then SUM-all-reduced, so every rank of
    ``group`` gets the whole model. Meant for tests, conversion and small models; the rollout
    weight sync gathers per TP group in buckets instead.
    """
    pieces = list(local_pieces(model))
    shapes = {key: shape for key, shape, *_ in pieces}
    if group is not None or dist.is_initialized():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, shapes, group=group)
        for other in gathered:
            shapes.update(other)
    device = pieces[0][3].device if pieces else torch.device("cpu")
    dtype = pieces[0][3].dtype if pieces else torch.float32
    out = {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in sorted(shapes.items())}
    for key, _, index, local, main in pieces:
        if main:
            out[key][index] = local.detach()
    for t in out.values():
        if dist.is_initialized():
            dist.all_reduce(t, group=group)
    return {key: t.cpu() for key, t in out.items()}
