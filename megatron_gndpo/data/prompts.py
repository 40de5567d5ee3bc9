"""Prompt datasets in the verl parquet schema and the seeded order they are read in.

Row schema: ``prompt`` (list of ``{"role", "content"}`` chat messages), ``reward_model``
(``{"style": "rule", "ground_truth": str}``), optional ``data_source``, ``images``, ``ability``,
``extra_info``. Every row is checked, and every prompt tokenized and measured, when the files are
opened, so a malformed or overlong row stops the run before any compute, with its file, row number
and column (or length) in the message.

``images`` (data.images): 'error' refuses rows with images (a text-only student), 'ignore' drops them,
'process' decodes them (data/images.py) and expands each ``<image>`` of the prompt to the image's
tokens with the checkpoint's processor (data/vision.py), so the prompt length counts them.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Sequence

from megatron_gndpo.data.images import ImageRef, read_images
from megatron_gndpo.data.vision import PLACEHOLDER, ImageInputs, VisionProcessor

REQUIRED_COLUMNS = ("prompt", "reward_model")
IMAGE_POLICIES = ("error", "ignore", "process")


@dataclasses.dataclass
class PromptRow:
    index: int
    """Position in the dataset (all files concatenated, rows left out by the dataset not counted)."""
    messages: List[Dict[str, str]]
    ground_truth: str
    data_source: str
    path: str
    """The parquet file the row comes from."""
    file_row: int
    """Its row number in that file."""
    images: List[ImageRef] = dataclasses.field(default_factory=list)
    """Its images, in the order of the prompt's ``<image>`` placeholders (data.images=process only)."""


def _row_error(path: str, row: int, column: str, what: str) -> ValueError:
    return ValueError(f"{path}: row {row}, column '{column}': {what}")


def _check_row(path: str, row: int, prompt, reward_model, images, images_policy: str) -> PromptRow:
    if not isinstance(prompt, list) or not prompt:
        raise _row_error(path, row, "prompt", f"expected a non-empty list of chat messages, got {prompt!r:.80}")
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _row_error(path, row, "prompt", f"message {j} must have string 'role' and 'content', got {m!r:.80}")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise _row_error(path, row, "reward_model", f"expected a struct with 'ground_truth', got {reward_model!r:.80}")
    if images and images_policy == "error":
        raise _row_error(path, row, "images", "the row has images but the student is a text-only model "
                         "(set data.images=ignore to drop them)")
    refs = []
    if images_policy == "process":
        refs = read_images(path, row, images)
        placeholders = sum(m["content"].count(PLACEHOLDER) for m in prompt)
        if placeholders != len(refs):
            raise _row_error(path, row, "images", f"the prompt has {placeholders} {PLACEHOLDER} placeholders but the "
                             f"row has {len(refs)} images: each image goes where its placeholder is")
    return PromptRow(row, [{"role": m["role"], "content": m["content"]} for m in prompt],
                     str(reward_model["ground_truth"]), "", path, row, refs)


def read_prompt_rows(paths: Sequence[str], images: str = "error") -> List[PromptRow]:
    """All rows of ``paths``, validated (with their images decoded, when ``images`` is 'process')."""
    import pyarrow.parquet as pq

    if images not in IMAGE_POLICIES:
        raise ValueError(f"data.images must be one of {', '.join(IMAGE_POLICIES)}, got {images!r}")

    rows: List[PromptRow] = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read parquet file {path}: {e}") from e
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})")
        cols = {c: table.column(c).to_pylist() for c in ("prompt", "reward_model", "data_source", "images")
                if c in table.column_names}
        for i in range(table.num_rows):
            row = _check_row(path, i, cols["prompt"][i], cols["reward_model"][i],
                             cols.get("images", [None] * table.num_rows)[i], images)
            row.index = len(rows)
            row.data_source = str(cols.get("data_source", [""] * table.num_rows)[i] or "")
            rows.append(row)
    if not rows:
        raise ValueError(f"the dataset {', '.join(paths) or '(no files given)'} has no rows")
    return rows


