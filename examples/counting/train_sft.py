"""Supervised warm-up of `make demo-vlm`'s tiny InternVL models on the bundled counting task: train the
teacher (well) or the student's starting point (briefly), then save a Hugging Face InternVL directory
(weights, config, tokenizer and processor files) for ``megatron-gndpo convert hf-to-megatron``.

    python examples/counting/train_sft.py --role teacher --steps 600 --out outputs/demo_vlm/hf_teacher

A plain torch loop on transformers' ``InternVLForConditionalGeneration``: every part trains, the vision
tower included. The prompts and pixels are the project's own (``PromptDataset`` with the checkpoint's
processor), so the models see exactly what the trainer will feed them. Skips the work when ``--out``
already holds a model made with the same recipe, this script and the same data (the demo's cache).
Prints the held-out greedy accuracy (the count, then end of sequence, as ``exact_match`` scores it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE / "tokenizer"
DATA = {"train": HERE / "data" / "train.parquet", "val": HERE / "data" / "val.parquet"}
IMAGE_TOKEN = "<IMG_CONTEXT>"
# Both vision towers cut the 28 x 28 tile into 16 patches of 7; the pixel shuffle (0.5) makes 4 image tokens.
VISION = dict(image_size=[28, 28], patch_size=[7, 7])
ARCH = {
    "teacher": {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)},
    "student": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
                "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)},
}
RECIPE_FILE = "demo_recipe.json"


def build_model(role: str, tokenizer, seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type="qwen2", vocab_size=len(tokenizer), max_position_embeddings=32,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **ARCH[role]["text"])
    config = InternVLConfig(vision_config={**VISION, **ARCH[role]["vision"]}, text_config=text,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), downsample_ratio=0.5)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).float()


def load_split(split: str, tokenizer):
    """(prompt ids [N, P], pixel values [N, 3, 28, 28], answers as token ids [N]) of a split; every prompt
    has one 1-tile picture and the same text, so all have one length."""
    from megatron_gndpo.data.prompts import PromptDataset
    from megatron_gndpo.data.vision import load_vision_processor

    data = PromptDataset([str(DATA[split])], tokenizer, max_prompt_length=16, images="process",
                         processor=load_vision_processor(str(TOKENIZER), tokenizer))
    prompts = torch.tensor([data.prompt_ids(i) for i in range(len(data))])
    pixels = data.processor.pixels([row.images[0] for row in data.rows]).pixel_values  # one tile each
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(data.rows[i].ground_truth) for i in range(len(data))])
    return prompts, pixels, answers


@torch.no_grad()
def greedy_accuracy(model, prompts, pixels, answers, eos: int, batch: int = 100) -> float:
    """Greedy two tokens: right when they are the count and then end of sequence."""
    model.eval()
    right = 0
    for s in range(0, len(prompts), batch):
        p, x, a = prompts[s:s + batch], pixels[s:s + batch], answers[s:s + batch]
        first = model(input_ids=p, pixel_values=x).logits[:, -1].argmax(-1)
        second = model(input_ids=torch.cat([p, first[:, None]], 1), pixel_values=x).logits[:, -1].argmax(-1)
        right += int(((first == a) & (second == eos)).sum())
    model.train()
    return right / len(prompts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=tuple(ARCH), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--decay", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (fixed, so that the weights do not depend on the core count)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    inputs = hashlib.sha256(Path(__file__).read_bytes())
    for path in (*DATA.values(), *sorted(TOKENIZER.iterdir())):
        inputs.update(path.read_bytes())
    recipe = {"role": args.role, "steps": args.steps, "batch": args.batch, "lr": args.lr, "decay": args.decay,
              "seed": args.seed, "threads": args.threads, "arch": ARCH[args.role], "inputs": inputs.hexdigest()}
    if (out / RECIPE_FILE).is_file() and json.loads((out / RECIPE_FILE).read_text())["recipe"] == recipe:
        print(f"{args.role}: cached at {out} (accuracy {json.loads((out / RECIPE_FILE).read_text())['val_acc']:.3f})")
        return

    if out.exists() and any(out.iterdir()) and not (out / RECIPE_FILE).is_file():
        raise SystemExit(f"{out} is not empty and holds no {RECIPE_FILE} (this script did not write it); refusing "
                         "to replace it. Choose another --out.")
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    eos = tokenizer.eos_token_id
    train, val = load_split("train", tokenizer), load_split("val", tokenizer)
    model = build_model(args.role, tokenizer, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(50, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.decay == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(args.seed)
    prompts, pixels, answers = train
    for step in range(args.steps):
        idx = torch.tensor([rng.randrange(len(prompts)) for _ in range(args.batch)])
        p, a = prompts[idx], answers[idx]
        tokens = torch.cat([p, a[:, None]], 1)  # [B, P + 1]: the prompt, then the count
        logits = model(input_ids=tokens, pixel_values=pixels[idx]).logits[:, -2:]  # predicts the count, then EOS
        labels = torch.stack([a, torch.full_like(a, eos)], 1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            print(f"{args.role} sft step {step}: loss {loss.item():.4f}", flush=True)

    acc = greedy_accuracy(model, *val, eos=eos)
    if out.exists():
        shutil.rmtree(out)  # an earlier output of this script (checked above)
    model.save_pretrained(str(out))
    for path in TOKENIZER.iterdir():  # tokenizer, chat template and processor files, which conversion carries over
        shutil.copy(path, out / path.name)
    (out / RECIPE_FILE).write_text(json.dumps({"recipe": recipe, "val_acc": acc}, indent=2) + "\n")
    print(f"{args.role}: held-out accuracy {acc:.3f}, saved to {out}")


if __name__ == "__main__":
    main()
