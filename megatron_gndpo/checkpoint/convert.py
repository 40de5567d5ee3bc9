"""Hugging Face <-> megatron dist-checkpoint conversion (the core of ``tools/checkpoint_convert``).

Megatron's dist-checkpoints store every tensor under its global, layout-free key with its shard
metadata, and megatron-core reshards them on load: a checkpoint written from one process loads at
any TP x PP. ``--tp/--pp`` therefore name the layout the checkpoint is meant for: it is validated
(heads, query groups, FFN width and layers must divide) and recorded, and the vocabulary is padded
for it (``make_vocab_size_divisible_by x TP``), exactly as a model built at that layout pads it.

Every direction streams one decoder layer at a time (``hf_io`` / ``megatron_io``): peak memory is
about one layer plus one safetensors shard, whatever the model's size. Tensors keep their dtype
(a bf16 HF model becomes a bf16 checkpoint; megatron casts on load); a non-finite one is refused by
name. Every function here runs in one process with megatron's groups initialised at TP=PP=1
(:func:`run` does that).

What a user has is never lost: ``--out`` may not be, hold or lie inside an input, and an existing
one is replaced only when it is empty, an earlier output of this tool holding nothing else, or
``--overwrite`` is given; all checked before any compute. The output is written into a hidden
sibling and renamed into place when complete. A megatron input (a checkpoint, or a checkpoint root
whose ``latest`` names one) and an input that is an earlier export are checked against the sizes
and hashes recorded when they were written; every output records its own (``integrity.py``), and
``--verify`` reads it back against them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_gndpo.checkpoint.dist_ckpt import (STEP_DIR, TOKENIZER_DIR, TOKENIZER_FILES, copy_tokenizer,
                                                 model_config_from_checkpoint, read_meta, resolve_checkpoint)
from megatron_gndpo.checkpoint.hf_io import INDEX_FILE, HFCheckpointReader, HFShardWriter, progress_bar
from megatron_gndpo.checkpoint.hf_mapping import (hf_config_from_model, hf_tensor_shapes, ignorable_hf_key,
                                                  layer_from_hf, layer_to_hf, model_config_from_hf, non_layer_from_hf,
                                                  non_layer_to_hf, pad_vocab)
from megatron_gndpo.checkpoint.integrity import (EXPORT_FILE, RECORD_FILES, check_output_dir, checkpoint_problem,
                                                 file_manifest, read_record, replace_dir, verify_checkpoint)
from megatron_gndpo.checkpoint.megatron_io import MegatronCheckpointReader, write_megatron_checkpoint
from megatron_gndpo.checkpoint.vision import (check_vision_tensors, copy_vision_weights, read_vision_weights,
                                              vision_family, vision_record, write_vision_weights)
from megatron_gndpo.config.schema import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)
HF_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@contextlib.contextmanager
def _staged_output(out_dir: str, inputs: Sequence[Path], overwrite: bool) -> Iterator[Path]:
    """A fresh path to write the output into, renamed to ``out_dir`` when the block succeeds.

    ``out_dir`` is checked first (:func:`integrity.check_output_dir`), and again before the rename in
    case something was put there meanwhile (the finished output is then kept and named). The path
    lies in a hidden sibling directory made for this call, removed afterwards: nothing else is ever
    deleted but an earlier output the check allowed."""
    final = check_output_dir(out_dir, inputs, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    keep_staging = False
    try:
        yield staging / final.name
        try:
            check_output_dir(final, inputs, overwrite=overwrite)
        except FileExistsError as e:
            keep_staging = True
            raise FileExistsError(f"{e}; the finished output is kept at {staging / final.name}") from None
        replace_dir(staging / final.name, final)
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)


def _conversion(command: str, source: Path) -> Dict[str, str]:
    """What the output's record says about how it was made; it marks the directory as this tool's."""
    return {"command": command, "source": str(source.resolve())}


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every element is finite, checked in chunks: a whole-tensor mask would cost a byte per
    element (1.2 GB for a 152k x 8k embedding), where streaming keeps conversion memory at a layer."""
    return not t.is_floating_point() or all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(chunk))


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raises ValueError naming the first tensor with a NaN or an infinity."""
    for key, t in tensors.items():
        if not _all_finite(t):
            raise ValueError(f"tensor {key!r}{where} has {int(torch.isnan(t).sum())} NaN and "
                             f"{int(torch.isinf(t).sum())} infinite values: refusing to convert a model with "
                             "non-finite weights")


def _finite_get(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``get`` with every tensor it returns checked by :func:`_check_finite`."""

    def take(key: str) -> torch.Tensor:
        t = get(key)
        _check_finite({key: t})
        return t

    return take