class PromptOrder:
    """Epoch-by-epoch seeded shuffle; its position is part of every checkpoint, so a resumed run
    reads exactly the prompts the uninterrupted one would have."""

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> List[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            if self.offset == self.num_rows:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order()
            k = min(n - len(out), self.num_rows - self.offset)
            out += self._order[self.offset:self.offset + k]
            self.offset += k
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_rows": self.num_rows}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"the checkpoint was taken on a dataset of {state['num_rows']} rows, "
                             f"this one has {self.num_rows}")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order()


class PromptDataset:
    """Validated rows and their token ids, every prompt rendered with the chat template and measured
    against ``max_prompt_length`` when the dataset is opened (not when a step first draws it).

    ``overlong``: 'error' refuses a prompt longer than ``max_prompt_length`` naming its file, row and
    length; 'drop' leaves such rows out (verl's ``filter_overlong_prompts``) and counts them in
    ``dropped``.

    ``processor``: the student checkpoint's vision processor, which ``images='process'`` needs; the
    prompt length it measures counts every image's tokens."""

    def __init__(self, paths: Sequence[str], tokenizer, *, max_prompt_length: int, images: str = "error",
                 overlong: str = "error", processor: Optional[VisionProcessor] = None):
        from megatron_gndpo.data.tokenizer import render_prompt

        if overlong not in ("error", "drop"):
            raise ValueError(f"data.overlong_prompts must be 'error' or 'drop', got {overlong!r}")
        if images == "process" and processor is None:
            raise ValueError("data.images=process needs the vision processor of a vision-language student "
                             "(see docs/multimodal.md)")
        rows = read_prompt_rows(paths, images)
        ids = []
        for row in rows:
            if not row.images:
                ids.append(render_prompt(tokenizer, row.messages))
                continue
            try:
                ids.append(processor.prompt_ids(row.messages, row.images))
            except ValueError as e:
                raise _row_error(row.path, row.file_row, "prompt", str(e)) from None
        kept = [i for i, prompt in enumerate(ids) if len(prompt) <= max_prompt_length]
        if len(kept) < len(rows) and overlong == "error":
            first = next(i for i, prompt in enumerate(ids) if len(prompt) > max_prompt_length)
            raise ValueError(
                f"{rows[first].path}: row {rows[first].file_row}: the prompt is {len(ids[first])} tokens, longer "
                f"than data.max_prompt_length ({max_prompt_length}); {len(rows) - len(kept)} of {len(rows)} "
                "prompts are (data.overlong_prompts=drop leaves them out)")
        if not kept:
            raise ValueError(f"every prompt of {', '.join(paths)} is longer than data.max_prompt_length "
                             f"({max_prompt_length})")
        self.rows = [dataclasses.replace(rows[i], index=n) for n, i in enumerate(kept)]
        self._ids = [ids[i] for i in kept]
        self.dropped = len(rows) - len(kept)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.rows)

    def prompt_ids(self, i: int) -> List[int]:
        return self._ids[i]

    def image_inputs(self, i: int) -> Optional[ImageInputs]:
        """Row ``i``'s images processed for the vision tower (None for a row without images). Made when a
        step draws the row, not kept: a dataset's pixels would not fit in memory (InternVL: up to 13
        tiles of 448 x 448 x 3 floats per image)."""
        row = self.rows[i]
        if not row.images:
            return None
        inputs = self.processor.pixels(row.images)
        measured = [self.processor.image_tokens(image) for image in row.images]
        if inputs.tokens_per_image != measured:
            raise RuntimeError(f"{row.path}: row {row.file_row}: the image processor made {inputs.tokens_per_image} "
                               f"image tokens, the prompt measured at dataset open holds {measured}")
        return inputs


def write_prompt_parquet(path: str, rows: Sequence[dict]) -> None:
    """Write rows (dicts in the schema above) to parquet; used by the data-prep tools and tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows)), path)


def verl_row(messages: List[Dict[str, str]], ground_truth: str, *, data_source: str, ability: str = "",
             images: Optional[list] = None, extra_info: Optional[dict] = None) -> dict:
    return {
        "data_source": data_source,
        "prompt": messages,
        "images": images or [],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": extra_info,
    }
