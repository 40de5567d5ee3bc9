"""Hugging Face tokenizers: loading, chat-template rendering, and the checks the trainer needs."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence


def _from_dir(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str):
    """A tokenizer from a local Hugging Face directory (never downloads)."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"data.tokenizer must be a local tokenizer directory, got {path!r}")
    tok = _from_dir(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no eos_token: responses could never end")
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int, role: str) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {role}.vocab_size is {vocab_size}: "
                         "token ids would index past the embedding")


def _fingerprint_parts(tokenizer) -> Dict[str, str]:
    """The canonical JSON of what one token id means: the token -> id map (added tokens included) and
    the special tokens (their roles, and which ids are special)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special_ids = set(tokenizer.all_special_ids)
    special_ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
    special = {"roles": tokenizer.special_tokens_map, "ids": sorted(special_ids)}
    return {name: json.dumps(part, sort_keys=True, ensure_ascii=False, default=str)
            for name, part in (("vocabulary", vocab), ("special tokens", special))}


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (hex) of the token -> id map and the special tokens: equal exactly when two tokenizers
    give every id the same meaning. File layout, chat template and ``model_max_length`` do not enter,
    so one vocabulary saved with another context length (Qwen2.5-7B's and -1.5B's) has one fingerprint."""
    parts = _fingerprint_parts(tokenizer)
    return hashlib.sha256("\n".join(parts[k] for k in sorted(parts)).encode()).hexdigest()


def check_checkpoint_tokenizers(tokenizer, tokenizer_path: str, checkpoints: Mapping[str, Optional[str]]) -> None:
    """Every checkpoint of ``checkpoints`` (config key -> checkpoint, or checkpoint root whose ``latest``
    is loaded; None: a random-init model, skipped) must carry under ``tokenizer/`` (where conversion and
    every save put it) the tokenizer the run uses (``tokenizer``, from ``tokenizer_path``):
    the teacher scores the student's token ids, so an id must mean the same token to both models and to
    the data. Raises ValueError naming the checkpoint's tokenizer and ``tokenizer_path``; a checkpoint
    without ``tokenizer/`` is refused too, since nothing could be checked."""
    from megatron_gndpo.checkpoint.dist_ckpt import TOKENIZER_DIR, resolve_checkpoint

    ours = _fingerprint_parts(tokenizer)
    for key, checkpoint in checkpoints.items():
        if checkpoint is None:
            continue
        path = resolve_checkpoint(checkpoint) / TOKENIZER_DIR
        if not path.is_dir():
            raise ValueError(
                f"{key}={checkpoint} has no {TOKENIZER_DIR}/ folder, so the run cannot check that its model "
                f"uses the tokenizer of data.tokenizer ({tokenizer_path}). Conversion and training save one with "
                f"every checkpoint; for an older checkpoint copy the tokenizer its model was trained with into {path}/")
        other = _from_dir(str(path))
        theirs = _fingerprint_parts(other)
        differ = [name for name in ours if ours[name] != theirs[name]]
        if differ:
            raise ValueError(
                f"the tokenizer of {key} ({path}, {len(other)} tokens) differs from data.tokenizer "
                f"({tokenizer_path}, {len(tokenizer)} tokens) in its {' and '.join(differ)}: one token id would "
                "mean different tokens to the models and the data. Distillation needs one tokenizer for the "
                "student, the teacher and the data")


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> List[int]:
    """Chat messages -> prompt token ids, ending with the assistant's turn opened."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        # transformers >= 5 returns a BatchEncoding where 4.x returned a list
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    text = "".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_ids(tokenizer) -> List[int]:
    """The ids that end a response: eos, plus the chat template's end-of-turn token if it differs."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
