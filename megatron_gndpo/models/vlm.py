"""Vision-language models: transformers' own vision tower and projector in front of a megatron-core
``GPTModel``.

The vision side runs as the transformers modules the model is made of, as Megatron-Bridge does for its
vision-language models: InternVL's (InternViT, pixel shuffle, MLP projector) or Qwen2.5-VL's (the
windowed ViT with its 2-D RoPE and patch merger, ``Qwen2_5_VisionTransformerPretrainedModel``). It is
small next to the language model, so it is replicated on every tensor-parallel rank of the first
pipeline stage, and its math is transformers' by construction. Its image embeddings replace the token
embeddings of the image-token positions, and the merged embeddings enter the GPTModel as
``decoder_input``: the language model stays megatron's, tensor / pipeline parallel, with
vocab-parallel logits. Qwen2.5-VL's language model uses M-RoPE (megatron-core's
``MultimodalRotaryEmbedding``) at the 3-D positions transformers' ``get_rope_index`` gives
(:func:`mrope_position_ids`), computed on every pipeline stage from the token ids and the images'
patch grids (never the pixels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Mapping, Optional, Tuple

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

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
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

    def encoder(self) -> torch.nn.Module:
        """The vision encoder, which ``train_vision_tower=False`` freezes: InternViT (the projector trains)."""
        return self.vision_tower

    @staticmethod
    def embeddings_per_image(n_features: int, image_tiles: Optional[torch.Tensor],
                             image_grid_thw: Optional[torch.Tensor]) -> Optional[List[int]]:
        """How many of the ``n_features`` embeddings each image got (None: not known without its tiles)."""
        if image_tiles is None:
            return None
        per_tile = n_features // max(int(image_tiles.sum()), 1)
        return [tiles * per_tile for tiles in image_tiles.tolist()]


class Qwen25VLVision(torch.nn.Module):
    """Flattened patches -> image embeddings in the language model's width: transformers'
    ``Qwen2_5_VisionTransformerPretrainedModel`` (patch embedding, windowed and full attention blocks
    with 2-D RoPE, the patch merger), as ``Qwen2_5_VLModel.get_image_features`` runs it."""

    def __init__(self, hf_config):
        super().__init__()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        self.config = hf_config
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config.vision_config)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[patches, 3 * temporal_patch_size * patch_size**2] with the images' grids ``image_grid_thw``
        [images, 3] -> [patches / spatial_merge_size**2, hidden], image after image."""
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL images need their patch grids (image_grid_thw)")
        return self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw=image_grid_thw,
                           return_dict=True).pooler_output

    def encoder(self) -> torch.nn.Module:
        """The vision encoder, which ``train_vision_tower=False`` freezes: everything but the patch merger
        (the projector, which trains)."""
        return torch.nn.ModuleList([m for name, m in self.visual.named_children() if name != "merger"])

    def embeddings_per_image(self, n_features: int, image_tiles: Optional[torch.Tensor],
                             image_grid_thw: Optional[torch.Tensor]) -> Optional[List[int]]:
        """Each image's embeddings: its patches / spatial_merge_size**2."""
        return (image_grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size ** 2).tolist()


