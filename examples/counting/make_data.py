"""Build the bundled visual task of `make demo-vlm`: count the shapes in a tiny picture.

    python examples/counting/make_data.py [--out examples/counting]

Each picture is 28 x 28 pixels: a 4 x 4 grid of 7 x 7 cells (one cell per patch of the tiny vision
tower), 1-9 of them holding a small square or disc of a random colour at a random offset, on a
random light background. The prompt is ``<image>n=`` and the answer is the count, a digit that only
the picture holds. Rows are in the verl parquet schema with the PNG bytes in the ``images`` column;
the train and held-out val sets are drawn with different seeds. The tokenizer directory holds a
character tokenizer with InternVL's image tokens, a chat template and InternVL's processor files
(28 x 28 tiles, one tile per picture, 4 image tokens). The outputs are committed; this script
documents how they were made.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

SIZE, GRID = 28, 4
CELL = SIZE // GRID
MAX_COUNT = 9
SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
# the names InternVLProcessor (and data/vision.py) read from the tokenizer
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
CHARS = list("0123456789n=")
# The user's text verbatim, an image part rendered as InternVL's <IMG_CONTEXT> (which the processor expands to
# <img> + 4 x <IMG_CONTEXT> + </img>); the answer follows directly.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for part in m['content'] %}{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>' }}"
                 "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")
PROMPT = "<image>n="
# one 28 x 28 tile per picture: patches of 7 -> 16 positions, InternVL's pixel shuffle (0.5) -> 4 image tokens
IMAGE_SEQ_LENGTH = 4
TRAIN_SIZE, VAL_SIZE = 2000, 300


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    names = [SPECIAL["pad_token"], SPECIAL["eos_token"], SPECIAL["unk_token"], *IMAGE_TOKENS.values(), *CHARS]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, extra_special_tokens=IMAGE_TOKENS, **SPECIAL)
    tok.add_tokens(list(IMAGE_TOKENS.values()), special_tokens=True)  # never split into characters
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    GotOcr2ImageProcessorPil(size={"height": SIZE, "width": SIZE}, min_patches=1, max_patches=1).save_pretrained(
        str(out))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                           "image_seq_length": IMAGE_SEQ_LENGTH}, indent=2) + "\n")


def picture(count: int, rng: random.Random) -> bytes:
    """A PNG of ``count`` shapes, each in its own cell of the grid."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randrange(200, 256) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(GRID * GRID), count):
        side = rng.randrange(3, 6)
        x = cell % GRID * CELL + rng.randrange(0, CELL - side + 1)
        y = cell // GRID * CELL + rng.randrange(0, CELL - side + 1)
        colour = tuple(rng.randrange(0, 150) for _ in range(3))
        box = (x, y, x + side - 1, y + side - 1)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rows(n: int, split: str, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        count = rng.randint(1, MAX_COUNT)
        out.append(verl_row([{"role": "user", "content": PROMPT}], str(count), data_source="counting",
                            ability="vision", images=[{"bytes": picture(count, rng)}],
                            extra_info={"split": split, "index": i}))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--train", type=int, default=TRAIN_SIZE)
    parser.add_argument("--val", type=int, default=VAL_SIZE)
    args = parser.parse_args(argv)
    out = Path(args.out)
    build_tokenizer(out / "tokenizer")
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_prompt_parquet(str(out / "data" / "train.parquet"), rows(args.train, "train", seed=0))
    write_prompt_parquet(str(out / "data" / "val.parquet"), rows(args.val, "val", seed=1))
    print(f"wrote {args.train} train / {args.val} val pictures and the tokenizer under {out}")


if __name__ == "__main__":
    main()