def _parts(cfg: ModelConfig, non_layer, layer, what: str) -> Iterator[Tuple[Optional[int], Dict[str, torch.Tensor]]]:
    """(None, non_layer()) then (i, layer(i)) for every decoder layer, under a progress bar; each
    part is produced only when the consumer asks for it, so one part is in memory at a time."""
    yield None, non_layer()
    progress, task = progress_bar(cfg.num_hidden_layers, what)
    with progress:
        for i in range(cfg.num_hidden_layers):
            yield i, layer(i)
            progress.advance(task)


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> int:
    """Validates TP x PP for this model and returns the vocabulary padded for TP."""
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).check_model(cfg, "model")
    return cfg.padded_vocab_size(tp)


def _tokenizer_files(path: Path) -> List[str]:
    return [name for name in TOKENIZER_FILES if (path / name).is_file()]


def _has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a loadable tokenizer (a generation config or chat template alone is not one)."""
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_FILE


def _verify_output(out: Path, verify: bool) -> None:
    """With ``verify``: read the finished output back against the hashes just recorded."""
    if verify:
        verify_checkpoint(out, hashes=True)


def _split_vision(family: str, keys: Sequence[str]) -> Tuple[str, Dict[str, str], Dict[str, str]]:
    """A vision-language checkpoint's tensor names -> (their naming, text-checkpoint name -> checkpoint
    name of each language-model tensor, vision module name -> checkpoint name of each vision-side
    one). Unknown names, or both namings in one checkpoint, are an error naming them."""
    from megatron_gndpo.models.vlm import vlm_part

    parts: Dict[str, Dict[str, str]] = {"language": {}, "vision": {}}
    namings, unknown = {}, []
    for key in keys:
        try:
            naming, part, name = vlm_part(family, key)
        except KeyError:
            unknown.append(key)
            continue
        parts[part][name] = key
        if naming is not None:  # a name both namings share says nothing
            namings.setdefault(naming, key)
    if unknown:
        raise KeyError(f"{family} checkpoint has tensors that are neither the language model's nor the vision "
                       f"side's: {sorted(unknown)[:5]}")
    if len(namings) != 1:
        raise KeyError(f"{family} checkpoint mixes two namings of its tensors: {sorted(namings.values())}")
    return next(iter(namings)), parts["language"], parts["vision"]


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, *, overwrite: bool = False,
                   verify: bool = False) -> Dict[str, object]:
    """HF directory -> megatron dist-checkpoint (+ ``tokenizer/``) for a TP x PP layout. A vision-language
    (InternVL, Qwen2.5-VL) directory's language model converts as a text model does; its vision side,
    its config and its processor files are stored beside it (checkpoint/vision.py)."""
    from transformers import AutoConfig

    from megatron_gndpo.models.vlm import vlm_hf_name, vlm_language_config

    hf_path = Path(hf_dir)
    with _staged_output(out_dir, [hf_path], overwrite) as out:
        if not (hf_path / "config.json").is_file():
            raise FileNotFoundError(f"{hf_dir} has no config.json")
        raw_config = json.loads((hf_path / "config.json").read_text())
        family = vision_family(raw_config)
        hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
        cfg = model_config_from_hf(hf_config) if family is None else vlm_language_config(hf_config)
        padded = _check_layout(cfg, tp, pp)
        # An earlier export of ours says what its weights should be; its JSON files a user may have edited.
        if read_record(hf_path) is not None:
            verify_checkpoint(hf_path, hashes=True, only=_is_weight_file)
        with HFCheckpointReader(hf_path) as hf:
            naming, language, vision = ((None, {k: k for k in hf.keys()}, {}) if family is None
                                        else _split_vision(family, hf.keys()))
            ignorable = {k for k in language if ignorable_hf_key(k, cfg)}
            unexpected = sorted(set(language) - set(hf_tensor_shapes(cfg)) - ignorable)
            if unexpected:
                raise KeyError(f"Hugging Face checkpoint has tensors this {cfg.num_hidden_layers}-layer config does "
                               f"not use: {[language[k] for k in unexpected[:5]]}")
            get = _finite_get(lambda key: hf.get(language.get(key, key)))
            # the vision side is small next to the language model (InternViT-300M: 0.6 GB in bf16, Qwen2.5-VL's
            # ViT 1.3 GB): read whole
            vision_tensors = {name: get(key) for name, key in vision.items()}
            if family is not None:
                check_vision_tensors(hf_config, {name: t.shape for name, t in vision_tensors.items()},
                                     lambda name: vlm_hf_name(family, naming, "vision", name))
            extra = {} if family is None else {"vision": vision_record(raw_config, hf_config, naming)}
            parts = _parts(cfg, lambda: non_layer_from_hf(get, cfg, padded), lambda i: layer_from_hf(get, cfg, i),
                           "converting layers")
            written = write_megatron_checkpoint(out, cfg, tp, pp, parts, tokenizer=hf_path,
                                                hf_architecture=hf_config.model_type,
                                                conversion=_conversion("hf-to-megatron", hf_path),
                                                add_files=(lambda d: write_vision_weights(d, vision_tensors))
                                                if vision else None, **extra)
        _verify_output(out, verify)
    summary = {"tensors": written["tensors"], "parameters": sum(n for _, n in _hf_numels(cfg)),
               "padded_vocab": padded, "dtype": written["dtype"], "tokenizer_files": _tokenizer_files(hf_path),
               "layout": {"tp": tp, "pp": pp}}
    if family is not None:
        summary.update(family=family, vision_tensors=len(vision_tensors),
                       vision_parameters=sum(t.numel() for t in vision_tensors.values()))
    return summary


def _hf_numels(cfg: ModelConfig) -> List[Tuple[str, int]]:
    """(HF name, element count) of every tensor, in writing order."""
    return [(key, torch.Size(shape).numel()) for key, shape in hf_tensor_shapes(cfg).items()]


def _special_token_ids(tokenizer) -> Dict[str, object]:
    """bos / eos / pad ids for config.json (None where the tokenizer has none)."""
    return {"bos_token_id": tokenizer.bos_token_id if tokenizer is not None else None,
            "eos_token_id": tokenizer.eos_token_id if tokenizer is not None else None,
            "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else None}


def _write_generation_config(out: Path, tokenizer) -> None:
    """generation_config.json with the ids that stop and pad generation: every EOS id (the chat
    template's end-of-turn too), pad (EOS when the tokenizer has none) and bos. Values the original
    model's generation config (kept through conversion) sets win."""
    from megatron_gndpo.data.tokenizer import eos_ids

    path = out / "generation_config.json"
    original = json.loads(path.read_text()) if path.is_file() else {}
    eos = eos_ids(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]}
    merged = {**ids, **{k: v for k, v in original.items() if v is not None}}
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, family: Optional[str] = None,
                   max_shard_bytes: int = 5 * 1024 ** 3, tokenizer: Optional[str] = None, overwrite: bool = False,
                   verify: bool = False) -> Dict[str, object]:
    """Megatron dist-checkpoint (or checkpoint root: the step its ``latest`` names) -> HF directory:
    config.json and generation_config.json with the tokenizer's bos / eos / pad ids, sharded
    safetensors with ``model.safetensors.index.json``, and the tokenizer files (the checkpoint's
    ``tokenizer/``, or ``tokenizer``, a directory, when given). Every file of the checkpoint is
    checked against its recorded hash first.

    A converted vision-language checkpoint becomes a directory of its family again: its original
    config.json, the language model under the family's names, the vision side as stored, the processor files; every
    tensor bit-exact with the directory it was converted from (in the stored dtype)."""
    from megatron_gndpo.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from megatron_gndpo.models.vlm import vlm_hf_name

    ckpt = resolve_checkpoint(ckpt_dir)
    tok_dir = Path(tokenizer) if tokenizer is not None else ckpt / TOKENIZER_DIR
    inputs = [Path(ckpt_dir), ckpt] + ([tok_dir] if tokenizer is not None else [])
    with _staged_output(out_dir, inputs, overwrite) as out:
        cfg, meta = model_config_from_checkpoint(ckpt), read_meta(ckpt)
        vision = meta.get("vision")
        if vision is not None:
            if family not in (None, vision["family"]):
                raise ValueError(f"{ckpt} is a {vision['family']} vision-language checkpoint; --family {family} "
                                 "would drop its vision side")
            family = vision["family"]
        else:
            family = family or meta.get("hf_architecture") or ("qwen3" if cfg.qk_layernorm else
                                                               "qwen2" if cfg.attention_bias else "llama")
            if family not in HF_FAMILIES:
                raise ValueError(f"unknown Hugging Face architecture {family!r}; supported: "
                                 f"{', '.join(HF_FAMILIES)}")
        tok = None
        if _has_tokenizer(tok_dir):
            tok = load_tokenizer(str(tok_dir))
            check_tokenizer_fits(tok, cfg.vocab_size, "model")
        elif tokenizer is not None:
            raise FileNotFoundError(f"--tokenizer {tokenizer} has no tokenizer.json, tokenizer_config.json or "
                                    "tokenizer.model")
        else:
            log.warning("%s has no tokenizer (a checkpoint written before checkpoints saved theirs?): the export "
                        "gets no tokenizer and no EOS id, so generation will not stop; pass --tokenizer DIR", ckpt)
        verify_checkpoint(ckpt, hashes=True)
        src = MegatronCheckpointReader(ckpt)
        dtype = getattr(torch, meta["dtype"]) if "dtype" in meta else src.dtype
        out.mkdir()
        if vision is None:
            hf_config = hf_config_from_model(cfg, family, str(dtype).replace("torch.", ""))
            for key, value in _special_token_ids(tok).items():
                setattr(hf_config, key, value)  # the family's defaults (Llama: 1 and 2) are another tokenizer's
            hf_config.save_pretrained(str(out))
            rename, vision_tensors = (lambda key: key), {}
        else:
            (out / "config.json").write_text(json.dumps(vision["hf_config"], indent=2, sort_keys=True) + "\n")
            naming = vision["hf_names"]
            vision_tensors = {vlm_hf_name(family, naming, "vision", name): t
                              for name, t in read_vision_weights(ckpt).items()}
            _check_finite(vision_tensors)

            def rename(key: str) -> str:
                return vlm_hf_name(family, naming, "language", key)
        itemsize = torch.empty((), dtype=dtype).element_size()
        sizes = [(rename(key), n * itemsize) for key, n in _hf_numels(cfg)]
        sizes += [(key, t.numel() * t.element_size()) for key, t in vision_tensors.items()]
        writer = HFShardWriter(out, sizes, max_shard_bytes)

        def add(tensors: Mapping[str, torch.Tensor]) -> None:
            _check_finite(tensors)
            for key, t in tensors.items():
                writer.add(rename(key), t.to(dtype))

        with writer.progress:
            non_layer = non_layer_to_hf(src.non_layer(), cfg)
            add({"model.embed_tokens.weight": non_layer.pop("model.embed_tokens.weight")})
            for i in range(cfg.num_hidden_layers):
                add(layer_to_hf(src.layer(i), cfg, i))
            add(non_layer)
            for key, t in vision_tensors.items():
                writer.add(key, t)  # in its stored dtype
        summary = writer.finish()
        copied = copy_tokenizer(tok_dir, out)
        if tok is not None:
            _write_generation_config(out, tok)
        record = {"conversion": _conversion("megatron-to-hf", ckpt), **file_manifest(out)}
        (out / EXPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        _verify_output(out, verify)
    return {**summary, "family": family, "dtype": str(dtype).replace("torch.", ""), "tokenizer_files": copied,
            "source": str(ckpt), **_special_token_ids(tok)}


def reshard(in_dir: str, out_dir: str, tp: int = 1, pp: int = 1, *, overwrite: bool = False,
            verify: bool = False) -> Dict[str, object]:
    """Re-save the weights of a dist-checkpoint (weights-only or a training checkpoint, or the one a
    checkpoint root's ``latest`` names) for another TP x PP layout (vocabulary padding follows the
    new TP). Every file of the input is checked against its recorded hash first; a vision-language
    checkpoint's vision side is copied unchanged."""
    ckpt = resolve_checkpoint(in_dir)
    with _staged_output(out_dir, [Path(in_dir), ckpt], overwrite) as out:
        cfg = model_config_from_checkpoint(ckpt)
        padded = _check_layout(cfg, tp, pp)
        verify_checkpoint(ckpt, hashes=True)
        src = MegatronCheckpointReader(ckpt)

        def non_layer():
            tensors = src.non_layer()
            for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if key in tensors:
                    tensors[key] = pad_vocab(tensors[key][:cfg.vocab_size], padded)
            _check_finite(tensors)
            return tensors

        def layer(i):
            tensors = src.layer(i)
            _check_finite(tensors, f" (decoder layer {i})")
            return tensors

        parts = _parts(cfg, non_layer, layer, "resharding layers")
        extra = {k: src.meta[k] for k in ("hf_architecture", "vision") if k in src.meta}
        if "vision" in extra:  # replicated, layout-free: copied as it is, once checked
            _check_finite(read_vision_weights(ckpt), " (vision side)")
        tokenizer = ckpt / TOKENIZER_DIR
        written = write_megatron_checkpoint(out, cfg, tp, pp, parts, conversion=_conversion("reshard", ckpt),
                                            tokenizer=tokenizer if tokenizer.is_dir() else None,
                                            add_files=(lambda d: copy_vision_weights(ckpt, d))
                                            if "vision" in extra else None, **extra)
        _verify_output(out, verify)
    return {"tensors": written["tensors"], "layout": {"tp": tp, "pp": pp}, "from": src.layout,
            "tokenizer_files": _tokenizer_files(tokenizer), "source": str(ckpt)}


def verify(path: str) -> Dict[str, str]:
    """Every file of the checkpoint or export at ``path`` against its recorded size and hash; for a
    checkpoint root, of every ``step_*`` checkpoint in it. Returns path -> "ok" or what is damaged."""
    root = Path(path)
    steps = [] if any((root / name).exists() for name in RECORD_FILES) else sorted(
        p for p in root.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name))
    return {str(p): checkpoint_problem(p, hashes=True) or "ok" for p in steps or [root]}