def mrope_position_ids(input_ids: torch.Tensor, image_mask: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                       hf_config) -> torch.Tensor:
    """Qwen2.5-VL's M-RoPE positions ``[3, B, S]`` (temporal, height, width) of ``input_ids`` ``[B, S]``
    whose image tokens are ``image_mask`` ``[B, S]``, the images' grids ``image_grid_thw`` ``[images, 3]``
    in reading order: transformers' own ``Qwen2_5_VLModel.get_rope_index`` (it reads only the config).

    A run of text tokens continues one past the largest position before it on all three axes; an
    image of grid (t, h, w) starting at p takes (p + t', p + h', p + w') over its merged grid
    (h' < h / merge, w' < w / merge). So the tokens after a row's last image sit at their index plus
    ``rope_deltas`` = max position + 1 - length (transformers' decode-time offset): sampled tokens
    continue after the prompt's largest position."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    # get_rope_index reads self.config and self.get_vision_position_ids, which reads nothing of self
    shim = type("RopeIndex", (), {"config": hf_config, "get_vision_position_ids": staticmethod(
        functools.partial(Qwen2_5_VLModel.get_vision_position_ids, None))})()
    positions, _ = Qwen2_5_VLModel.get_rope_index(shim, input_ids, mm_token_type_ids=image_mask.int(),
                                                  image_grid_thw=image_grid_thw)
    return positions


class VisionLanguageModel(torch.nn.Module):
    """A GPTModel whose prompt may hold images. On the first pipeline stage the image embeddings of
    ``pixel_values`` replace the token embeddings where ``input_ids`` is ``image_token_id``, in
    reading order (row after row, position after position), as transformers merges them. Later
    stages see hidden states only, as for a text model. ``rope_config`` (Qwen2.5-VL's config) makes
    every stage hand the language model M-RoPE positions (:meth:`language_positions`); None: 1-D RoPE."""

    def __init__(self, language_model, vision: Optional[torch.nn.Module], image_token_id: int, rope_config=None):
        super().__init__()
        self.language_model, self.vision, self.image_token_id = language_model, vision, image_token_id
        self.rope_config = rope_config

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
                       image_tokens: Optional[torch.Tensor] = None,
                       image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every image's embeddings ``[image tokens, hidden]``, image after image (first stage only).

        With ``image_tokens`` ``[images]`` (how many image tokens the processor wrote for each image)
        and the images' layout (``image_tiles`` for InternVL, ``image_grid_thw`` for Qwen2.5-VL) each
        image's embeddings are checked against its tokens: a processor that lays images out differently
        from this vision tower (another ``image_seq_length``, a teacher whose InternViT has another
        resolution) is an error naming the image, not a silent shift of every later image."""
        features = self.vision(pixel_values, image_grid_thw)
        made = self.vision.embeddings_per_image(features.shape[0], image_tiles, image_grid_thw)
        if made is not None and image_tokens is not None:
            for k, (n, tokens) in enumerate(zip(made, image_tokens.tolist())):
                if n != tokens:
                    raise ValueError(f"image {k} of the batch: the prompt holds {tokens} image tokens for it, but "
                                     f"this vision tower makes {n} embeddings of it (the processor and the model "
                                     "disagree on the image-token layout)")
        return features

    def shared_image_features(self, pixel_values: torch.Tensor, image_source: torch.Tensor, image_tokens: torch.Tensor,
                              image_tiles: Optional[torch.Tensor] = None,
                              image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`image_features` of images some of which repeat (the n samples of a prompt share its images):
        ``pixel_values`` holds each distinct image once, ``image_source`` ``[images]`` names the distinct image
        (its index among them) of every image in reading order, and ``image_tokens`` / ``image_tiles`` /
        ``image_grid_thw`` are per image in reading order. The vision tower runs once per distinct image; its
        embeddings are repeated where the image repeats (their gradients add up)."""
        source = image_source.tolist()
        first = torch.tensor([source.index(d) for d in range(max(source) + 1)], device=image_source.device)
        features = self.image_features(pixel_values, image_tiles[first] if image_tiles is not None else None,
                                       image_tokens[first],
                                       image_grid_thw[first] if image_grid_thw is not None else None)
        per_image = features.split(image_tokens[first].tolist())
        return torch.cat([per_image[d] for d in source])

    def image_mask(self, input_ids: torch.Tensor, row_image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[batch, seq]`` True at the image tokens of ``input_ids``. With ``row_image_tokens`` ``[batch]``
        (the image tokens of each row's prompt) only the first that many of a row: a sampled response
        that holds the image token id keeps it as a token, since every prompt token precedes the response."""
        mask = input_ids == self.image_token_id
        if row_image_tokens is not None:
            mask &= mask.cumsum(dim=1) <= row_image_tokens[:, None]
        return mask

    def merge(self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor,
              row_image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings ``[seq, batch, h]`` with ``features`` ``[n, h]`` written at the ``n`` image
        tokens of ``input_ids`` ``[batch, seq]`` (:meth:`image_mask`), read row after row."""
        mask = self.image_mask(input_ids, row_image_tokens)
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the batch has {int(mask.sum())} image tokens but its images make {features.shape[0]} "
                             "image embeddings")
        # batch-major like input_ids, so the k-th image token gets the k-th embedding
        merged = embeds.transpose(0, 1).masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return merged.transpose(0, 1).contiguous()

    def language_positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                           image_grid_thw: Optional[torch.Tensor] = None,
                           row_image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The positions the language model takes for ``input_ids`` ``[batch, seq]``: ``position_ids``
        ``[batch, seq]`` for 1-D RoPE; with M-RoPE ``[3, batch, seq]``, the three axes equal to
        ``position_ids`` for text, and :func:`mrope_position_ids` (sequences starting at position 0)
        when the batch has images of grids ``image_grid_thw``."""
        if self.rope_config is None:
            if image_grid_thw is not None:
                raise ValueError("image_grid_thw (Qwen2.5-VL images) given to a model without M-RoPE")
            return position_ids
        if image_grid_thw is None:
            return position_ids.expand(3, *position_ids.shape)
        return mrope_position_ids(input_ids, self.image_mask(input_ids, row_image_tokens), image_grid_thw,
                                  self.rope_config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask,
                pixel_values: Optional[torch.Tensor] = None, image_tiles: Optional[torch.Tensor] = None,
                image_tokens: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                row_image_tokens: Optional[torch.Tensor] = None, image_source: Optional[torch.Tensor] = None,
                **kwargs):
        """``input_ids`` [batch, seq]; ``pixel_values`` every image of the batch, in the order their
        image tokens appear in ``input_ids`` read row after row (None: no images, or a later stage), or with
        ``image_source`` each distinct image once (:meth:`shared_image_features`);
        ``image_tiles`` / ``image_tokens`` [images] to check each image's layout (:meth:`image_features`);
        ``image_grid_thw`` [images, 3] Qwen2.5-VL's grids, on every stage (the M-RoPE positions need
        them); ``row_image_tokens`` [batch] as in :meth:`image_mask`."""
        for key in ("pixel_values_videos", "video_grid_thw"):
            if key in kwargs:
                raise NotImplementedError(f"{key}: videos are not supported (images only)")
        position_ids = self.language_positions(input_ids, position_ids, image_grid_thw, row_image_tokens)
        if self.vision is None or pixel_values is None:
            return self.language_model(input_ids, position_ids, attention_mask, **kwargs)
        if self.language_model.config.sequence_parallel:
            raise NotImplementedError("images with sequence parallelism: the embeddings would be merged into "
                                      "sequence shards")
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)  # [seq, batch, h]
        if image_source is None:
            features = self.image_features(pixel_values, image_tiles, image_tokens, image_grid_thw)
        else:
            features = self.shared_image_features(pixel_values, image_source, image_tokens, image_tiles, image_grid_thw)
        return self.language_model(input_ids, position_ids, attention_mask,
                                   decoder_input=self.merge(input_ids, embeds, features, row_image_tokens), **kwargs)


def _internvl_language_config(hf_config) -> ModelConfig:
    from megatron_gndpo.checkpoint.hf_mapping import model_config_from_hf

    return model_config_from_hf(hf_config.text_config)


def _qwen25vl_language_config(hf_config) -> ModelConfig:
    """Qwen2.5-VL's language model is a Qwen2 decoder whose RoPE is M-RoPE: its text config is read as
    a ``Qwen2Config`` (the text converter's checks) without the M-RoPE keys, which become ``mrope_section``.
    Any other rope type (transformers would run its scaling on the three axes) is refused by name."""
    from transformers import Qwen2Config

    from megatron_gndpo.checkpoint.hf_mapping import model_config_from_hf

    text = hf_config.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    section, legacy = rope.pop("mrope_section", None), rope.pop("type", None)
    if legacy not in (None, "mrope", "default") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"Qwen2.5-VL text_config.rope_parameters {text.rope_parameters}: only M-RoPE (rope_type "
                         "'default' with an mrope_section) is supported")
    if section is None:
        raise ValueError("Qwen2.5-VL text_config.rope_parameters has no mrope_section")
    fields = {k: v for k, v in text.to_diff_dict().items()
              if k not in ("model_type", "transformers_version", "rope_parameters", "rope_scaling", "rope_theta")}
    cfg = model_config_from_hf(Qwen2Config(**fields, rope_parameters=rope))
    return dataclasses.replace(cfg, mrope_section=[int(n) for n in section])


@dataclasses.dataclass(frozen=True)
class VisionFamily:
    """What differs between the vision-language families: the vision side's module, the language
    model's config, and the tensors' names."""

    vision: Callable[..., torch.nn.Module]
    """The vision side's module, built from the top-level transformers config."""
    language_config: Callable[..., ModelConfig]
    """Top-level transformers config -> the language model's ModelConfig (``lm_head`` tying aside)."""
    names: Mapping[str, Tuple[str, str, str]]
    """Naming -> (language model prefix, output layer, vision-side prefix); the first naming whose
    prefix matches wins. ``modules``: the transformers modules' (``state_dict()``); ``files``: its
    checkpoint files' (``save_pretrained`` writes this earlier layout and renames it on load)."""
    vision_modules: Tuple[str, ...]
    """The vision side's names in its module (without a naming's vision-side prefix)."""
    mrope: bool
    """Whether the language model takes M-RoPE positions."""


VLM_FAMILIES: Dict[str, VisionFamily] = {
    "internvl": VisionFamily(InternVLVision, _internvl_language_config,
                             {"modules": ("model.language_model.", "lm_head.weight", "model."),
                              "files": ("language_model.model.", "language_model.lm_head.weight", "")},
                             ("vision_tower.", "multi_modal_projector."), mrope=False),
    "qwen2_5_vl": VisionFamily(Qwen25VLVision, _qwen25vl_language_config,
                               {"modules": ("model.language_model.", "lm_head.weight", "model."),
                                "files": ("model.", "lm_head.weight", "")},
                               ("visual.",), mrope=True),
}
"""The vision-language families (transformers ``model_type``) built here."""

VISION_KEY = "vision."
"""The prefix of the vision side's tensors in a ``VisionLanguageModel``'s sharded state dict."""


def vlm_family(family: str) -> VisionFamily:
    if family not in VLM_FAMILIES:
        raise ValueError(f"vision-language family {family!r} is not supported (supported: {', '.join(VLM_FAMILIES)})")
    return VLM_FAMILIES[family]


def vlm_language_config(hf_config) -> ModelConfig:
    """The language model of a transformers vision-language config (``InternVLConfig``,
    ``Qwen2_5_VLConfig``) as our ModelConfig, with the text converter's checks. ``lm_head`` is tied by
    the top-level config."""
    cfg = vlm_family(hf_config.model_type).language_config(hf_config)
    return dataclasses.replace(cfg, tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


def vlm_part(family: str, key: str) -> Tuple[Optional[str], str, str]:
    """Where a tensor of a ``family`` checkpoint (either naming) belongs: (its naming, "language", its
    name in a text checkpoint: ``model.*`` / ``lm_head.weight``) or (its naming, "vision", its name in
    the vision module). The naming is None for a name both namings share (Qwen2.5-VL's ``lm_head.weight``).
    An unknown key is a KeyError naming it."""
    names = vlm_family(family).names
    modules = vlm_family(family).vision_modules
    for naming, (lm, head, vision) in names.items():
        if key == head:
            return (naming if sum(h == key for _, h, _ in names.values()) == 1 else None), "language", "lm_head.weight"
        if key.startswith(tuple(vision + m for m in modules)):
            return naming, "vision", key[len(vision):]
        if key.startswith(lm):
            return naming, "language", "model." + key[len(lm):]
    raise KeyError(f"{family} checkpoint tensor {key!r} is neither the language model's nor the vision side's")


def vlm_hf_name(family: str, naming: str, part: str, name: str) -> str:
    """The inverse of :func:`vlm_part`: the name of a language-model (text checkpoint name) or
    vision-side (vision module name) tensor in ``naming``."""
    lm, head, vision = vlm_family(family).names[naming]
    if part == "vision":
        return vision + name
    return head if name == "lm_head.weight" else lm + name[len("model."):]


def split_vlm_state_dict(family: str, hf: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor],
                                                                               Dict[str, torch.Tensor]]:
    """A ``family`` state dict or checkpoint file (either naming) -> (the language model's, under the
    text checkpoints' names ``model.*`` / ``lm_head.weight``; the vision side's, under its module's
    names). An unknown key is an error naming it."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {"language": {}, "vision": {}}
    for key, tensor in hf.items():
        _, part, name = vlm_part(family, key)
        parts[part][name] = tensor
    return parts["language"], parts["vision"]


def build_vlm_model(hf_config, parallel: ParallelConfig, precision: PrecisionConfig, *, pre_process: bool,
                    post_process: bool, train_vision_tower: bool = False) -> VisionLanguageModel:
    """The megatron-core language model of this pipeline stage behind transformers' vision side (first
    stage only). ``train_vision_tower`` False freezes the vision encoder (InternViT; Qwen2.5-VL's ViT),
    as the GNDPO reference does; the projector (InternVL's MLP; Qwen2.5-VL's patch merger) trains
    either way."""
    from megatron_gndpo.models.provider import build_gpt_model, params_dtype

    family = vlm_family(hf_config.model_type)
    language_model = build_gpt_model(vlm_language_config(hf_config), parallel, precision,
                                     pre_process=pre_process, post_process=post_process)
    vision = None
    if pre_process:
        vision = family.vision(hf_config).to(dtype=params_dtype(precision))
        vision.encoder().requires_grad_(train_vision_tower)
        if torch.cuda.is_available() and not language_model.config.use_cpu_initialization:
            vision.cuda(torch.cuda.current_device())
    return VisionLanguageModel(language_model, vision, hf_config.image_token_id,
                               rope_config=hf_config if family.mrope else None)


def load_vlm_hf_weights(model: VisionLanguageModel, hf: Mapping[str, torch.Tensor], hf_config) -> None:
    """Copy a transformers vision-language state dict into ``model`` (this rank's slices of the language
    model through the text converter's mapping; the vision side whole)."""
    from megatron_gndpo.checkpoint.hf_mapping import hf_to_global
    from megatron_gndpo.models.weights import load_global_weights

    lm, vision = split_vlm_state_dict(hf_config.model_type, hf)
    cfg = vlm_language_config(hf_config)
    tp = model.language_model.config.tensor_model_parallel_size
    load_global_weights(model.language_model, hf_to_global(lm, cfg, cfg.padded_vocab_size(tp)))
    if model.vision is not None:
        model.vision.load_state_dict(vision, strict=True)


def load_vlm_checkpoint(path, parallel: ParallelConfig, precision: PrecisionConfig, *, pre_process: bool,
                        post_process: bool, train_vision_tower: bool = False,
                        role: str = "model") -> VisionLanguageModel:
    """This pipeline stage's vision-language model from a converted checkpoint (``megatron-gndpo convert
    hf-to-megatron`` of an InternVL or Qwen2.5-VL directory, or a checkpoint root whose ``latest`` names
    one), at any TP x PP. Collective over the world, like
    :func:`~megatron_gndpo.checkpoint.dist_ckpt.load_model_weights`.

    The transformers config comes from the checkpoint's metadata (no Hugging Face directory needed);
    the language model's shards load through megatron's dist-checkpoint loader, resharded to this
    layout; the vision side (first stage only) from the checkpoint's ``vision/`` safetensors, whole.
    Every file's size is checked first (content hashes with ``MEGATRON_GNDPO_VERIFY_HASHES=1``)."""
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights, resolve_checkpoint
    from megatron_gndpo.checkpoint.vision import read_vision_weights, vlm_config

    ckpt = resolve_checkpoint(path)
    hf_config = vlm_config(ckpt)
    model = build_vlm_model(hf_config, parallel, precision, pre_process=pre_process, post_process=post_process,
                            train_vision_tower=train_vision_tower)
    load_model_weights(model.language_model, ckpt, vlm_language_config(hf_config), role, vision_language=True)
    if model.vision is not None:
        model.vision.load_state_dict(read_vision_weights(ckpt), strict=True)
    return model
