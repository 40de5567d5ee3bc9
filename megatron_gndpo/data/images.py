"""The ``images`` column of the verl parquet schema: every image located and decoded when the dataset
is opened, so a missing file or undecodable bytes stop the run before any compute.

verl writes a row's images as a list of ``{"bytes": ..., "path": ...}`` structs (the Hugging Face
``datasets`` Image feature; either field may be null) or of plain path strings. A path is relative to
the parquet file that holds the row, so a dataset directory can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import List, Tuple, Union


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image of one row: where its encoded bytes are, and its size (read when the dataset opens,
    since the number of image tokens the prompt holds depends on it)."""

    source: Union[bytes, Path]
    """The encoded image (PNG, JPEG, ...) itself, or the file holding it."""
    height: int
    width: int

    def open(self):
        """The image as an RGB Pillow image (the processors of both supported families take RGB)."""
        from PIL import Image

        data = self.source if isinstance(self.source, bytes) else self.source.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")


def _locate(parquet_path: str, item) -> Tuple[Union[bytes, Path], str]:
    """``item`` -> (bytes or file, a description for error messages)."""
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise ValueError(f"expected a struct with 'bytes' or 'path', or a path string, got {item!r:.80}")
    if item.get("bytes") is not None:
        if not isinstance(item["bytes"], bytes):
            raise ValueError(f"'bytes' must be binary, got {type(item['bytes']).__name__}")
        return item["bytes"], f"{len(item['bytes'])} bytes"
    if item.get("path"):
        path = Path(parquet_path).parent / item["path"]  # an absolute path stays as it is
        if not path.is_file():
            raise ValueError(f"image file {path} not found")
        return path, f"file {path}"
    raise ValueError(f"neither 'bytes' nor 'path' is set in {item!r:.80}")


def read_images(parquet_path: str, row: int, images) -> List[ImageRef]:
    """Every image of one row's ``images`` value, decoded once to check it and measure it; a ValueError
    names the parquet file, the row, the column and the image's position in the list."""
    from PIL import Image

    if images is None:
        return []
    if not isinstance(images, list):
        raise ValueError(f"{parquet_path}: row {row}, column 'images': expected a list, got {images!r:.80}")
    refs = []
    for k, item in enumerate(images):
        where = f"{parquet_path}: row {row}, column 'images', image {k}"
        try:
            source, what = _locate(parquet_path, item)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        try:
            data = source if isinstance(source, bytes) else source.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes the pixels: a truncated file fails here, not at a training step
                width, height = image.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where}: cannot decode the image ({what}): {e}") from None
        refs.append(ImageRef(source, height, width))
    return refs
