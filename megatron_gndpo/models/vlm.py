"""Vision-language models: transformers' own vision tower and projector in front of a megatron-core
``GPTModel``.

The vision side runs as the transformers modules ``InternVLForConditionalGeneration`` is made of
(InternViT, pixel shuffle, MLP projector), as Megatron-Bridge does for its vision-language models:
it is small next to the language model, so it is replicated on every tensor-parallel rank of the
first pipeline stage, and its math is transformers' by construction. Its image embeddings replace
the token embeddings of the image-token positions, and the merged embeddings enter the GPTModel as
``decoder_input``: the language model stays megatron's, tensor / pipeline parallel, with
vocab-parallel logits. Only the InternVL family is built here (docs/multimodal.md).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig


class InternVLVision(torch.nn.Module):
    """Tiles -> image embeddings in the language model's width: ``InternVLModel.get_image_features``
    with transformers' modules (the feature layer, the class token dropped, pixel shuffle by
    ``downsample_ratio``, the projector)."""

    def __init__(self, hf_config):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        self.config = hf_config
        self.vision_tower = AutoModel.from_config(hf_config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(hf_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, size, size] -> [tiles * tokens per tile, hidden], tile after tile."""
        from transformers.models.internvl.modeling_internvl import InternVLModel

        layer = self.config.vision_feature_layer
        out = self.vision_tower(pixel_values=pixel_values.to(self.multi_modal_projector.linear_1.weight.dtype),
                                output_hidden_states=layer != -1, return_dict=True)
        features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:, :]  # the class token
        tiles, positions, width = features.shape
        side = int(positions ** 0.5)
        # pixel_shuffle does not use its instance: transformers' own function, not a copy of it
        features = InternVLModel.pixel_shuffle(None, features.reshape(tiles, side, side, width),
                                               scale_factor=self.config.downsample_ratio)
        return self.multi_modal_projector(features.reshape(tiles, -1, features.shape[-1])).flatten(0, 1)


