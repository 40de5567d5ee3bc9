"""Step efficiency on long-tailed response lengths: padded fixed-row micro-batches (today) vs token-budget
micro-batches vs packed rows, and the teacher phase's peak memory with and without the fused LM head.

One process (TP=PP=1), the trainer's own pieces: ``trainer/batches.py::form_microbatches`` forms the
micro-batches of one rank's step, ``megatron_glue.forward_logprobs`` scores them (teacher, then the
student's old log-probs) and ``run_schedule`` trains on them (megatron's DDP and optimizer, one optimizer
step, a token-mean policy-gradient loss on ``vocab_parallel_logprobs``). Rows: a prompt of ``--prompt``
tokens and a response whose length is drawn log-uniform in ``[--min-len, --max-len]``, seeded.

Reported per variant: tokens computed (positions the models run, padding included) over tokens useful
(each row through its last response token), and the median seconds of the teacher, old-log-prob and train
phases in CPU seconds of the process (``--threads 1`` by default, so that CPU time is the time of the
work whatever else runs on the machine). Variants:
  padded-logits  today: ``--micro-batch-size`` rows padded to the step's longest, scoring reads full logits
  padded         the same micro-batches, scoring through the fused LM head + log-prob
  budget         ``trainer.max_tokens_per_microbatch`` = ``--budget`` (first-fit decreasing, each micro-batch
                 padded to its own longest row)
  packed         ``trainer.pack_sequences`` with the same budget (one packed row per micro-batch,
                 block-diagonal causal mask on the local spec)
  packed-1row    packed rows of at most the longest row's length: the local spec's masked attention
                 computes every ``[L, L]`` score of a packed row (the mask skips nothing), so shorter
                 packed rows cost less attention; Transformer Engine's THD kernels skip the masked blocks
The default budget is the tokens of one of today's micro-batches (``--micro-batch-size`` x the longest row),
so no variant's micro-batch computes more tokens than today's.

Memory: the teacher phase on a model with vocabulary ``--memory-vocab`` (152,064, Qwen2.5-7B's), peak bytes
held by tensors created during the call (a ``TorchDispatchMode``, so CPU and GPU alike), full logits vs fused.

    python benchmarks/step_efficiency.py                       # CPU defaults, a few minutes
    python benchmarks/step_efficiency.py --max-len 2048 --rows 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tensor_memory import TensorBytes  # noqa: E402
from megatron_gndpo.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig  # noqa: E402

PRECISION = PrecisionConfig(params_dtype="float32", transformer_impl="local")
VARIANTS = ("padded-logits", "padded", "budget", "packed", "packed-1row")


def model_config(args, vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
                       max_position_embeddings=args.prompt + args.max_len)


def step_batch(args, vocab: int):
    """One rank's step: ``--rows`` rows, prompt ``--prompt`` tokens, response lengths log-uniform."""
    from megatron_gndpo.trainer.batches import _next_token_view

    rng = random.Random(args.seed)
    responses = [round(math.exp(rng.uniform(math.log(args.min_len), math.log(args.max_len)))) for _ in range(args.rows)]
    width = args.prompt + max(responses)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(1, vocab, (args.rows, width), generator=g)
    t = torch.arange(width - 1)[None, :] + 1
    ends = torch.tensor(responses)[:, None] + args.prompt
    for row, n in enumerate(responses):
        tokens[row, args.prompt + n:] = 0
    return _next_token_view(tokens, (t >= args.prompt) & (t < ends)), responses


def microbatches(batch, variant: str, args):
    from megatron_gndpo.trainer.batches import form_microbatches

    budget = args.budget or args.micro_batch_size * batch["tokens"].shape[1]
    if variant == "packed-1row":
        budget = batch["tokens"].shape[1]
    return form_microbatches(batch, mini_batches=1, micro_batch_size=args.micro_batch_size,
                             max_tokens=None if variant.startswith("padded") else budget,
                             pack=variant.startswith("packed"), multiple=1, pad_token_id=0)


