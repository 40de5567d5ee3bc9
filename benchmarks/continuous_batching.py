"""Generated tokens/s of the static sampler vs continuous batching on a long-tailed response-length
distribution, and the fraction of decode slots idle.

Response lengths are drawn log-uniform in ``[--min-len, --max-len]`` (default 16..2048) and forced: the
benchmark wraps the sampler both engines call so that row r's token at position ``prompt_len_r + len_r - 1``
becomes an EOS id. The override is keyed on (row, position) like the sampling noise, so both engines do
the same work and return the same tokens (checked); everything else (forwards, KV cache, sampling) is
the engines' own. One process (TP = PP = 1), random weights, fp32.

Idle fraction: ``1 - generated tokens / (slots x decode steps)``; for the static sampler the slots are
the batch rows (a finished row is still decoded), for continuous batching its ``decode_slots`` (a
finished row leaves the decode batch, a free slot that no prompt can fill any more stays empty and is
not computed). Row-steps per token: rows the decode steps computed per generated token (1.0: no waste).

    python benchmarks/continuous_batching.py                         # 32 rows, lengths 16..2048
    python benchmarks/continuous_batching.py --max-len 512           # lengths 16..512
    python benchmarks/continuous_batching.py --max-len 128 --rows 8  # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import versions  # noqa: E402

EOS = 0


def forced_lengths(rows: int, lo: int, hi: int, seed: int) -> list[int]:
    """``round(exp(U(log lo, log hi)))`` per row: log-uniform response lengths."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    return [int(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * x))) for x in u.tolist()]


class ForcedEOS:
    """The engines' ``vocab_parallel_sample`` with EOS forced at each row's scheduled position; counts the
    decode steps and the rows each one sampled."""

    def __init__(self, sample, end_position: torch.Tensor):
        self.sample, self.end_position = sample, end_position  # [rows]: index of the row's last token
        self.steps = self.row_steps = 0

    def __call__(self, logits, *, rows, position, **kwargs):
        self.steps += 1
        self.row_steps += logits.shape[0]
        tok = self.sample(logits, rows=rows, position=position, **kwargs)
        tok = torch.where(tok == EOS, torch.ones_like(tok), tok)  # no early EOS: the schedule decides
        return torch.where(position == self.end_position[rows], torch.full_like(tok, EOS), tok)


def run(engine_name, engine, model, prompts, row_ids, params, end_position, groups, vocab, max_seq):
    import megatron_gndpo.rollout.continuous as continuous
    import megatron_gndpo.rollout.generator as generator

    hook = ForcedEOS(generator.vocab_parallel_sample, end_position)
    saved = generator.vocab_parallel_sample, continuous.vocab_parallel_sample
    generator.vocab_parallel_sample = continuous.vocab_parallel_sample = hook
    try:
        t0 = time.perf_counter()
        out = engine(model, prompts, row_ids, params, groups=groups, vocab_size=vocab, seed=3,
                     max_sequence_length=max_seq)
        seconds = time.perf_counter() - t0
    finally:
        generator.vocab_parallel_sample, continuous.vocab_parallel_sample = saved
    return out, seconds, hook


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="prompts (rows) sampled together")
    p.add_argument("--slots", type=int, nargs="+", default=[8, 32], help="decode_slots of the continuous runs")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048, help="below 8192 the sampler runs eagerly (no compile)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1 spins least)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/continuous_batching.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.rollout.continuous import rollout_engine
    from megatron_gndpo.rollout.generator import SamplingParams

    lengths = forced_lengths(args.rows, args.min_len, args.max_len, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 65, (args.rows,), generator=g)]
    plen = torch.tensor([len(q) for q in prompts])
    end_position = plen + torch.tensor(lengths) - 1
    max_seq = 64 + args.max_len + 8
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
                      max_position_embeddings=max_seq)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_len, eos_token_ids=[EOS])
    groups = init_parallel(ParallelConfig(), seed=0)
    rows = []
    try:
        precision = PrecisionConfig(params_dtype="float32", transformer_impl="local")
        model = build_gpt_model(cfg, ParallelConfig(), precision, pre_process=True, post_process=True)
        engines = [("static", None)] + [("continuous", s) for s in args.slots]
        for name, slots in engines:  # warm-up: first-call costs (allocator, kernels) stay out of the timings
            rollout_engine(name == "continuous", slots)(
                model, prompts[:4], torch.arange(4), SamplingParams(max_new_tokens=8), groups=groups,
                vocab_size=args.vocab, seed=0, max_sequence_length=max_seq)
        reference = None
        for name, slots in engines:
            engine = rollout_engine(name == "continuous", slots)
            out, seconds, hook = run(name, engine, model, prompts, torch.arange(args.rows), params, end_position,
                                     groups, args.vocab, max_seq)
            assert out.response_lengths.tolist() == lengths, (name, slots)
            if reference is None:
                reference = out.tokens
            same = torch.equal(out.tokens, reference)
            generated = int(out.response_lengths.sum())
            width = args.rows if slots is None else min(slots, args.rows)
            rows.append({"engine": name, "decode_slots": width, "seconds": round(seconds, 2),
                         "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 1),
                         "decode_steps": hook.steps, "row_steps": hook.row_steps,
                         "idle_slot_fraction": round(1 - generated / (width * hook.steps), 3),
                         "row_steps_per_token": round(hook.row_steps / generated, 2),
                         "same_tokens_as_static": same})
            print(rows[-1], flush=True)
    finally:
        destroy_parallel()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base, 2)
    print(f"{'engine':<11}{'slots':>6}{'steps':>7}{'row-steps':>10}{'per token':>10}{'idle':>7}{'tok/s':>8}{'x':>6}"
          f"{'same':>6}")
    for r in rows:
        print(f"{r['engine']:<11}{r['decode_slots']:>6}{r['decode_steps']:>7}{r['row_steps']:>10}"
              f"{r['row_steps_per_token']:>10.2f}{r['idle_slot_fraction']:>7.3f}{r['tokens_per_s']:>8.1f}"
              f"{r['speedup']:>6.2f}{str(r['same_tokens_as_static']):>6}")
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {args.threads} threads (shared)",
              "versions": versions(),
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "response_lengths": lengths,
              "prompt_lengths": plen.tolist(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