class VisionLanguageModel(torch.nn.Module):
    """A GPTModel whose prompt may hold images. On the first pipeline stage the image embeddings of
    ``pixel_values`` replace the token embeddings where ``input_ids`` is ``image_token_id``, in
    reading order (row after row, position after position), as transformers merges them. Later
    stages see hidden states only, as for a text model."""

    def __init__(self, language_model, vision: Optional[InternVLVision], image_token_id: int):
        super().__init__()
        self.language_model, self.vision, self.image_token_id = language_model, vision, image_token_id

    @property
    def module(self):
        """The language model. Megatron's schedules and gradient finalisation look attributes up
        through ``.module`` as through a DDP wrapper (``get_attr_wrapped_model``: ``model_type``,
        ``decoder``, ``pre_process``, the shared embedding), so they find the GPTModel's."""
        return self.language_model

    @property
    def config(self):
        """The language model's TransformerConfig (what megatron's schedules and the sampler read)."""
        return self.language_model.config

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The language model's sharded state dict under its own keys (those of a converted checkpoint,
        so the text loader reads either) and, on the first stage, the vision side's tensors under
        ``vision.*``, replicated over tensor- and data-parallel ranks: a training checkpoint restores the
        projector it trains (and the tower, trained or not) with the optimizer state that refers to them."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = self.language_model.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.vision is not None:
            out.update(make_sharded_tensors_for_checkpoint(self.vision.state_dict(keep_vars=True),
                                                           f"{prefix}{VISION_KEY}"))
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The inverse of :meth:`sharded_state_dict`'s keys: ``vision.*`` to the vision side (first
        stage), the rest to the language model."""
        vision = {k[len(VISION_KEY):]: v for k, v in state_dict.items() if k.startswith(VISION_KEY)}
        language = {k: v for k, v in state_dict.items() if not k.startswith(VISION_KEY)}
        if self.vision is not None:
            self.vision.load_state_dict(vision, strict=strict, assign=assign)
        elif vision and strict:
            raise RuntimeError(f"vision tensors {sorted(vision)[:3]} given to a stage without a vision side")
        return self.language_model.load_state_dict(language, strict=strict, assign=assign)

    def image_features(self, pixel_values: torch.Tensor, image_tiles: Optional[torch.Tensor] = None,
                       image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every image's embeddings ``[image tokens, hidden]``, image after image (first stage only).

        With ``image_tiles`` / ``image_tokens`` ``[images]`` (what the processor cut each image into and
        how many image tokens it wrote for it) each image's embeddings are checked against its tokens:
        a processor that tiles differently from this vision tower (another ``image_seq_length``, a
        teacher whose InternViT has another resolution) is an error naming the image, not a silent
        shift of every later image."""
        features = self.vision(pixel_values)
        if image_tiles is not None and image_tokens is not None:
            per_tile = features.shape[0] // max(int(image_tiles.sum()), 1)
            for k, (tiles, tokens) in enumerate(zip(image_tiles.tolist(), image_tokens.tolist())):
                if tiles * per_tile != tokens:
                    raise ValueError(f"image {k} of the batch: the prompt holds {tokens} image tokens for its "
                                     f"{tiles} tiles, but this vision tower makes {per_tile} embeddings per tile "
                                     "(the processor and the model disagree on the image-token layout)")
        return features

    def merge(self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor,
              row_image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings ``[seq, batch, h]`` with ``features`` ``[n, h]`` written at the ``n`` image
        tokens of ``input_ids`` ``[batch, seq]``, read row after row. With ``row_image_tokens`` ``[batch]``
        (the image tokens of each row's prompt) only the first that many of a row are images: a sampled
        response that holds the image token id keeps it as a token, since every prompt token precedes
        the response."""
        mask = input_ids == self.image_token_id
        if row_image_tokens is not None:
            mask &= mask.cumsum(dim=1) <= row_image_tokens[:, None]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the batch has {int(mask.sum())} image tokens but its images make {features.shape[0]} "
                             "image embeddings")
        # batch-major like input_ids, so the k-th image token gets the k-th embedding
        merged = embeds.transpose(0, 1).masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return merged.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask,
                pixel_values: Optional[torch.Tensor] = None, image_tiles: Optional[torch.Tensor] = None,
                image_tokens: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                row_image_tokens: Optional[torch.Tensor] = None, **kwargs):
        """``input_ids`` [batch, seq]; ``pixel_values`` every image of the batch, in the order their
        image tokens appear in ``input_ids`` read row after row (None: no images); ``image_tiles`` /
        ``image_tokens`` [images] to check each image's layout (:meth:`image_features`);
        ``row_image_tokens`` [batch] as in :meth:`merge`."""
        if image_grid_thw is not None:
            raise NotImplementedError("image_grid_thw: Qwen2.5-VL models are not built yet (InternVL only)")
        if self.vision is None or pixel_values is None:
            return self.language_model(input_ids, position_ids, attention_mask, **kwargs)
        if self.language_model.config.sequence_parallel:
            raise NotImplementedError("images with sequence parallelism: the embeddings would be merged into "
                                      "sequence shards")
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)  # [seq, batch, h]
        features = self.image_features(pixel_values, image_tiles, image_tokens)
        return self.language_model(input_ids, position_ids, attention_mask,
                                   decoder_input=self.merge(input_ids, embeds, features, row_image_tokens), **kwargs)


def internvl_language_config(hf_config) -> ModelConfig:
    """The language model of a transformers ``InternVLConfig`` as our ModelConfig (Qwen2 / Qwen3 /
    Llama, with the text converter's checks). ``lm_head`` is tied by the top-level config."""
    import dataclasses

    from megatron_gndpo.checkpoint.hf_mapping import model_config_from_hf

    cfg = model_config_from_hf(hf_config.text_config)
    return dataclasses.replace(cfg, tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


VISION_KEY = "vision."
"""The prefix of the vision side's tensors in a ``VisionLanguageModel``'s sharded state dict."""

INTERNVL_NAMES = {
    "modules": ("model.language_model.", "lm_head.weight", "model."),
    "files": ("language_model.model.", "language_model.lm_head.weight", ""),
}
"""The two namings of ``InternVLForConditionalGeneration``'s tensors: (language model prefix, output
layer, vision-side prefix). ``modules``: its modules' (``state_dict()``); ``files``: its checkpoint
files' (transformers' ``save_pretrained`` writes this earlier layout and renames it on load)."""
VISION_MODULES = ("vision_tower.", "multi_modal_projector.")
"""The vision side's names in ``InternVLVision`` (without a naming's vision-side prefix)."""


def internvl_part(key: str) -> Tuple[str, str, str]:
    """Where an ``InternVLForConditionalGeneration`` tensor (either naming) belongs: (its naming,
    "language", its name in a text checkpoint: ``model.*`` / ``lm_head.weight``) or (its naming,
    "vision", its name in ``InternVLVision``). An unknown key is a KeyError naming it."""
    for naming, (lm, head, vision) in INTERNVL_NAMES.items():
        if key.startswith(lm):
            return naming, "language", "model." + key[len(lm):]
        if key == head:
            return naming, "language", "lm_head.weight"
        if key.startswith(tuple(vision + m for m in VISION_MODULES)):
            return naming, "vision", key[len(vision):]
    raise KeyError(f"InternVL checkpoint tensor {key!r} is neither the language model's nor the vision side's")


def internvl_hf_name(naming: str, part: str, name: str) -> str:
    """The inverse of :func:`internvl_part`: the name of a language-model (text checkpoint name) or
    vision-side (``InternVLVision`` name) tensor in ``naming``."""
    lm, head, vision = INTERNVL_NAMES[naming]
    if part == "vision":
        return vision + name
    return head if name == "lm_head.weight" else lm + name[len("model."):]


def split_internvl_state_dict(hf: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor],
                                                                        Dict[str, torch.Tensor]]:
    """An ``InternVLForConditionalGeneration`` state dict or checkpoint file (either naming) -> (the
    language model's, under the text checkpoints' names ``model.*`` / ``lm_head.weight``; the vision
    side's, under ``InternVLVision``'s names). An unknown key is an error naming it."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {"language": {}, "vision": {}}
    for key, tensor in hf.items():
        _, part, name = internvl_part(key)
        parts[part][name] = tensor
    return parts["language"], parts["vision"]


def build_internvl_model(hf_config, parallel: ParallelConfig, precision: PrecisionConfig, *, pre_process: bool,
                         post_process: bool, train_vision_tower: bool = False) -> VisionLanguageModel:
    """The megatron-core language model of this pipeline stage behind transformers' vision side (first
    stage only). ``train_vision_tower`` False freezes InternViT, as the GNDPO reference does; the
    projector trains either way."""
    from megatron_gndpo.models.provider import build_gpt_model, params_dtype

    language_model = build_gpt_model(internvl_language_config(hf_config), parallel, precision,
                                     pre_process=pre_process, post_process=post_process)
    vision = None
    if pre_process:
        vision = InternVLVision(hf_config).to(dtype=params_dtype(precision))
        vision.vision_tower.requires_grad_(train_vision_tower)
        if torch.cuda.is_available() and not language_model.config.use_cpu_initialization:
            vision.cuda(torch.cuda.current_device())
    return VisionLanguageModel(language_model, vision, hf_config.image_token_id)


def load_internvl_hf_weights(model: VisionLanguageModel, hf: Mapping[str, torch.Tensor], hf_config) -> None:
    """Copy an ``InternVLForConditionalGeneration`` state dict into ``model`` (this rank's slices of
    the language model through the text converter's mapping; the vision side whole)."""
    from megatron_gndpo.checkpoint.hf_mapping import hf_to_global
    from megatron_gndpo.models.weights import load_global_weights

    lm, vision = split_internvl_state_dict(hf)
    cfg = internvl_language_config(hf_config)
    tp = model.language_model.config.tensor_model_parallel_size
    load_global_weights(model.language_model, hf_to_global(lm, cfg, cfg.padded_vocab_size(tp)))
    if model.vision is not None:
        model.vision.load_state_dict(vision, strict=True)


def load_internvl_checkpoint(path, parallel: ParallelConfig, precision: PrecisionConfig, *, pre_process: bool,
                             post_process: bool, train_vision_tower: bool = False,
                             role: str = "model") -> VisionLanguageModel:
    """This pipeline stage's InternVL model from a converted checkpoint (``megatron-gndpo convert
    hf-to-megatron`` of an InternVL directory, or a checkpoint root whose ``latest`` names one), at
    any TP x PP. Collective over the world, like :func:`~megatron_gndpo.checkpoint.dist_ckpt.load_model_weights`.

    The InternVL config comes from the checkpoint's metadata (no Hugging Face directory needed); the
    language model's shards load through megatron's dist-checkpoint loader, resharded to this layout;
    the vision side (first stage only) from the checkpoint's ``vision/`` safetensors, whole. Every
    file's size is checked first (content hashes with ``MEGATRON_GNDPO_VERIFY_HASHES=1``)."""
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, resolve_checkpoint
    from megatron_gndpo.checkpoint.vision import internvl_config, read_vision_weights

    ckpt = resolve_checkpoint(path)
    hf_config = internvl_config(ckpt)
    model = build_internvl_model(hf_config, parallel, precision, pre_process=pre_process, post_process=post_process,
                                 train_vision_tower=train_vision_tower)
    load_model_weights(model.language_model, ckpt, internvl_language_config(hf_config), role, vision_language=True)
    if model.vision is not None:
        model.vision.load_state_dict(read_vision_weights(ckpt), strict=True)
    return model
