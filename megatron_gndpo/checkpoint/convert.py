"""Hugging Face <-> megatron dist-checkpoint conversion (the core of ``tools/checkpoint_convert``).

Megatron's dist-checkpoints store every tensor under its global, layout-free key with its shard
metadata, and megatron-core reshards them on load: a checkpoint written from one process loads at
any TP x PP. ``--tp/--pp`` therefore name the layout the checkpoint is meant for: it is validated
(heads, query groups, FFN width and layers must divide) and recorded, and the vocabulary is padded
for it (``make_vocab_size_divisible_by x TP``), exactly as a model built at that layout pads it.

Every function here runs in one process with megatron's groups already initialised at TP=PP=1
(:func:`main` does that); the model's weights pass through CPU memory once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from megatron_gndpo.checkpoint.dist_ckpt import read_meta, save_model_weights
from megatron_gndpo.checkpoint.hf_mapping import global_to_hf, hf_to_global, model_config_from_hf
from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
HF_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
FP32 = PrecisionConfig(params_dtype="float32", transformer_impl="local")


def _progress(total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), transient=True)
    return progress, progress.add_task(what, total=total)


def read_hf_tensors(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint (``model.safetensors`` or shards listed in its index)."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    out: Dict[str, torch.Tensor] = {}
    progress, task = _progress(len(files), "reading safetensors")
    with progress:
        for name in files:
            with safe_open(str(hf_dir / name), framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
            progress.advance(task)
    return out


def _build_model(cfg: ModelConfig, tp: int):
    """The whole model in this one process, its vocabulary padded as a TP=``tp`` model pads it."""
    from megatron_gndpo.models.provider import build_gpt_model

    padded = dataclasses.replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)
    return build_gpt_model(padded, ParallelConfig(), FP32, pre_process=True, post_process=True)


def _copy_tokenizer(src: Path, dst: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1) -> Dict[str, object]:
    """HF directory -> megatron dist-checkpoint (+ ``tokenizer/``) for a TP x PP layout."""
    from transformers import AutoConfig

    from megatron_gndpo.models.weights import load_global_weights

    hf_path = Path(hf_dir)
    if not (hf_path / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    cfg = model_config_from_hf(hf_config)
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).check_model(cfg, "model")
    padded = cfg.padded_vocab_size(tp)
    weights = hf_to_global(read_hf_tensors(hf_path), cfg, padded)
    model = _build_model(cfg, tp)
    load_global_weights(model, weights)
    save_model_weights(model, out_dir, cfg, {"tp": tp, "pp": pp}, hf_architecture=hf_config.model_type,
                       dtype=str(next(iter(weights.values())).dtype).replace("torch.", ""))
    copied = _copy_tokenizer(hf_path, Path(out_dir) / "tokenizer")
    return {"tensors": len(weights), "parameters": sum(t.numel() for t in weights.values()),
            "padded_vocab": padded, "tokenizer_files": copied, "layout": {"tp": tp, "pp": pp}}


def load_megatron_global(ckpt_dir: str) -> Tuple[ModelConfig, Dict[str, torch.Tensor], dict]:
    """A dist-checkpoint's architecture, global weights and metadata."""
    from megatron_gndpo.checkpoint.dist_ckpt import load_model_weights
    from megatron_gndpo.models.weights import gather_global_weights

    meta = read_meta(ckpt_dir)
    cfg = ModelConfig(**meta["model"])
    tp = meta["layout"].get("tp", 1)
    model = _build_model(cfg, tp)
    load_model_weights(model, ckpt_dir, cfg, "model")
    return cfg, gather_global_weights(model), meta


def _hf_config(cfg: ModelConfig, family: str, dtype: str):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_theta=cfg.rope_theta, architectures=[HF_FAMILIES[family]], torch_dtype=dtype)
    if family == "llama":
        kwargs["attention_bias"] = cfg.attention_bias
    return cls(**kwargs)


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> Iterator[Dict[str, torch.Tensor]]:
    shard: Dict[str, torch.Tensor] = {}
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = t
        size += nbytes
    if shard:
        yield shard


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, family: Optional[str] = None,
                   max_shard_bytes: int = 5 * 1024 ** 3) -> Dict[str, object]:
    """Megatron dist-checkpoint -> HF directory: config.json, sharded safetensors with
    ``model.safetensors.index.json``, and the tokenizer files kept at import."""
    from safetensors.torch import save_file

    cfg, weights, meta = load_megatron_global(ckpt_dir)
    family = family or meta.get("hf_architecture") or ("qwen3" if cfg.qk_layernorm else
                                                       "qwen2" if cfg.attention_bias else "llama")
    if family not in HF_FAMILIES:
        raise ValueError(f"unknown Hugging Face architecture {family!r}; supported: {', '.join(HF_FAMILIES)}")
    tensors = global_to_hf(weights, cfg)
    dtype = meta.get("dtype", "float32")
    tensors = {k: t.to(getattr(torch, dtype)) for k, t in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _hf_config(cfg, family, dtype).save_pretrained(str(out))
    shards = list(_shards(tensors, max_shard_bytes))
    weight_map = {}
    progress, task = _progress(len(shards), "writing safetensors")
    with progress:
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            progress.advance(task)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    copied = _copy_tokenizer(Path(ckpt_dir) / "tokenizer", out)
    return {"tensors": len(tensors), "shards": len(shards), "bytes": total, "family": family,
            "tokenizer_files": copied}


def reshard(in_dir: str, out_dir: str, tp: int = 1, pp: int = 1) -> Dict[str, object]:
    """Re-save the weights of a dist-checkpoint (weights-only or a training checkpoint) for another
    TP x PP layout (vocabulary padding follows the new TP)."""
    from megatron_gndpo.models.weights import load_global_weights

    cfg, weights, meta = load_megatron_global(in_dir)
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).check_model(cfg, "model")
    padded = cfg.padded_vocab_size(tp)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in weights:
            w = weights[key][:cfg.vocab_size]
            weights[key] = torch.cat([w, w.new_zeros(padded - cfg.vocab_size, *w.shape[1:])])
    model = _build_model(cfg, tp)
    load_global_weights(model, weights)
    extra = {k: meta[k] for k in ("hf_architecture", "dtype") if k in meta}
    save_model_weights(model, out_dir, cfg, {"tp": tp, "pp": pp}, **extra)
    copied = _copy_tokenizer(Path(in_dir) / "tokenizer", Path(out_dir) / "tokenizer")
    return {"tensors": len(weights), "layout": {"tp": tp, "pp": pp}, "from": meta["layout"], "tokenizer_files": copied}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-megatron", help="Hugging Face directory -> megatron dist-checkpoint")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p = sub.add_parser("megatron-to-hf", help="megatron dist-checkpoint -> Hugging Face directory")
    p.add_argument("--megatron", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=sorted(HF_FAMILIES), default=None)
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p = sub.add_parser("reshard", help="re-save a dist-checkpoint for another TP x PP layout")
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)


def run(args) -> int:
    from rich.console import Console

    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    try:
        if args.command == "hf-to-megatron":
            summary = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp)
        elif args.command == "megatron-to-hf":
            summary = megatron_to_hf(args.megatron, args.out, family=args.family,
                                     max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
        else:
            summary = reshard(args.inp, args.out, tp=args.tp, pp=args.pp)
    finally:
        destroy_parallel()
    Console().print({"command": args.command, "out": os.path.abspath(args.out), **summary})
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.checkpoint_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