def _return_freed_memory_to_the_os() -> None:
    """Streaming allocates and frees a layer's tensors per iteration; glibc keeps freed blocks of
    that size in its heap, which fragments (measured on a 32-layer 2.9 GiB model, peak above the
    interpreter's baseline without -> with this: reshard 1.25 -> 0.15 GiB, hf-to-megatron 0.31 ->
    0.10 GiB). Allocations above 64 KiB are then mmap-backed and unmapped when freed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "mallopt"):  # glibc; elsewhere the allocator's default stands
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 0)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-megatron", help="Hugging Face directory -> megatron dist-checkpoint")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p = sub.add_parser("megatron-to-hf", help="megatron dist-checkpoint -> Hugging Face directory")
    p.add_argument("--megatron", required=True, help="a checkpoint, or a checkpoint root (follows its `latest`)")
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=sorted(HF_FAMILIES), default=None,
                   help="the text family to write (default: the one converted from); a vision-language "
                        "checkpoint is always written as its own family")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory to export with the model (default: the checkpoint's tokenizer/)")
    p = sub.add_parser("reshard", help="re-save a dist-checkpoint for another TP x PP layout")
    p.add_argument("--in", dest="inp", required=True, help="a checkpoint, or a checkpoint root (follows `latest`)")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    for name in ("hf-to-megatron", "megatron-to-hf", "reshard"):
        p = sub.choices[name]
        p.add_argument("--overwrite", action="store_true",
                       help="replace --out even when it holds files this tool did not write")
        p.add_argument("--verify", action="store_true",
                       help="read the written output back against the hashes recorded for it")
    p = sub.add_parser("verify", help="check a checkpoint (every step_* of a checkpoint root) or an export "
                                      "against its recorded file sizes and hashes")
    p.add_argument("--path", required=True)


def run(args) -> int:
    from rich.console import Console

    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    if args.command == "verify":
        report = verify(args.path)
        Console().print(report)
        return 0 if all(v == "ok" for v in report.values()) else 1
    _return_freed_memory_to_the_os()
    init_parallel(ParallelConfig(), seed=0)
    common = dict(overwrite=args.overwrite, verify=args.verify)
    try:
        if args.command == "hf-to-megatron":
            summary = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, **common)
        elif args.command == "megatron-to-hf":
            summary = megatron_to_hf(args.megatron, args.out, family=args.family,
                                     max_shard_bytes=int(args.max_shard_gb * 1024 ** 3), tokenizer=args.tokenizer,
                                     **common)
        else:
            summary = reshard(args.inp, args.out, tp=args.tp, pp=args.pp, **common)
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
