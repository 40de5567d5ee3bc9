"""Build the bundled arithmetic task: a character tokenizer and prompts in the verl parquet schema.

    python examples/arithmetic/make_data.py [--out examples/arithmetic]

Problems are ``a+b=`` with 0 <= a, b < 100; the answer is the decimal sum. The pairs are split once,
with a fixed seed, into train and held-out val sets, so the demo's accuracy is measured on sums
the models never trained on. The outputs are committed; this script documents how they were made.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

CHARS = list("0123456789+=")
SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
# The prompt is the user's text verbatim; the answer follows it directly.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
VAL_SIZE = 500


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([SPECIAL["pad_token"], SPECIAL["eos_token"], SPECIAL["unk_token"], *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))


def problems():
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(0).shuffle(pairs)
    return pairs[VAL_SIZE:], pairs[:VAL_SIZE]


def row(a: int, b: int, split: str, i: int) -> dict:
    return verl_row([{"role": "user", "content": f"{a}+{b}="}], str(a + b), data_source="arithmetic",
                    ability="math", extra_info={"split": split, "index": i})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    out = Path(parser.parse_args(argv).out)
    build_tokenizer(out / "tokenizer")
    train, val = problems()
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_prompt_parquet(str(out / "data" / "train.parquet"), [row(a, b, "train", i) for i, (a, b) in enumerate(train)])
    write_prompt_parquet(str(out / "data" / "val.parquet"), [row(a, b, "val", i) for i, (a, b) in enumerate(val)])
    print(f"wrote {len(train)} train / {len(val)} val prompts and the tokenizer under {out}")


if __name__ == "__main__":
    main()
