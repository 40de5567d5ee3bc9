"""Convert a local copy of Geometry3K to the verl parquet schema the trainer reads.

    python -m tools.data.geo3k --src PATH --out DIR

``--src`` is either a directory of parquet files (``train*.parquet`` / ``test*.parquet``, as the
Hugging Face dataset ``hiyouga/geometry3k`` stores them) or a Hugging Face dataset directory saved
with ``datasets.save_to_disk``. Nothing is downloaded. Rows need ``problem`` and ``answer`` (and
optionally ``images``); the prompt follows the GNDPO reference: the problem, then the instruction to
reason inside <think></think> and put the final answer in \\boxed{}. Each row's images are written as
their encoded bytes (``{"bytes": ...}``) in the row, one ``<image>`` placeholder each at the start of
the prompt, so the output files stand alone (``data.images: process`` reads them).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Dict, Iterable, List

from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

INSTRUCTION = (" You FIRST think about the reasoning process as an internal monologue and then provide the final "
               "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
               "BE put in \\boxed{}.")
SPLITS = {"train": "train", "test": "test", "validation": "val"}


def _records(src: Path, split: str) -> List[Dict]:
    import pyarrow.parquet as pq

    files = sorted(src.glob(f"{split}*.parquet")) + sorted(src.glob(f"data/{split}*.parquet"))
    if files:
        return [r for f in files for r in pq.read_table(f).to_pylist()]
    if (src / split / "dataset_info.json").is_file():
        from datasets import load_from_disk

        return list(load_from_disk(str(src / split)))
    return []


def _image_bytes(image, split: str, row: int, k: int) -> bytes:
    """An image of the source as its encoded bytes: parquet files hold ``{"bytes", "path"}`` structs,
    ``save_to_disk`` datasets give decoded Pillow images (re-encoded in their own format)."""
    if isinstance(image, dict) and isinstance(image.get("bytes"), bytes):
        return image["bytes"]
    if hasattr(image, "save"):
        out = io.BytesIO()
        image.save(out, format=image.format or "PNG")
        return out.getvalue()
    raise ValueError(f"Geometry3K {split} row {row}: image {k} has no bytes (got {image!r:.60})")


def convert_rows(records: Iterable[Dict], split: str) -> List[Dict]:
    out = []
    for i, r in enumerate(records):
        for column in ("problem", "answer"):
            if not isinstance(r.get(column), str):
                raise ValueError(f"Geometry3K {split} row {i}: column '{column}' must be a string, "
                                 f"got {r.get(column)!r:.60}")
        problem = r["problem"].replace("<image>", "").strip()
        images = [{"bytes": _image_bytes(image, split, i, k)} for k, image in enumerate(r.get("images") or [])]
        out.append(verl_row([{"role": "user", "content": "<image>" * len(images) + problem + INSTRUCTION}],
                            r["answer"], data_source="hiyouga/geometry3k", ability="math", images=images,
                            extra_info={"split": split, "index": i}))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="local Geometry3K: parquet directory or save_to_disk directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise SystemExit(f"--src {src} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, name in SPLITS.items():
        records = _records(src, split)
        if records:
            write_prompt_parquet(str(out / f"{name}.parquet"), convert_rows(records, split))
            written[name] = len(records)
    if not written:
        raise SystemExit(f"no train/test split found under {src}")
    print("wrote " + ", ".join(f"{n} {name} rows" for name, n in written.items()) + f" to {out}")


if __name__ == "__main__":
    main()
