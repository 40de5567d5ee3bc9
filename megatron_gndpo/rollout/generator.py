"""The embedded rollout engine: batched, KV-cached sampling on a megatron-core model at any TP x PP.

Megatron's static-batch KV cache (``StaticInferenceContext``) keeps keys and values per layer, so
each new token costs one single-position forward. Prompts of different lengths share one batch the
way Megatron-LM's static engine does it: decoding starts at the shortest prompt and, for a row whose
prompt is longer, the prompt token is forced instead of the sampled one until its prompt is used up.
All tokens before a position are then real, so the causal mask alone is right and no padding mask
is needed.

With pipeline parallelism each stage receives the previous stage's hidden states, runs its layers
(with their own cache) and sends on; the last stage samples and broadcasts the new token ids over
the pipeline group.

Prompts with images (a ``VisionLanguageModel``): the first stage runs the vision tower once per
rollout and every forward over prompt positions -- the prefill and the forced prompt tokens of longer
rows alike -- enters the language model as ``decoder_input``, image embeddings at the prompt's image
tokens and token embeddings elsewhere (:class:`_PromptImages`). Later stages receive hidden states,
never images. A model with M-RoPE (Qwen2.5-VL) takes 3-D positions on every stage, laid out once per
rollout from the prompts and their images' grids (:func:`rope_positions`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_gndpo.data.vision import ImageInputs
from megatron_gndpo.distributed.context_parallel import context_parallel_off
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.models.vlm import VisionLanguageModel
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
from megatron_gndpo.rollout.sampling import vocab_parallel_sample


@dataclass
class SamplingParams:
    """How responses are drawn (vLLM's names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    eos_token_ids: Sequence[int] = ()
    pad_token_id: int = 0


@dataclass
class Rollout:
    """Prompt + response per row, right-padded with ``pad_token_id``.

    ``tokens`` ``[B, L]``; ``prompt_lengths`` / ``response_lengths`` ``[B]``; the response of row b is
    ``tokens[b, p_b : p_b + r_b]`` and ends with an EOS id unless it hit ``max_new_tokens``.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    truncated: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    """``[B, L]`` float32: the sampler's log-prob of each response token (at the sampling temperature,
    before top-k / top-p, as the trainer scores it), 0 elsewhere. On the last pipeline stage of a
    sampled (temperature > 0) rollout; None otherwise."""

    def responses(self) -> List[List[int]]:
        return [self.tokens[b, p:p + r].tolist() for b, (p, r) in
                enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist()))]


def _pp_neighbour(groups: ProcessGroups, offset: int) -> int:
    return dist.get_global_rank(groups.pp, groups.pp_rank + offset)


@contextlib.contextmanager
def _sharded_last_position_logits(model):
    """Decode-time post-processing: the LM head sees the last position only, and its logits stay
    vocab-sharded.

    Last position only: a pre-hook on ``output_layer`` slices the final hidden states ``[s, B, h]`` to
    ``[1, B, h]`` before the LM head, so a prefill never materialises ``[prompt_len, B, V/tp]`` logits
    (40 GB at 512 x 256 x 152k in bf16). The same on every megatron-core version: 0.19 slices only under
    its engine's global ``InferenceMode``, 0.16 not at all.

    Sharded: megatron-core 0.16 asserts that inference (an inference context on a module in eval mode)
    gathers the vocabulary (``runtime_gather_output``). We sample from the shards instead, so only the
    top-level module leaves eval mode, for its post-processing; every layer below stays in eval mode and
    keeps using the KV cache. megatron-core 0.19 keys that assert on ``InferenceMode`` instead, which
    this engine never enters, so the flag is then inert."""
    def last_position(_module, args, kwargs):
        return (args[0][-1:], *args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(last_position, with_kwargs=True) \
        if model.post_process else None
    model.training = True
    try:
        yield
    finally:
        model.training = False
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def fp8_off(model):
    """Decode without FP8: a decode step feeds B x 1 tokens, which Transformer Engine's FP8 GEMMs refuse
    unless B is a multiple of 16, and sampling wants the weights' own precision anyway. megatron-core
    enters FP8 from ``config.fp8`` at each forward, so clearing it on every config object of the model
    turns FP8 off for the rollout only."""
    configs = {id(m.config): m.config for m in model.modules() if getattr(getattr(m, "config", None), "fp8", None)}
    saved = {k: c.fp8 for k, c in configs.items()}
    for c in configs.values():
        c.fp8 = None
    try:
        yield
    finally:
        for k, c in configs.items():
            c.fp8 = saved[k]


class _PromptImages:
    """The rollout's image embeddings on the first pipeline stage and the prompt positions they fill.

    The vision tower runs once, on every distinct ``ImageInputs`` object of the batch (the n samples of
    a prompt share theirs), without gradients. Image positions are the prompt positions ``t < p_b``
    holding the image token, read row after row as ``VisionLanguageModel.merge`` reads them, so a
    sampled token that happens to be the image token stays a token."""

    def __init__(self, model: VisionLanguageModel, tokens: torch.Tensor, plen: torch.Tensor,
                 images: Sequence[Optional[ImageInputs]]):
        if len(images) != tokens.shape[0]:
            raise ValueError(f"generate() got {len(images)} rows of images for {tokens.shape[0]} prompts")
        if any(im is not None for im in images) and (not isinstance(model, VisionLanguageModel)
                                                     or model.vision is None):
            raise ValueError("prompts with images need a VisionLanguageModel with its vision tower (first stage)")
        distinct = list({id(im): im for im in images if im is not None}.values())
        features = {}
        if distinct:
            tiles, device = [im.tiles_per_image for im in distinct], tokens.device
            grids = [im.image_grid_thw for im in distinct]
            out = model.image_features(
                torch.cat([im.pixel_values for im in distinct]).to(device),
                image_tiles=torch.tensor(sum(tiles, []), device=device) if all(t is not None for t in tiles) else None,
                image_tokens=torch.tensor([n for im in distinct for n in im.tokens_per_image], device=device),
                image_grid_thw=torch.cat(grids).to(device) if all(g is not None for g in grids) else None)
            features = dict(zip(map(id, distinct), out.split([sum(im.tokens_per_image) for im in distinct])))
        t = torch.arange(tokens.shape[1], device=tokens.device)
        # a text model's prompts hold no image token
        image_token = model.image_token_id if isinstance(model, VisionLanguageModel) else -1
        mask = (tokens == image_token) & (t[None, :] < plen[:, None])  # [B, total]
        for b, im in enumerate(images):
            made = features[id(im)].shape[0] if im is not None else 0
            if int(mask[b].sum()) != made:
                raise ValueError(f"prompt row {b} holds {int(mask[b].sum())} image tokens but its images make "
                                 f"{made} image embeddings")
        # [image tokens, h], row after row like the positions below
        self.features = torch.cat([features[id(im)] for im in images if im is not None]) if features else None
        self.rows, self.positions = mask.nonzero(as_tuple=True)  # [image tokens] each, row-major

    def decoder_input(self, language_model, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """``[s, B, h]`` for positions ``start..start+s`` of ``tokens`` ``[B, s]``: the token embeddings,
        with the image embeddings of the image positions among them."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        embeds = language_model.embedding(input_ids=tokens, position_ids=positions)  # [s, B, h]
        if self.features is None:
            return embeds
        here = (self.positions >= start) & (self.positions < start + tokens.shape[1])
        embeds[self.positions[here] - start, self.rows[here]] = self.features[here].to(embeds.dtype)
        return embeds