def timed(fn, repeats: int) -> float:
    """Median CPU seconds of this process per call (one compute thread, see ``--threads``): on a machine
    shared with other work, wall time measures the neighbours as much as the call."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def run_variant(variant: str, batch, student, optimizer, teacher, readout, args) -> dict:
    from megatron_gndpo.trainer.batches import attach, row_lengths
    from megatron_gndpo.trainer.megatron_glue import TokenLoss, forward_logprobs, forward_outputs, run_schedule

    mbs = microbatches(batch, variant, args)
    n_tokens = float(batch["mask"].sum())

    def score(model, key):
        if variant == "padded-logits":
            return forward_outputs(model, mbs, lambda logits, mb: {key: readout.logprobs(logits, mb["labels"])})
        return forward_logprobs(model, mbs, readout, key)

    loss = TokenLoss(lambda logits, mb: {"lp": readout.logprobs(logits, mb["labels"])},
                     lambda tokens, mb: (-(tokens["lp"] * mb["advantages"] * mb["mask"]).sum() / n_tokens, {}))

    def train():
        student.zero_grad_buffer()
        optimizer.zero_grad()
        run_schedule(student, mbs, loss=loss, forward_only=False)
        optimizer.step()

    attach(mbs, advantages=torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(1)))
    seconds = {"teacher": timed(lambda: score(teacher, "teacher_logprobs"), args.repeats),
               "old_logprobs": timed(lambda: score(student.module, "old_logprobs"), args.repeats),
               "train": timed(train, args.repeats)}
    computed = sum(mb["tokens"].numel() for mb in mbs)
    useful = int(row_lengths(batch["mask"]).sum())
    return {"variant": variant, "microbatches": len(mbs), "tokens_computed": computed, "tokens_useful": useful,
            "computed_over_useful": computed / useful, **{f"{k}_s": v for k, v in seconds.items()},
            "phases_s": sum(seconds.values())}


def teacher_memory(args) -> list:
    """Peak MiB of the teacher phase at vocabulary ``--memory-vocab``: full logits vs fused LM head."""
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.teacher import freeze
    from megatron_gndpo.trainer.batches import split_rows
    from megatron_gndpo.trainer.megatron_glue import LogitsReadout, forward_logprobs, forward_outputs

    cfg = dataclasses.replace(model_config(args, args.memory_vocab), max_position_embeddings=args.memory_seq + 1)
    model = freeze(build_gpt_model(cfg, ParallelConfig(), PRECISION, pre_process=True, post_process=True))
    readout = LogitsReadout(None, 1.0, args.memory_vocab)
    tokens = torch.randint(0, args.memory_vocab, (args.micro_batch_size, args.memory_seq + 1),
                           generator=torch.Generator().manual_seed(0))
    mask = torch.ones(args.micro_batch_size, args.memory_seq, dtype=torch.bool)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask,
             "position_ids": torch.arange(args.memory_seq).expand(args.micro_batch_size, -1).contiguous()}
    mbs = split_rows(batch, args.micro_batch_size)
    rows = []
    for name, fn in (("logits", lambda: forward_outputs(model, mbs, lambda lg, mb: {
                          "lp": readout.logprobs(lg, mb["labels"])})),
                     ("fused", lambda: forward_logprobs(model, mbs, readout, "lp"))):
        fn()  # warm-up: lazily built buffers (rotary tables) do not count
        with TensorBytes() as tracker:
            fn()
        rows.append({"scoring": name, "vocab": args.memory_vocab, "tokens": args.micro_batch_size * args.memory_seq,
                     "hidden": args.hidden, "peak_mib": tracker.peak / 2 ** 20})
    return rows


def versions() -> dict:
    import importlib.metadata as md

    return {"torch": torch.__version__, "megatron-core": md.version("megatron-core")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="responses of one rank's step")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=None, help="default: micro-batch-size x the longest row")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--memory-vocab", type=int, default=152064)
    parser.add_argument("--memory-seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (times are CPU seconds)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step_efficiency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.student import build_optimizer, build_student
    from megatron_gndpo.models.teacher import freeze
    from megatron_gndpo.trainer.megatron_glue import LogitsReadout

    init_parallel(ParallelConfig(), seed=0)
    try:
        cfg = model_config(args, args.vocab)
        batch, responses = step_batch(args, args.vocab)
        student = build_student(cfg, ParallelConfig(), PRECISION, pre_process=True, post_process=True)
        optimizer = build_optimizer(OptimConfig(lr=1e-5), PRECISION, ParallelConfig(), student)
        teacher = freeze(build_gpt_model(dataclasses.replace(cfg, hidden_size=2 * args.hidden,
                                                             intermediate_size=8 * args.hidden),
                                         ParallelConfig(), PRECISION, pre_process=True, post_process=True))
        readout = LogitsReadout(None, 1.0, args.vocab)
        rows = []
        for variant in args.variants:
            rows.append(run_variant(variant, batch, student, optimizer, teacher, readout, args))
            r = rows[-1]
            print(f"{variant:14s} micro-batches {r['microbatches']:3d}  computed/useful {r['computed_over_useful']:.2f}"
                  f"  teacher {r['teacher_s']:.2f}s  old {r['old_logprobs_s']:.2f}s  train {r['train_s']:.2f}s"
                  f"  total {r['phases_s']:.2f}s", flush=True)
        today = rows[0] if rows[0]["variant"] == "padded-logits" else None
        if today:
            for r in rows:
                r["fewer_tokens_x"] = today["tokens_computed"] / r["tokens_computed"]
                r["speedup_x"] = today["phases_s"] / r["phases_s"]
        memory = teacher_memory(args)
    finally:
        destroy_parallel()

    print("\n| variant | micro-batches | tokens computed | useful | computed / useful | fewer tokens | teacher s "
          "| old log-probs s | train s | phases s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['microbatches']} | {r['tokens_computed']} | {r['tokens_useful']} | "
              f"{r['computed_over_useful']:.2f} | {r.get('fewer_tokens_x', float('nan')):.2f}x | "
              f"{r['teacher_s']:.2f} | {r['old_logprobs_s']:.2f} | {r['train_s']:.2f} | {r['phases_s']:.2f} | "
              f"{r.get('speedup_x', float('nan')):.2f}x |")
    print("\n| teacher scoring | vocab | tokens | hidden | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for m in memory:
        print(f"| {m['scoring']} | {m['vocab']} | {m['tokens']} | {m['hidden']} | {m['peak_mib']:.1f} |")
    out = {"device": "CPU", "threads": torch.get_num_threads(), "versions": versions(), "args": vars(args),
           "response_lengths": responses, "rows": rows, "teacher_memory": memory}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
