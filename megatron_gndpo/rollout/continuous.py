"""Continuous (in-flight) batching for the embedded rollout engine: a row that finishes hands its
decode slot to the next pending prompt, so the decode batch stays full until the queue drains.

The static sampler (``generator.generate``) decodes all rows together until the last one finishes:
with response lengths spread over two orders of magnitude most of its row-steps decode rows that
are already done. Here ``decode_slots`` rows decode at a time; each step feeds only the live slots,
and a slot that frees up takes the next prompt (:class:`SlotScheduler`).

**Why not megatron-core's ``DynamicInferenceContext``.** Its paged KV cache is the right design for
GPUs, but in megatron-core 0.16.1 and 0.19.2 alike ``Attention.forward`` asserts flash-attn (>= 2.7.3,
FA3 or FA4) as soon as a dynamic context is given, its attention is ``flash_decode_and_prefill`` (CUDA
kernels only) and the context allocates its buffers on ``torch.cuda.current_device()``. It serves
neither the CPU nor the local layer spec, which is where this project tests.

**Slot reuse in a static context instead.** :class:`SlotInferenceContext` is a
``StaticInferenceContext`` (so megatron takes its static-batching path) whose KV buffer per layer is
``[max_len, slots, ng, hn]`` with one length per slot: slot i's row sits at positions ``0..len_i`` of
its own column. While the engine runs, each attention module's ``_adjust_key_value_for_inference`` is
replaced, on that instance only, by :func:`_slot_key_value`, which

- writes the new keys / values of slot i at its own positions ``start_i .. start_i + s``,
- returns the slots' cached keys / values ``[0, L_k)`` with ``L_k = max_i(start_i + s)``,
- returns each slot's own RoPE angles for its queries (megatron's static path slices one offset for
  the whole batch) and the angles ``[0, L_k)`` for the keys (keys are cached before RoPE);

and the forward's explicit attention mask hides from slot i every key after its own position, so a
refilled slot never attends to what its predecessor left in the buffer (those entries are also
overwritten as the new row grows). Once the queue has drained, a finishing row's slot is filled by
moving the highest live slot into it (:func:`_compact`), so a decode step always reads the first n KV
columns as a view, never a gathered copy. Only megatron's self-attention and the project's
:class:`~megatron_gndpo.models.attention.SDPAttention` (which applies an explicit mask as given) are
involved, both on CPU.

**Same samples as the static sampler.** The sampling noise is keyed on (seed, row, position), never on
the slot, so row r draws the same token at position p wherever it runs. A new row's prompt except its
last token is prefilled in one forward (rows admitted together are right-padded: a pad key lies after
every real query, so the causal mask hides it, and decoding overwrites it); the last prompt token is
the row's first decode input. The logits are the static sampler's up to float rounding (other batch
shapes, a prefill instead of token-by-token prompt forcing): equal tokens, log-probs to rounding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType

from megatron_gndpo.distributed.context_parallel import context_parallel_off
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.attention import SDPAttention
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
from megatron_gndpo.rollout.generator import (
    Rollout,
    SamplingParams,
    fp8_off,
    prompt_buffers,
    stage_forward,
    generate,
)
from megatron_gndpo.rollout.sampling import vocab_parallel_sample


class SlotScheduler:
    """Which prompt enters which decode slot: prompts in their order, free slots in theirs.

    ``admit(free)`` gives the lowest free slot the next pending prompt, the next free slot the one
    after, ... until either runs out; every prompt is admitted once. Deterministic, and the same on
    every rank (all ranks see the same finished rows)."""

    def __init__(self, num_prompts: int):
        self.num_prompts = num_prompts
        self.next_prompt = 0

    @property
    def pending(self) -> int:
        return self.num_prompts - self.next_prompt

    def admit(self, free_slots: Sequence[int]) -> List[Tuple[int, int]]:
        """``[(slot, prompt), ...]`` for the free slots (any order given; taken in increasing order)."""
        out = []
        for slot in sorted(free_slots):
            if self.next_prompt == self.num_prompts:
                break
            out.append((slot, self.next_prompt))
            self.next_prompt += 1
        return out


class SlotInferenceContext(StaticInferenceContext):
    """A static-batching inference context with one KV column and one length per decode slot.

    ``key_value_memory_dict[layer]`` holds ``([max_len, slots, ng, hn], [max_len, slots, ng, hn])``
    keys and values (allocated at a layer's first call, in its dtype). Before each forward the engine
    calls :meth:`feed` with the slots of that forward and the position of each one's first token."""

    def __init__(self, num_slots: int, max_len: int):
        super().__init__(num_slots, max_len)
        # set by feed() before every forward
        self.slots: Optional[torch.Tensor] = None
        self.prefix = True
        self.positions: Optional[torch.Tensor] = None

    def feed(self, slots: torch.Tensor, starts: torch.Tensor, s: int) -> torch.Tensor:
        """Next forward: ``s`` tokens for each of ``slots`` ``[n]``, slot i's at positions
        ``starts[i] .. starts[i] + s``. Returns its attention mask ``[n, 1, s, L_k]`` (True = masked):
        key j is hidden from query q of slot i iff ``j > starts[i] + q``."""
        self.slots = slots
        # the first n slots (a decode step, the live slots kept a prefix by _compact): read as a view
        self.prefix = bool((slots == torch.arange(slots.numel(), device=slots.device)).all())
        self.positions = starts[None, :] + torch.arange(s, device=starts.device)[:, None]  # [s, n]
        keys = torch.arange(int(self.positions.max()) + 1, device=starts.device)
        return (keys[None, None, :] > self.positions.t()[:, :, None])[:, None]  # [n, 1, s, L_k]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s keys and values into slot ``dst``, in every layer of this stage."""
        for memory in self.key_value_memory_dict.values():
            for t in memory:
                t[:, dst] = t[:, src]

    def kv_memory(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.key_value_memory_dict:
            self.key_value_memory_dict[layer] = tuple(
                torch.zeros((self.max_sequence_length, self.max_batch_size, *t.shape[2:]), dtype=t.dtype,
                            device=t.device) for t in (key, value))
        return self.key_value_memory_dict[layer]


def _slot_key_value(attention, original: Callable, inference_context, query, key, value, rotary_pos_emb,
                    *args, **kwargs):
    """``Attention._adjust_key_value_for_inference`` for a :class:`SlotInferenceContext` (any other
    context goes to ``original``): per-slot KV write and read, per-slot query RoPE angles.

    ``key`` / ``value`` ``[s, n, ng, hn]`` -> the slots' cached ``[L_k, n, ng, hn]``; RoPE
    ``([max_len, 1, 1, d],) * 2`` -> queries ``[s, n, 1, d]`` (each slot's positions), keys ``[L_k, 1, 1, d]``.
    The mask type is ``no_mask`` as on megatron's own cached steps: the forward's explicit mask decides."""
    if not isinstance(inference_context, SlotInferenceContext):
        return original(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
    ctx = inference_context
    key_memory, value_memory = ctx.kv_memory(attention.layer_number, key, value)
    pos, slots = ctx.positions, ctx.slots  # [s, n], [n]
    key_memory[pos, slots] = key
    value_memory[pos, slots] = value
    l_k = int(pos.max()) + 1
    if ctx.prefix:
        key, value = key_memory[:l_k, :slots.numel()], value_memory[:l_k, :slots.numel()]
    else:
        key, value = key_memory[:l_k, slots], value_memory[:l_k, slots]
    if rotary_pos_emb is not None:
        q_pos_emb, k_pos_emb = rotary_pos_emb
        rotary_pos_emb = (q_pos_emb[:, 0][pos], k_pos_emb[:l_k])
    return query, key, value, rotary_pos_emb, AttnMaskType.no_mask, None


@contextlib.contextmanager
def _slot_attention(model):
    """Route every attention module of ``model`` through :func:`_slot_key_value` (instance attributes,
    removed on exit); refuses core attention other than ``SDPAttention``."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        if not isinstance(m.core_attention, SDPAttention):
            raise ValueError(f"rollout.continuous_batching needs the local layer spec with SDPA core attention "
                             f"(precision.transformer_impl='local', precision.local_attention='sdpa'); this model's "
                             f"is {type(m.core_attention).__name__}, whose handling of a per-slot attention mask in "
                             "cached decoding is not verified")
    for m in layers:
        original = m._adjust_key_value_for_inference
        m._adjust_key_value_for_inference = \
            lambda *a, _m=m, _o=original, **k: _slot_key_value(_m, _o, *a, **k)
    try:
        yield
    finally:
        for m in layers:
            del m._adjust_key_value_for_inference


@torch.no_grad()
def generate_continuous(
    model,
    prompts: Sequence[Sequence[int]],
    rows: torch.Tensor,
    params: SamplingParams,
    *,
    groups: ProcessGroups,
    vocab_size: int,
    seed: int,
    max_sequence_length: int,
    decode_slots: Optional[int] = None,
    images: Optional[Sequence] = None,
) -> Rollout:
    """``generator.generate`` with in-flight batching over ``decode_slots`` slots (None: one per prompt,
    so no slot is refilled but finished rows leave the decode batch): the same arguments and the same
    ``Rollout``, rows in their given order, tokens equal to the static sampler's for the same seed.
    ``images`` (the static sampler's image rows) is refused unless every row has none.

    Per step: the free slots take the next prompts (:class:`SlotScheduler`) and prefill them; then one
    decode forward over the live slots samples position ``len_i`` of each live row i, keyed by
    ``(seed, rows[i], len_i)``. Every rank runs the same schedule (the new tokens are broadcast over the
    pipeline group, as in the static sampler)."""
    if getattr(model.config, "sequence_parallel", False):
        raise ValueError("the megatron rollout engine does not support parallel.sequence_parallel "
                         "(single-token decode steps cannot be split along the sequence)")
    device, b = groups.device, len(prompts)
    if images is not None and any(i is not None for i in images):
        raise ValueError("rollout.continuous_batching does not take images: a slot's prefill feeds token ids, "
                         "not merged image embeddings; use the static sampler")
    if decode_slots is not None and decode_slots < 1:
        raise ValueError(f"rollout.decode_slots must be >= 1 or None, got {decode_slots}")
    n_slots = b if decode_slots is None else min(decode_slots, b)
    plen, tokens, eos, logprobs = prompt_buffers(prompts, params, groups, max_sequence_length)
    total = tokens.shape[1]
    rows = rows.to(device)
    resp_len = torch.zeros(b, dtype=torch.long, device=device)
    last_src = dist.get_global_rank(groups.pp, groups.pp_size - 1)

    scheduler = SlotScheduler(b)
    slot_row = [-1] * n_slots  # the row each slot decodes, -1: free
    cached = torch.zeros(n_slots, dtype=torch.long, device=device)  # tokens of the slot's row in its KV cache
    was_training = model.training
    model.eval()
    context = SlotInferenceContext(n_slots, total)
    try:
        with fp8_off(model), context_parallel_off(model), _slot_attention(model):
            while True:
                admitted = scheduler.admit([s for s in range(n_slots) if slot_row[s] < 0])
                for slot, row in admitted:
                    slot_row[slot] = row
                    cached[slot] = plen[row] - 1
                _prefill(model, tokens, plen, admitted, context, groups, params.pad_token_id)
                _compact(slot_row, cached, context)
                live = [s for s in range(n_slots) if slot_row[s] >= 0]
                if not live:
                    break
                slots = torch.arange(len(live), device=device)
                live_rows = torch.tensor([slot_row[s] for s in live], device=device)
                start = cached[slots]  # the input token's position; the new token goes at start + 1
                mask = context.feed(slots, start, 1)
                logits = stage_forward(model, tokens[live_rows, start][:, None], start[:, None], context, groups,
                                       attention_mask=mask)
                cached[slots] += 1
                if groups.is_last_stage:
                    nxt = vocab_parallel_sample(
                        logits, rows=rows[live_rows], position=start + 1, seed=seed, group=groups.tp,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, vocab_size=vocab_size,
                    )
                    if logprobs is not None:
                        logprobs[live_rows, start + 1] = vocab_parallel_logprobs(
                            logits, nxt, group=groups.tp, temperature=params.temperature, vocab_size=vocab_size)
                else:
                    nxt = torch.empty(len(live), dtype=torch.long, device=device)
                if groups.pp_size > 1:
                    dist.broadcast(nxt, src=last_src, group=groups.pp)
                tokens[live_rows, start + 1] = nxt
                resp_len[live_rows] += 1
                finished = resp_len[live_rows] >= params.max_new_tokens
                if eos.numel():
                    finished |= torch.isin(nxt, eos)
                for s in slots[finished].tolist():
                    slot_row[s] = -1
    finally:
        model.train(was_training)
    end = int((plen + resp_len).max())
    truncated = resp_len >= params.max_new_tokens
    if eos.numel():
        last = tokens.gather(1, (plen + resp_len - 1).clamp_min(0)[:, None])[:, 0]
        truncated &= ~torch.isin(last, eos)
    return Rollout(tokens[:, :end], plen, resp_len, truncated, None if logprobs is None else logprobs[:, :end])


def _compact(slot_row: List[int], cached: torch.Tensor, context: SlotInferenceContext) -> None:
    """Keep the live slots a prefix ``0..n``: once the queue has drained, the highest live slot moves into
    the lowest free one (its KV column, row and length), so that a decode step reads the first n KV
    columns as a view instead of gathering them (a copy of the whole live cache per layer and step)."""
    while True:
        free = [s for s, r in enumerate(slot_row) if r < 0]
        live = [s for s, r in enumerate(slot_row) if r >= 0]
        if not free or not live or free[0] > live[-1]:
            return
        src, dst = live[-1], free[0]
        context.move(src, dst)
        slot_row[dst], slot_row[src] = slot_row[src], -1
        cached[dst] = cached[src]


def _prefill(model, tokens: torch.Tensor, plen: torch.Tensor, admitted: List[Tuple[int, int]], context,
             groups: ProcessGroups, pad_token_id: int) -> None:
    """One forward that caches the prompts of the newly ``admitted`` ``(slot, row)`` pairs except each
    one's last token (the row's first decode input), right-padded to the longest; none if all of them
    are one token long. Its logits are not needed."""
    s = max((int(plen[row]) - 1 for _, row in admitted), default=0)
    if s == 0:
        return
    device = tokens.device
    slots = torch.tensor([slot for slot, _ in admitted], device=device)
    rows = torch.tensor([row for _, row in admitted], device=device)
    chunk = tokens[rows, :s].clone()  # [n, s]
    chunk[torch.arange(s, device=device)[None, :] >= (plen[rows] - 1)[:, None]] = pad_token_id
    mask = context.feed(slots, torch.zeros_like(slots), s)
    stage_forward(model, chunk, torch.arange(s, device=device).expand(len(admitted), s), context, groups,
                  attention_mask=mask)


def rollout_engine(continuous_batching: bool, decode_slots: Optional[int] = None) -> Callable[..., Rollout]:
    """The sampler ``rollout.continuous_batching`` / ``rollout.decode_slots`` select, with
    ``generator.generate``'s signature."""
    if not continuous_batching:
        return generate
    return lambda *args, **kwargs: generate_continuous(*args, decode_slots=decode_slots, **kwargs)