def rope_positions(vlm, tokens: torch.Tensor, images: Optional[Sequence[Optional[ImageInputs]]]
                   ) -> Optional[torch.Tensor]:
    """The M-RoPE positions ``[3, B, L]`` of the whole token buffer ``[B, L]`` (prompts, then the
    responses to come) of a ``VisionLanguageModel`` with M-RoPE; None for 1-D RoPE. A prompt's image
    tokens take their images' grid positions, and every later token, sampled ones included, is text:
    its index plus the row's rope delta, as transformers continues after the prompt. Needs only the
    images' grids, so every pipeline stage computes it."""
    if not isinstance(vlm, VisionLanguageModel) or vlm.rope_config is None:
        return None
    rows = list(images) if images is not None else [None] * tokens.shape[0]
    grids = [im.image_grid_thw for im in rows if im is not None]  # per row, in reading order (shared ones too)
    row_image_tokens = torch.tensor([sum(im.tokens_per_image) if im is not None else 0 for im in rows],
                                    device=tokens.device)
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return vlm.language_positions(tokens, index, torch.cat(grids).to(tokens.device) if grids else None,
                                  row_image_tokens)


def stage_forward(model, tokens: torch.Tensor, positions: torch.Tensor, context, groups: ProcessGroups, *,
                  attention_mask: Optional[torch.Tensor] = None,
                  decoder_input: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One pipeline pass over ``tokens`` ``[B, s]`` at ``positions`` ``[B, s]`` (``attention_mask`` and
    ``decoder_input`` as megatron's GPTModel takes them; None: causal, the token embeddings); the last
    stage returns the sharded logits of each row's final position ``[B, V/tp]``, the others None."""
    b, s = tokens.shape
    config = model.config
    if not groups.is_first_stage:
        hidden = torch.empty((s, b, config.hidden_size), dtype=config.params_dtype, device=tokens.device)
        dist.recv(hidden, src=_pp_neighbour(groups, -1), group=groups.pp)
        model.set_input_tensor(hidden)
    with _sharded_last_position_logits(model):
        out = model(tokens, positions, attention_mask, decoder_input=decoder_input, inference_context=context)
    if not groups.is_last_stage:
        dist.send(out.contiguous(), dst=_pp_neighbour(groups, +1), group=groups.pp)
        return None
    return out[:, -1]


def prompt_buffers(prompts: Sequence[Sequence[int]], params: SamplingParams, groups: ProcessGroups,
                   max_sequence_length: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What a sampler fills, on the groups' device: the prompt lengths ``[B]``, the token buffer
    ``[B, longest prompt + max_new_tokens]`` holding the prompts (pad after), the EOS ids, and the
    sampler's own log-probs ``[B, L]`` (last stage, temperature > 0: the number the trainer's recomputed
    old log-probs are compared with to show a precision or engine mismatch; greedy decoding has no
    sampling distribution to report), else None."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and no empty prompt")
    device = groups.device
    plen = torch.tensor([len(p) for p in prompts], device=device)
    total = int(plen.max()) + params.max_new_tokens
    if total > max_sequence_length:
        raise ValueError(f"longest prompt ({int(plen.max())} tokens) + max_new_tokens ({params.max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({max_sequence_length})")
    tokens = torch.full((len(prompts), total), params.pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long, device=device)
    eos = torch.as_tensor(list(params.eos_token_ids), dtype=torch.long, device=device)
    logprobs = torch.zeros((len(prompts), total), dtype=torch.float32, device=device) \
        if groups.is_last_stage and params.temperature > 0 else None
    return plen, tokens, eos, logprobs


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    rows: torch.Tensor,
    params: SamplingParams,
    *,
    groups: ProcessGroups,
    vocab_size: int,
    seed: int,
    max_sequence_length: int,
    images: Optional[Sequence[Optional[ImageInputs]]] = None,
) -> Rollout:
    """Sample one response per prompt (repeat a prompt for n samples).

    ``rows`` ``[B]`` are the rows' global indices in the step: with ``seed`` they key the sampling
    noise, so a row's response does not depend on the layout or on which rank holds it. Every rank
    of the model-parallel group calls this with the same prompts; all return the same ``Rollout``.

    ``images``: one entry per prompt, its ``ImageInputs`` (``PromptDataset.image_inputs``) or None
    for a text-only row; ``model`` is then a ``VisionLanguageModel``. Only the first pipeline stage
    reads them. Rows sharing one ``ImageInputs`` object share one run of the vision tower.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    vlm, model = model, model.language_model if isinstance(model, VisionLanguageModel) else model
    if getattr(model.config, "sequence_parallel", False):
        raise ValueError("the megatron rollout engine does not support parallel.sequence_parallel "
                         "(single-token decode steps cannot be split along the sequence)")
    device, b = groups.device, len(prompts)
    plen, tokens, eos, logprobs = prompt_buffers(prompts, params, groups, max_sequence_length)
    total = tokens.shape[1]
    rows = rows.to(device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    resp_len = torch.zeros(b, dtype=torch.long, device=device)
    last_src = dist.get_global_rank(groups.pp, groups.pp_size - 1)

    was_training = vlm.training
    vlm.eval()
    context = StaticInferenceContext(b, total)
    prev, cur = 0, int(plen.min())
    try:
        prompt_images = _PromptImages(vlm, tokens, plen, images) \
            if images is not None and groups.is_first_stage else None
        mrope = rope_positions(vlm, tokens, images)
        with fp8_off(model), context_parallel_off(model):  # CP ranks each decode their replica's rows
            while cur < total and not bool(done.all()):
                chunk = tokens[:, prev:cur]
                # M-RoPE: megatron computes the rotary embedding of the positions it is given and the KV-cached
                # attention reads it at absolute indices (queries [prev, cur), keys [0, cur)): all of them
                positions = torch.arange(prev, cur, device=device).expand_as(chunk) if mrope is None \
                    else mrope[:, :, :cur]
                embeds = prompt_images.decoder_input(model, chunk, prev) if prompt_images is not None else None
                logits = stage_forward(model, chunk, positions, context, groups, decoder_input=embeds)
                context.sequence_len_offset += cur - prev
                if groups.is_last_stage:
                    nxt = vocab_parallel_sample(
                        logits, rows=rows, position=torch.full_like(rows, cur), seed=seed, group=groups.tp,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, vocab_size=vocab_size,
                    )
                    if logprobs is not None:
                        token_logprobs = vocab_parallel_logprobs(logits, nxt, group=groups.tp,
                                                                 temperature=params.temperature, vocab_size=vocab_size)
                else:
                    nxt = torch.empty(b, dtype=torch.long, device=device)
                if groups.pp_size > 1:
                    dist.broadcast(nxt, src=last_src, group=groups.pp)
                in_prompt = cur < plen
                generating = ~in_prompt & ~done
                tokens[:, cur] = torch.where(in_prompt, tokens[:, cur],
                                             torch.where(generating, nxt, torch.full_like(nxt, params.pad_token_id)))
                resp_len += generating.long()
                if logprobs is not None:
                    logprobs[:, cur] = torch.where(generating, token_logprobs, torch.zeros_like(token_logprobs))
                hit_eos = generating & torch.isin(nxt, eos) if eos.numel() else torch.zeros_like(done)
                done |= hit_eos | (generating & (resp_len >= params.max_new_tokens))
                prev, cur = cur, cur + 1
    finally:
        vlm.train(was_training)
    end = int((plen + resp_len).max())
    truncated = resp_len >= params.max_new_tokens
    if eos.numel():
        last = tokens.gather(1, (plen + resp_len - 1).clamp_min(0)[:, None])[:, 0]
        truncated &= ~torch.isin(last, eos)
    return Rollout(tokens[:, :end], plen, resp_len, truncated, None if logprobs is None else logprobs[:, :end])
