"""Supervised warm-up for the demo: train the teacher (well) or the student's starting point (briefly)
on the bundled arithmetic task, then save the weights as a megatron dist-checkpoint.

    python examples/arithmetic/train_sft.py --config examples/configs/demo.yaml --role teacher \
        --steps 1200 --out outputs/demo/teacher

Skips the work when ``--out`` already holds a checkpoint made with the same role, steps and
architecture (the demo's cache). Prints the held-out greedy accuracy it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
from pathlib import Path

import torch


def _batch(dataset, tokenizer, indices, eos: int, pad: int):
    seqs, starts = [], []
    for i in indices:
        prompt = dataset.prompt_ids(i)
        answer = tokenizer(dataset.rows[i].ground_truth, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(prompt + answer)
        starts.append(len(prompt))
    length = max(map(len, seqs))
    tokens = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
    for r, (s, p) in enumerate(zip(seqs, starts)):
        tokens[r, :len(s)] = torch.tensor(s)
        mask[r, p - 1:len(s) - 1] = True  # positions whose next token is the answer (or EOS)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask,
            "position_ids": torch.arange(length - 1).expand(len(seqs), -1).contiguous()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--role", choices=("teacher", "student"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--decay", choices=("cosine", "constant"), default="cosine",
                        help="learning rate after the warm-up: cosine decay to zero, or constant")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (fixed, so that the weights do not depend on the core count)")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megatron_gndpo.checkpoint.dist_ckpt import META_FILE, TOKENIZER_DIR, copy_tokenizer, save_model_weights
    from megatron_gndpo.config import load_config
    from megatron_gndpo.config.schema import OptimConfig
    from megatron_gndpo.data.prompts import PromptDataset
    from megatron_gndpo.data.tokenizer import eos_ids, load_tokenizer
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel, is_rank0
    from megatron_gndpo.models.student import build_optimizer, build_scheduler, build_student, unwrap
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.rewards import get_reward
    from megatron_gndpo.rollout.generator import SamplingParams
    from megatron_gndpo.trainer.evaluation import greedy_eval
    from megatron_gndpo.trainer.megatron_glue import TokenLoss, run_schedule

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    arch = cfg.teacher.model if args.role == "teacher" else cfg.model
    # everything the weights depend on, this script and the data included, so that a stale cache is retrained
    inputs = hashlib.sha256(Path(__file__).read_bytes())
    for path in (*cfg.data.train_files, *cfg.data.val_files):
        inputs.update(Path(path).read_bytes())
    recipe = {"role": args.role, "steps": args.steps, "batch": args.batch, "lr": args.lr, "decay": args.decay,
              "threads": args.threads,
              "model": dataclasses.asdict(arch), "seed": cfg.seed, "inputs": inputs.hexdigest()}
    meta = Path(args.out) / META_FILE
    if meta.is_file() and json.loads(meta.read_text()).get("recipe") == recipe:
        # the trainer checks a checkpoint's tokenizer; caches written before that lack it
        copy_tokenizer(cfg.data.tokenizer, Path(args.out) / TOKENIZER_DIR)
        print(f"{args.role}: cached at {args.out} (accuracy {json.loads(meta.read_text())['val_acc']:.3f})")
        return

    groups = init_parallel(cfg.parallel, seed=cfg.seed + (0 if args.role == "teacher" else 1))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train = PromptDataset(cfg.data.train_files, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
    val = PromptDataset(cfg.data.val_files, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
    model = build_student(arch, cfg.parallel, cfg.precision, pre_process=groups.is_first_stage,
                          post_process=groups.is_last_stage)
    # cosine decay to zero: the last steps settle the weights, which reaches a given accuracy in far fewer
    # steps than a constant rate
    optim = OptimConfig(lr=args.lr, weight_decay=0.0, clip_grad=1.0, lr_decay_style=args.decay,
                        lr_warmup_steps=min(50, args.steps // 10))
    optimizer = build_optimizer(optim, cfg.precision, cfg.parallel, model)
    scheduler = build_scheduler(optim, optimizer, args.steps)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rng = random.Random(cfg.seed)
    per_rank = args.batch // groups.dp_size
    for step in range(args.steps):
        indices = [rng.randrange(len(train)) for _ in range(args.batch)]
        batch = _batch(train, tokenizer, indices[groups.dp_rank * per_rank:(groups.dp_rank + 1) * per_rank], eos, pad)
        n_tokens = float(batch["mask"].sum()) * groups.dp_size  # every row has the same answer-length range

        def reduce(tokens, mb):
            loss = -(tokens["lp"] * mb["mask"]).sum() / n_tokens
            return loss, {"loss": loss.detach()}

        loss = TokenLoss(lambda logits, mb: {"lp": vocab_parallel_logprobs(logits, mb["labels"], group=groups.tp,
                                                                           vocab_size=arch.vocab_size)}, reduce)

        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = run_schedule(model, [batch], loss=loss, forward_only=False)
        optimizer.step()
        scheduler.step(1)
        if out and step % 100 == 0 and is_rank0(groups.dp):
            print(f"{args.role} sft step {step}: loss {out[0]['loss'].item():.4f}", flush=True)

    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                              eos_token_ids=eos_ids(tokenizer), pad_token_id=pad)
    acc = greedy_eval(unwrap(model), val, tokenizer, get_reward(cfg.data.reward), sampling, groups=groups,
                      vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
                      limit=len(val))["val/acc"]
    save_model_weights(unwrap(model), args.out, arch, {"tp": groups.tp_size, "pp": groups.pp_size},
                       recipe=recipe, val_acc=acc, tokenizer=cfg.data.tokenizer)
    if is_rank0():
        print(f"{args.role}: held-out accuracy {acc:.3f}, saved to {args.out}")
    destroy_parallel()


if __name__ == "__main__":
    main()
