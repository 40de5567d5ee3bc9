"""Hugging Face tokenizers: loading, chat-template rendering, and the checks the trainer needs."""

from __future__ import annotations

import os
from typing import List, Mapping, Sequence


def load_tokenizer(path: str):
    """A tokenizer from a local Hugging Face directory (never downloads)."""
    from transformers import AutoTokenizer

    if not path or not os.path.isdir(path):
        raise ValueError(f"data.tokenizer must be a local tokenizer directory, got {path!r}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no eos_token: responses could never end")
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int, role: str) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {role}.vocab_size is {vocab_size}: "
                         "token ids would index past the embedding")


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
